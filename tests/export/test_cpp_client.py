"""The C++ client (tools/cpp_client) builds against the libtorch of the torch wheel, loads
chain.ts (torch::jit) or chain.aoti.pt2 (AOTIModelPackageLoader) and prints the same logits as
PyTorch: what a libtorch inference server does."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from nchains.export.exporter import export
from test_compact import make_chain, mixed_net

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools", "cpp_client")

pytestmark = pytest.mark.slow  # compiling against the libtorch headers takes a minute or more


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    if shutil.which("cmake") is None or shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("cmake and a C++ compiler are needed to build tools/cpp_client")
    build = tmp_path_factory.mktemp("build")
    configure = subprocess.run(["cmake", "-S", SOURCE, "-B", str(build), f"-DPYTHON={sys.executable}"],
                               capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compile_ = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=1800)
    assert compile_.returncode == 0, compile_.stdout[-3000:] + compile_.stderr[-3000:]
    exe = build / "nchains_client"
    assert exe.is_file()
    return exe


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = mixed_net()
    x = torch.randn(4, 3, 16, 16)
    chain = make_chain(model, x, seed=5, p_gate=1.0, p_dead=0.0)
    out = tmp_path_factory.mktemp("export")
    manifest = export(chain, model, out, formats="ts", images=x)
    return out / "chain.ts", manifest, chain, model


def _write_raw(path, x):
    with open(path, "wb") as f:
        f.write(b"NCT1" + struct.pack("<I", x.dim()) + struct.pack(f"<{x.dim()}q", *x.shape))
        f.write(x.contiguous().numpy().astype("<f4").tobytes())


def _run(exe, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("fmt", ["raw", "torch.save"])
def test_client_prints_pytorch_logits(client, artifact, tmp_path, fmt):
    path, _, chain, model = artifact
    x = torch.randn(5, 3, 16, 16)
    inp = tmp_path / "x.bin"
    if fmt == "raw":
        _write_raw(inp, x)
    else:
        torch.save(x, inp)
    got = torch.from_numpy(np.loadtxt(_run(client, path, inp).splitlines(), ndmin=2))
    with torch.no_grad():
        ts = torch.jit.load(str(path))(x).double()
        masked = chain.apply(model)(x).double()
    assert got.shape == (5, 7)
    assert float((got - ts).abs().max()) <= 1e-6 * float(ts.abs().max())  # printed with 9 digits
    assert float((got - masked).abs().max()) <= 1e-4 * float(masked.abs().max())
    assert torch.equal(got.argmax(1), masked.argmax(1))


def test_client_reads_metadata_and_rejects_bad_input(client, artifact, tmp_path):
    path, manifest, _, _ = artifact
    meta = json.loads(_run(client, path, "--metadata"))
    assert meta == json.loads(json.dumps({k: v for k, v in manifest.items() if k != "artifacts"}))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"NCT1\x04\x00\x00\x00" + b"\x01" * 7)
    proc = subprocess.run([str(client), str(path), str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "truncated" in proc.stderr


@pytest.fixture(scope="module")
def aoti_artifact(tmp_path_factory):
    model = mixed_net()
    x = torch.randn(4, 3, 16, 16)
    chain = make_chain(model, x, seed=5, p_gate=1.0, p_dead=0.0)
    out = tmp_path_factory.mktemp("export_aoti")
    manifest = export(chain, model, out, formats="aoti", images=x)
    return out / "chain.aoti.pt2", manifest, chain, model


@pytest.mark.parametrize("batch", [1, 6])
def test_client_runs_aoti_package(client, aoti_artifact, tmp_path, batch):
    """chain.aoti.pt2 through torch::inductor::AOTIModelPackageLoader: the logits of the
    package in Python and of the masked model, at batch 1 and larger (dynamic batch)."""
    path, _, chain, model = aoti_artifact
    x = torch.randn(batch, 3, 16, 16)
    inp = tmp_path / "x.bin"
    _write_raw(inp, x)
    got = torch.from_numpy(np.loadtxt(_run(client, path, inp).splitlines(), ndmin=2))
    with torch.no_grad():
        compiled = torch._inductor.aoti_load_package(str(path))(x).double()
        masked = chain.apply(model)(x).double()
    assert got.shape == (batch, 7)
    assert float((got - compiled).abs().max()) <= 1e-6 * float(compiled.abs().max())
    assert float((got - masked).abs().max()) <= 1e-4 * float(masked.abs().max())


def test_client_reads_aoti_metadata(client, aoti_artifact):
    path, manifest, _, _ = aoti_artifact
    meta = json.loads(_run(client, path, "--metadata"))
    assert meta == json.loads(json.dumps({k: v for k, v in manifest.items() if k != "artifacts"}))
