"""The export formats: names and aliases, reproducible bytes, which runtime loads which file,
MACs (not "FLOPs"), and the AOTInductor package (slow: it compiles C++)."""

import hashlib
import importlib
import inspect
import io
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

from nchains.export._archive import canonical_archive
from nchains.export.artifacts import FILES, RUNTIMES, format_report, inspect_artifact, model_stats, read_embedded
from nchains.export.exporter import export
from test_compact import make_chain, mixed_net

formats_mod = importlib.import_module("nchains.export.formats")
exporter_mod = importlib.import_module("nchains.export.exporter")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Small(nn.Module):
    """Conv, BatchNorm, Linear: module classes whose TorchScript code carries Final constants."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _graph():
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(Small().eval())  # a new GraphModule class, new fx code name


# ---- names --------------------------------------------------------------------------------

def test_format_names_and_defaults():
    assert {k: v for k, v in formats_mod.FORMATS.items() if v == "aoti"} == {"aoti": "aoti", "aotinductor": "aoti"}
    assert exporter_mod._formats("ts, AOTInductor,pt2") == ("torchscript", "aoti", "pt2")
    assert set(formats_mod._EXPORTERS) == set(FILES) == set(RUNTIMES)
    assert exporter_mod._EXPORTERS is formats_mod._EXPORTERS  # tests and tools patch it there
    assert FILES["aoti"] == "chain.aoti.pt2"
    # compiling C++ takes minutes: aoti is never a default
    assert inspect.signature(export).parameters["formats"].default == ("torchscript", "onnx", "pt2")
    from nchains.cli import export as cli_export

    assert cli_export._DEFAULT_FORMATS == "ts,onnx,pt2"
    with pytest.raises(ValueError, match="unknown format 'tflite'.*aoti"):
        exporter_mod._formats("ts,tflite")


# ---- reproducible bytes: the sources, one by one -------------------------------------------

def _serialized(fmt, x, times):
    """(bytes of ``times`` exports of a fresh fx graph each, the last graph)."""
    exporter, blobs = formats_mod._EXPORTERS[fmt], []
    for _ in range(times):
        gm = _graph()
        program, _ = exporter.prepare(gm, x)
        blobs.append(exporter.serialize(program, "{}"))
    return blobs, gm


def test_torchscript_bytes_do_not_depend_on_earlier_exports():
    """The second scripting in a process mangles class names and counts fx code names further;
    the serialized archive is the same bytes anyway, and it loads and computes the same."""
    x = torch.randn(2, 3, 8, 8)
    blobs, gm = _serialized("torchscript", x, 3)
    assert len({_sha(b) for b in blobs}) == 1
    loaded = torch.jit.load(io.BytesIO(blobs[-1]))
    assert torch.equal(loaded(x), gm(x))
    names = zipfile.ZipFile(io.BytesIO(blobs[-1])).namelist()
    assert not [n for n in names if "___torch_mangle" in n and "graph_module" in n]
    debug = b"".join(zipfile.ZipFile(io.BytesIO(blobs[-1])).read(n) for n in names if n.endswith(".debug_pkl"))
    assert b"<eval_with_key>.0" in debug  # renumbered, not dropped


def test_pt2_bytes_do_not_depend_on_object_addresses():
    x = torch.randn(2, 3, 8, 8)
    blobs, gm = _serialized("pt2", x, 2)
    assert blobs[0] == blobs[1]
    model_json = zipfile.ZipFile(io.BytesIO(blobs[0])).read("archive/models/model.json")
    assert b" at 0x" not in model_json and b"graph_id" not in model_json
    assert torch.equal(torch.export.load(io.BytesIO(blobs[0])).module()(x), gm(x))


_CHILD = """
import hashlib, sys
sys.path.insert(0, {tests!r})
import importlib, torch
from test_formats import _graph
f = importlib.import_module("nchains.export.formats")
x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # pt2 stores its example input
ts, _ = f._ts_prepare(_graph(), x)
pt2, _ = f._pt2_prepare(_graph(), x)
print(hashlib.sha256(f._ts_serialize(ts, "{{}}")).hexdigest(), hashlib.sha256(f._pt2_serialize(pt2, "{{}}")).hexdigest())
"""


def test_bytes_do_not_depend_on_the_hash_seed():
    """TorchScript writes a module's constants in set order (PYTHONHASHSEED): two processes with
    different seeds write the same archives."""
    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    outs = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": os.pathsep.join(
            [os.path.join(ROOT, "tests", "compact"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.add(proc.stdout.split("\n")[-2])
    assert len(outs) == 1


def test_canonical_archive_sorts_constants_keeping_offsets():
    """Constant lines are sorted within their run (same bytes in total, so the debug ranges
    after them still point at the same code), and the archive still loads."""
    gm = _graph()
    module, _ = formats_mod._ts_prepare(gm, torch.randn(1, 3, 8, 8))
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    raw = buf.getvalue()
    out = canonical_archive(raw)
    a, b = zipfile.ZipFile(io.BytesIO(raw)), zipfile.ZipFile(io.BytesIO(out))
    assert a.namelist() == b.namelist()
    for name in a.namelist():
        old, new = a.read(name), b.read(name)
        assert len(old) == len(new) or name.endswith("serialization_id") or name.endswith(".debug_pkl")
        if name.endswith(".py"):
            finals = [line for line in new.split(b"\n") if b": Final[" in line]
            assert finals == sorted(finals) and sorted(old.split(b"\n")) == sorted(new.split(b"\n"))
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(torch.jit.load(io.BytesIO(out))(x), gm(x))


# ---- a full export -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
    model = mixed_net()
    x = torch.randn(4, 3, 16, 16)
    chain = make_chain(model, x, seed=3, p_gate=1.0, p_dead=0.0)
    return model, x, chain


@pytest.fixture(scope="module")
def twice(setup, tmp_path_factory):
    model, x, chain = setup
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    return (a, export(chain, model, a, images=x)), (b, export(chain, model, b, images=x))


def test_exports_are_reproducible_byte_for_byte(twice):
    (a, ma), (b, mb) = twice
    for fmt in ("torchscript", "onnx", "pt2"):
        data_a, data_b = (a / FILES[fmt]).read_bytes(), (b / FILES[fmt]).read_bytes()
        assert data_a == data_b, fmt
        assert ma["artifacts"][fmt]["sha256"] == mb["artifacts"][fmt]["sha256"] == _sha(data_a)
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


def test_manifest_and_inspect_name_the_runtime(twice):
    (a, manifest), _ = twice
    for fmt, entry in manifest["artifacts"].items():
        assert entry["runtime"] == RUNTIMES[fmt]["runtime"] and entry["load"] == RUNTIMES[fmt]["load"]
    assert manifest["artifacts"]["onnx"]["load"] == "onnxruntime.InferenceSession(path)"
    assert "deprecated" in manifest["artifacts"]["torchscript"]["runtime"]
    text = format_report(inspect_artifact(a))
    for fmt in ("torchscript", "onnx", "pt2"):
        assert f"load: {RUNTIMES[fmt]['load']}" in text
    one = format_report(inspect_artifact(a / "chain.pt2"))
    assert "load: torch.export.load(path).module()" in one


def test_macs_counted_and_named(twice, setup, tmp_path):
    """model_stats counts multiply-accumulates (checked against the closed form of a conv and a
    linear layer); the manifest and inspect call them MACs; an older manifest's "flops" keys
    are still read."""
    net = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1, groups=1), nn.Flatten(), nn.Linear(5 * 4 * 4, 7))
    stats = model_stats(net, (3, 8, 8))
    assert stats["macs"] == 5 * 4 * 4 * (3 * 3 * 3) + 7 * 80 and "flops" not in stats
    grouped = model_stats(nn.Conv2d(4, 6, 3, groups=2), (4, 5, 5))["macs"]
    assert grouped == 6 * 3 * 3 * (2 * 3 * 3)
    (a, manifest), _ = twice
    c = manifest["compact"]
    assert {"macs", "original_macs", "macs_ratio"} <= set(c) and not [k for k in c if "flops" in k]
    model, _, _ = setup
    assert c["original_macs"] == model_stats(model, (3, 16, 16))["macs"]
    assert c["macs_ratio"] == pytest.approx(c["macs"] / c["original_macs"])
    assert all("flops" not in v for v in manifest["verification"]["formats"].values())
    assert "MACs" in format_report(inspect_artifact(a)) and "FLOPs" not in format_report(inspect_artifact(a))
    old = json.loads((a / "manifest.json").read_text())
    old["compact"] = {k.replace("macs", "flops"): v for k, v in old["compact"].items()}
    for entry in old["artifacts"].values():
        entry.pop("runtime"), entry.pop("load")
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(old))
    text = format_report(inspect_artifact(folder))
    expected = next(line for line in format_report(inspect_artifact(a)).splitlines() if line.startswith("MACs"))
    assert expected in text.splitlines()  # same figures from the old keys
    assert f"load: {RUNTIMES['onnx']['load']}" in text  # runtimes of this version for an older manifest


# ---- AOTInductor --------------------------------------------------------------------------

def test_aoti_exporter_on_a_small_graph(tmp_path):
    """The one default AOTInductor test (~35-60 s on 2 cores: one C++ compile): the package
    runs batch 1 and larger, holds the metadata as extra/nchains.json, is recognised by
    its contents whatever its name, and adding the metadata keeps the compiled library."""
    gm = _graph()
    exporter = formats_mod._EXPORTERS["aoti"]
    package, how = exporter.prepare(gm, torch.randn(2, 3, 8, 8))
    assert how == "torch._inductor.aoti_compile_and_package"
    exporter.plain(package)
    data = exporter.serialize(package, json.dumps({"format": "test"}))
    run = exporter.load(data)
    for n in (1, 9):
        x = torch.randn(n, 3, 8, 8)
        with torch.no_grad():
            ref = gm(x)
        assert float((run(x) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    original, ours = zipfile.ZipFile(io.BytesIO(package.data)), zipfile.ZipFile(io.BytesIO(data))
    so = [n for n in original.namelist() if n.endswith(".so")]  # "<archive name>/data/aotinductor/model/*.so"
    assert so and all(ours.read("archive/" + n.split("/", 1)[1]) == original.read(n) for n in so)
    (tmp_path / "renamed.bin").write_bytes(data)
    assert read_embedded(tmp_path / "renamed.bin") == {"format": "test"}
    assert exporter.serialize(package, json.dumps({"format": "test"})) == data


@pytest.fixture(scope="module")
def aoti(setup, tmp_path_factory):
    model, x, chain = setup
    out = tmp_path_factory.mktemp("aoti")
    return out, export(chain, model, out, formats="aoti", images=x)


@pytest.mark.slow
def test_aoti_package_verified_and_loaded(aoti, setup):
    out, manifest = aoti
    model, _, chain = setup
    assert sorted(os.listdir(out)) == ["chain.aoti.pt2", "manifest.json"]
    v = manifest["verification"]["formats"]["aoti"]
    assert v["passed"] and 1 in v["batch_sizes"] and max(v["batch_sizes"]) >= 8
    assert v["exporter"] == "torch._inductor.aoti_compile_and_package"
    data = (out / "chain.aoti.pt2").read_bytes()
    assert manifest["artifacts"]["aoti"]["sha256"] == _sha(data)
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert any(n.endswith(".so") and "/data/aotinductor/model/" in n for n in names)
    assert read_embedded(out / "chain.aoti.pt2") == {k: v for k, v in manifest.items() if k != "artifacts"}
    report = inspect_artifact(out)
    assert report["ok"] and "AOTIModelPackageLoader" in format_report(report)
    compiled = torch._inductor.aoti_load_package(str(out / "chain.aoti.pt2"))
    for n in (1, 3, 8):  # dynamic batch
        x = torch.randn(n, 3, 16, 16)
        with torch.no_grad():
            ref = chain.apply(model)(x)
        got = compiled(x)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.slow
def test_aoti_package_reproducible(aoti, setup, tmp_path):
    """A second export (another compile, the same chain) gives the same package bytes."""
    out, manifest = aoti
    model, x, chain = setup
    again = export(chain, model, tmp_path, formats="aoti", images=x)
    assert again["artifacts"]["aoti"]["sha256"] == manifest["artifacts"]["aoti"]["sha256"]
    assert (tmp_path / "chain.aoti.pt2").read_bytes() == (out / "chain.aoti.pt2").read_bytes()
