"""Bad arguments to ``nchains report`` and ``nchains.report``: each is refused before any work
(exit 2, one line, no traceback, nothing written), naming the argument and what is accepted."""

import functools
import json

import pytest

import nchains

from _models import digits_region, random_digits_net


@functools.lru_cache(maxsize=1)
def _chain():
    """A valid chain (zero extraction steps) of a random DigitsNet; it records no model spec."""
    net = random_digits_net(0)
    images, _ = digits_region((3, 8), per_class=2)
    return net, images, nchains.extract(net, images, steps=0, finetune_steps=0, progress=False)


@pytest.fixture
def chain_file(tmp_path):
    path = tmp_path / "chain.json"
    _chain()[2].save(path)
    return path


@pytest.mark.parametrize("extra,needle", [
    (["--steps", "-1"], "--steps must be between 0 and 100000, got -1"),
    (["--steps", "x"], "argument --steps: invalid int value"),
    (["--edges", "-2"], "--edges must be between 0 (all) and 100000, got -2"),
    (["--analyses", "faithfulness,bogus"], "--analyses: it must be 'all' or names among"),
    (["--analyses", "quotient,quotient"], "more than once"),
    (["--size", "32"], "--size/--preprocessing apply to --images DIR"),
    (["--size", "0", "--images", "."], "--size must be between 1 and 4096 pixels, got 0"),
    (["--images", "no-such-dir"], "--images 'no-such-dir' is not a folder"),
    (["--preprocessing", "jpeg"], "argument --preprocessing: invalid choice"),
])
def test_bad_options_are_refused_before_work(refused, chain_file, extra, needle):
    refused(["report", chain_file, "--out", "rep", *extra], needle)


def test_bad_destinations(refused, chain_file, tmp_path):
    (tmp_path / "a-file").write_text("x")
    refused(["report", chain_file, "--out", "a-file"], "--out 'a-file' exists and is not a folder")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused(["report", chain_file, "--out", "mine"], "(no nchains report.json in it; it holds 'notes.txt')",
            watch=[mine])
    refused(["report", chain_file, "--out", "."], "--out '.' is the current folder")
    refused(["report", chain_file], "the following arguments are required: --out")


def test_bad_chains_and_models(refused, chain_file, tmp_path):
    refused(["report", "missing.json", "--out", "rep"], "'missing.json' does not exist or is not a file")
    (tmp_path / "junk.json").write_text("{not json")
    refused(["report", "junk.json", "--out", "rep"], "is not a chain JSON file")
    data = json.loads(chain_file.read_text())
    data["kept"]["conv1"] = [999]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    refused(["report", "bad.json", "--out", "rep"], "kept['conv1']")
    refused(["report", chain_file, "--out", "rep"], "does not record its model; pass --model")
    refused(["report", chain_file, "--out", "rep", "--model", "default"], "the chain was extracted from another model")
    refused(["report", chain_file, "--out", "rep", "--weights", "w.pt"], "--weights")


def test_python_api_refusals(tmp_path):
    net, images, chain = _chain()
    out = tmp_path / "rep"
    cases = [
        (dict(out_dir=None), "out_dir is required"),
        (dict(actmax_steps=-1), "actmax_steps must be an int in [0, 100000], got -1"),
        (dict(top_k=0), "top_k must be"),
        (dict(edges_per_filter=0), "edges_per_filter must be an int >= 1 or None"),
        (dict(images=images[:, :, :4]), "images must have shape [N, 1, 8, 8]"),
        (dict(images=images * float("nan")), "non-finite"),
        (dict(analyses="bogus"), "which must be 'all' or names among"),
        (dict(images=None), "images is required: the chain does not record how its images were chosen"),
    ]
    for kw, needle in cases:
        args = {"out_dir": out, "images": images, "actmax_steps": 0, "progress": False, **kw}
        with pytest.raises(ValueError) as info:
            nchains.report(chain, net, **args)
        assert needle in str(info.value), (kw, str(info.value))
    with pytest.raises(TypeError, match="chain must be an nchains.Chain or the path"):
        nchains.report({"kept": {}}, net, out)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        nchains.report(chain, "net", out)
    assert not out.exists()
