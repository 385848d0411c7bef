"""Critical-path files: a round trip gives the same path; every broken field is named."""

import io
import json
import os

import numpy as np
import pytest
import torch

import nchains
from nchains import zoo
from nchains.critical_paths import CriticalPath, select
from tests.critical_paths._helpers import neuron_mct, plain_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = zoo.default_model()
    x = zoo.default_images(["trouser"], per_class=1)[0]
    graph = nchains.analyze(model, x)
    scores, target = neuron_mct(graph, x)
    path = CriticalPath(model, x, select(scores, 0.95), target=target, method="mct", contributions=scores,
                        graph=graph, requested_sparsity=0.95)
    file = tmp_path_factory.mktemp("paths") / "path.npz"
    path.save(file)
    return path, file


def _rewrite(src, dst, meta=None, drop=(), add=None, replace=None):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    if meta is not None:
        m = json.loads(str(arrays["meta"]))
        meta(m)
        arrays["meta"] = np.array(json.dumps(m))
    arrays.update(add or {})
    arrays.update(replace or {})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    dst.write_bytes(buf.getvalue())
    return dst


def test_round_trip_gives_the_same_path(saved):
    path, file = saved
    back = CriticalPath.load(file)  # the shipped model, from the recorded spec
    assert (back.method, back.target, back.requested_sparsity) == ("mct", path.target, 0.95)
    assert back.sparsity == path.sparsity and back.n_kept == path.n_kept
    assert list(back.mask) == list(path.mask)
    assert all(torch.equal(back.mask[k], path.mask[k]) for k in path.mask)
    assert all(torch.equal(back.contributions[k], path.contributions[k]) for k in path.mask)
    assert torch.equal(back.image, path.image)
    assert torch.equal(back.attribution(), path.attribution())
    assert not [n for n in os.listdir(file.parent) if n.startswith(".")]  # no temporary file left
    path.save(file, contributions=False)
    assert CriticalPath.load(file, zoo.default_model()).contributions is None
    path.save(file)


@pytest.mark.parametrize("edit,needle", [
    (dict(meta=lambda m: m.update(version=2)), "version 2 is not supported; accepted: 1"),
    (dict(meta=lambda m: m.update(format="nchains.chain")), "meta.format must be 'nchains-critical-path'"),
    (dict(meta=lambda m: m.update(target="7")), "meta.target must be an int"),
    (dict(meta=lambda m: m.update(sparsity=1.5)), "meta.sparsity must be a number in [0, 1]"),
    (dict(meta=lambda m: m["sites"][3].update(key="layer9.relu")), "unknown site 'layer9.relu'"),
    (dict(meta=lambda m: m["sites"].reverse()), "in execution order"),
    (dict(meta=lambda m: m["sites"][0].update(shape=[16, 27, 28])), "meta.sites[0].shape [16, 27, 28]"),
    (dict(meta=lambda m: m["sites"][1].update(kept=-1)), "meta.sites[1].kept -1"),
    (dict(meta=lambda m: m.update(model_hash="0" * 64)), "model does not match the path file"),
    (dict(drop=("mask_2",)), "missing 'mask_2'"),
    (dict(add={"extra": np.zeros(1)}), "unexpected 'extra'"),
    (dict(replace={"mask_0": np.zeros((16, 28, 28), dtype=np.uint8)}), "mask_0 ('relu') must be bool"),
    (dict(replace={"mask_0": np.zeros((16, 28), dtype=bool)}), "mask_0 ('relu') must be bool of shape"),
    (dict(replace={"image": np.full((1, 1, 28, 28), np.nan, dtype=np.float32)}), "image contains NaN"),
    (dict(replace={"contrib_0": np.full((16, 28, 28), np.inf, dtype=np.float32)}), "contrib_0 ('relu') must be"),
])
def test_broken_files_are_refused_naming_the_field(saved, tmp_path, edit, needle):
    _, file = saved
    bad = _rewrite(file, tmp_path / "bad.npz", **edit)
    with pytest.raises(ValueError) as info:
        CriticalPath.load(bad)
    assert needle in str(info.value)


def test_not_a_path_file_and_another_model(saved, tmp_path):
    _, file = saved
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a critical-path file"):
        CriticalPath.load(junk)
    with pytest.raises(ValueError, match="model does not match"):
        CriticalPath.load(file, zoo.fashion_resnet())
    model = plain_cnn()
    x = torch.randn(1, 1, 8, 8)
    own = CriticalPath(model, x, select(neuron_mct(nchains.analyze(model, x), x)[0], 0.5), target=0, method="mct")
    own.save(tmp_path / "own.npz")
    with pytest.raises(ValueError, match="other than the shipped one: pass model="):
        CriticalPath.load(tmp_path / "own.npz")
    assert CriticalPath.load(tmp_path / "own.npz", model).n_kept == own.n_kept
