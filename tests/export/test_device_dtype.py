"""Device and dtype follow the model: a float64 model end to end (extract -> apply -> compact ->
export ts + pt2) as the proxy for any device, and the same on CUDA (``@pytest.mark.cuda``:
skipped on machines without a device)."""

import json
import zipfile

import pytest
import torch
from torch import nn

import nchains
from nchains._util.device import example_input, full_precision, model_device_dtype
from nchains.neurochains import phase
from _models import random_digits_net
from test_one_analysis import EXTRACT


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def _load_artifacts(out):
    """The exported TorchScript and pt2 models, loaded on the CPU from their files."""
    ts = torch.jit.load(str(out / "chain.ts"), map_location="cpu")
    pt2 = torch.export.load(str(out / "chain.pt2")).module()
    return ts, pt2


def test_full_precision_turns_tf32_off_and_restores_it():
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with full_precision():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.conv.fp32_precision != "tf32"
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_model_device_dtype():
    assert model_device_dtype(nn.ReLU()) == (torch.device("cpu"), torch.float32)
    assert model_device_dtype(nn.Linear(2, 3).double()) == (torch.device("cpu"), torch.float64)
    bn = nn.BatchNorm2d(3).double()  # the dtype is the float parameters', not num_batches_tracked's
    assert model_device_dtype(bn)[1] == torch.float64
    x = example_input(nn.Conv2d(1, 2, 3).double(), [1, 5, 5], batch=2)
    assert x.shape == (2, 1, 5, 5) and x.dtype == torch.float64 and not x.any()
    split = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"model has parameters or buffers on several devices \(cpu, meta\)"):
        model_device_dtype(split)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        model_device_dtype("model")


def _end_to_end(model: nn.Module, images: torch.Tensor, out, rtol: float):
    """extract -> apply -> compact -> export ts + pt2 on ``model``'s device and dtype; checks every
    stage's outputs and where they live; returns the chain, the masked and the compact model."""
    device, dtype = model_device_dtype(model)
    chain = nchains.extract(model, images, **EXTRACT)
    assert chain.metrics["steps_run"] == EXTRACT["steps"] and chain.metrics["filters_kept"] > 0
    masked = chain.apply(model)
    small = nchains.compact(chain, model, channel_multiple=8)
    assert {p.device for p in [*small.parameters(), *small.buffers()]} == {device}
    assert {p.dtype for p in small.parameters()} == {dtype}
    x = torch.randn(5, *chain.input_shape, dtype=dtype, device=device)
    with full_precision(), torch.no_grad():  # no TF32 convs on a GPU: both exact
        want, got = masked(x), small(x)
    assert want.dtype == got.dtype == dtype and got.device == want.device == x.device
    assert _relative(got, want) < rtol
    manifest = nchains.export(chain, model, out, ("ts", "pt2"), images=images)
    assert manifest["input"]["dtype"] == str(dtype).replace("torch.", "")
    assert all(check["passed"] for check in manifest["verification"]["formats"].values())
    with torch.no_grad():
        for artifact in _load_artifacts(out):
            y = artifact(x.cpu())
            assert y.dtype == dtype and y.device.type == "cpu"
            assert _relative(y, want.cpu()) < rtol
    return chain, masked, small


def test_float64_model_end_to_end(tmp_path):
    model = random_digits_net().double()
    images = _images().double()
    chain, masked, small = _end_to_end(model, images, tmp_path / "out", rtol=1e-12)
    assert masked.flat_scores.dtype == torch.float64
    # float64 all the way: the compact model agrees far beyond float32 rounding
    ref32 = random_digits_net()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert _relative(small(x), masked(x)) < 1e-12
        assert _relative(ref32(x.float()), model(x)) > 1e-9  # float32 would not pass that bound
    with zipfile.ZipFile(tmp_path / "out" / "chain.pt2") as z:
        meta = json.loads(next(z.read(n) for n in z.namelist() if n.endswith("nchains.json")))
    assert meta["input"]["dtype"] == "float64"


@pytest.mark.cuda
def test_cuda_model_end_to_end(tmp_path):
    model = random_digits_net().cuda()
    images = _images().cuda()
    chain, masked, small = _end_to_end(model, images, tmp_path / "out", rtol=1e-4)
    assert masked.flat_scores.device.type == "cuda"
    assert next(small.parameters()).device.type == "cuda"
    # the chain's hashes do not depend on the device
    assert chain.images_hash == nchains.extract(model.cpu(), images.cpu(), **EXTRACT).images_hash


@pytest.mark.cuda
def test_cuda_batched_reads_give_the_chain_of_reading_every_step(monkeypatch):
    model = random_digits_net().cuda()
    images = _images().cuda()
    kw = dict(EXTRACT, steps=40, stop_window=3, stop_delta=1e9)  # stops at step 4, between two reads
    assert phase.sync_interval(images.device) > 4
    batched = nchains.extract(model, images, **kw)
    monkeypatch.setattr(phase, "sync_interval", lambda device: 1)
    every = nchains.extract(model, images, **kw)
    assert batched.metrics["steps_run"] == every.metrics["steps_run"] == 4
    # GPU reductions may round differently from run to run; 6 steps past the stop would move
    # the scores by ~6 lr = 0.03, far beyond this tolerance
    assert batched.kept == every.kept
    for name, values in every.scores.items():
        assert batched.scores[name] == pytest.approx(values, rel=1e-5, abs=1e-6)
    assert batched.history["scoring"] == pytest.approx(every.history["scoring"], rel=1e-5)


@pytest.mark.cuda
def test_cuda_compact_is_the_cpu_compact_moved():
    model = random_digits_net()
    images = _images()
    chain = nchains.extract(model, images, **EXTRACT)
    cpu = nchains.compact(chain, model)
    gpu = nchains.compact(chain, model.cuda())
    x = torch.randn(4, 1, 8, 8)
    with full_precision(), torch.no_grad():
        assert _relative(gpu(x.cuda()).cpu(), cpu(x)) < 1e-4
    assert str(cpu.code) == str(gpu.code)
