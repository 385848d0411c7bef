"""`nchains analyze` refuses bad input with one line and exit code 2, before any work and
without leaving files behind."""

from __future__ import annotations

import pytest

from _analyses_cli_chain import write_chain


@pytest.fixture(scope="module")
def chain_file(tmp_path_factory):
    return write_chain(tmp_path_factory.mktemp("analyze_chain"))


ARGS = [
    (["--which", "quotient,typo", "--json"], "which must be 'all' or names among fidelity"),
    (["--which", "quotient,quotient", "--json"], "must not repeat an analysis"),
    (["--sweep", "0.01,x", "--json"], "--sweep must be a comma-separated list of numbers"),
    (["--sweep", "0.01,-0.5", "--json"], "--sweep[1] must be a number >= 0"),
    (["--sweep", " , ", "--json"], "--sweep must be a comma-separated list of numbers"),
    (["--ks", "20,0", "--json"], "--ks[1] must be an int >= 1"),
    (["--ks", "20,2.5", "--json"], "--ks must be a comma-separated list of integers"),
    (["--eps", "nan", "--json"], "--eps must be a number >= 0 (finite)"),
    (["--eps", "-0.1", "--json"], "--eps must be a number >= 0"),
    (["--pgd-steps", "0", "--json"], "--pgd-steps must be an int >= 1"),
    (["--seed", "-1", "--json"], "--seed must be an int in [0, 2**63)"),
    (["--batch-size", "0", "--json"], "--batch-size must be an int >= 1"),
    (["--sweep-steps", "-3", "--sweep", "0.01", "--json"], "--sweep-steps must be an int >= 0"),
    (["--pool", "no/such/folder", "--json"], "--pool 'no/such/folder' is not sample, test or a folder"),
    (["--size", "32", "--json"], "--size/--preprocessing apply to --images DIR or --pool DIR"),
    (["--size", "0", "--images", ".", "--json"], "--size must be between 1 and 4096"),
    (["--json", "--out", "x"], "not allowed with argument"),
    ([], "one of the arguments --json --out is required"),
]


@pytest.mark.parametrize("extra,needle", ARGS, ids=[" ".join(a) or "no-output" for a, _ in ARGS])
def test_bad_options(refused, chain_file, extra, needle):
    refused(["analyze", chain_file, *extra], needle)


def test_missing_chain_file(refused):
    refused(["analyze", "missing.json", "--json"], "'missing.json' does not exist or is not a file")


def test_not_a_chain(refused, tmp_path):
    (tmp_path / "notes.json").write_text('{"format": "something else"}')
    refused(["analyze", str(tmp_path / "notes.json"), "--json"], "not an nchains chain")


def test_out_is_a_file(refused, chain_file, tmp_path):
    (tmp_path / "taken").write_text("mine")
    refused(["analyze", chain_file, "--out", str(tmp_path / "taken")], "exists and is not a folder")


def test_out_holds_other_files(refused, chain_file, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    (out / "results.json").write_text("{}")
    refused(["analyze", chain_file, "--out", str(out)],
            "(its results.json is not an nchains analyze index; it holds 'thesis.tex')", watch=[out])
    assert (out / "thesis.tex").read_text() == "keep me"


def test_ks_beyond_the_pool(refused, chain_file):
    refused(["analyze", chain_file, "--which", "stability", "--ks", "20,5000", "--json", "--quiet"],
            "ks must be <= the held-out pool's size 996")


def test_wrong_model(refused, chain_file, tmp_path):
    import torch

    from nchains.models import zoo

    model = zoo.default_model()
    state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "other.pt")
    refused(["analyze", chain_file, "--model", "torchvision:resnet18", "--weights", str(tmp_path / "other.pt"),
             "--json"], "--weights")
