"""Exported artifacts load in real runtimes (without nchains), match the masked model, carry
their metadata, and are verified before anything is written; inspect detects tampering."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from nchains.export.exporter import ExportError, export
from nchains.export.artifacts import format_report, inspect_artifact, read_embedded
from test_compact import PoolHeadNet, PoolNet, make_chain, mixed_net, randomize

# the module itself: the package may re-export the function under the same name
export_mod = importlib.import_module("nchains.export.exporter")

FILES = {"torchscript": "chain.ts", "onnx": "chain.onnx", "pt2": "chain.pt2"}


def _strip(meta):
    return {k: v for k, v in meta.items() if k != "artifacts"}


@pytest.fixture(scope="module")
def setup():
    model = mixed_net()
    x = torch.randn(4, 3, 16, 16)
    chain = make_chain(model, x, seed=3, p_gate=1.0, p_dead=0.0)
    chain.class_names = [f"class{i}" for i in range(7)]
    return model, x, chain


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    model, x, chain = setup
    out = tmp_path_factory.mktemp("export")
    manifest = export(chain, model, out, images=x)
    return out, manifest


def _ref(setup, x):
    model, _, chain = setup
    with torch.no_grad():
        return chain.apply(model)(x)


def _close(got, ref):
    got = torch.as_tensor(got)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_files_and_manifest(exported, setup):
    out, manifest = exported
    assert sorted(os.listdir(out)) == ["chain.onnx", "chain.pt2", "chain.ts", "manifest.json"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    import hashlib

    for fmt, file in FILES.items():
        entry = manifest["artifacts"][fmt]
        data = (out / file).read_bytes()
        assert entry["file"] == file and entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        v = manifest["verification"]["formats"][fmt]
        assert v["passed"] and v["relative"] <= 1e-4 and v["argmax_agree"] == v["rows"]
        assert v["batch_sizes"] == [4, 8, 1]
    assert manifest["verification"]["inputs"]["images"]["count"] == 4
    _, _, chain = setup
    assert manifest["class_names"] == chain.class_names
    assert manifest["model_hash"] == chain.model_hash
    assert manifest["input"]["shape"] == [3, 16, 16] and manifest["input"]["batch"] == "dynamic"
    layer = manifest["layers"]["grp"]
    assert layer["kept"] == chain.kept["grp"] and layer["total"] == 24
    c = manifest["compact"]
    assert 0 < c["macs"] < c["original_macs"] and 0 < c["params"] < c["original_params"]


def test_metadata_embedded_in_every_artifact(exported):
    out, manifest = exported
    for fmt, file in FILES.items():
        assert read_embedded(out / file) == json.loads(json.dumps(_strip(manifest)))
    props = {p.key: p.value for p in onnx.load(str(out / "chain.onnx")).metadata_props}
    assert json.loads(props["nchains.json"])["class_names"] == manifest["class_names"]
    extra = {"nchains.json": ""}
    torch.jit.load(str(out / "chain.ts"), _extra_files=extra)
    assert json.loads(extra["nchains.json"])["model_hash"] == manifest["model_hash"]
    extra = {"nchains.json": ""}
    torch.export.load(str(out / "chain.pt2"), extra_files=extra)
    assert json.loads(extra["nchains.json"])["layers"] == manifest["layers"]


def test_onnx_runtime_and_checker(exported, setup):
    out, _ = exported
    proto = onnx.load(str(out / "chain.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert all("nchains" not in n.domain + n.op_type for n in proto.graph.node)
    sess = ort.InferenceSession(str(out / "chain.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randn(n, 3, 16, 16)
        _close(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], _ref(setup, x))


def test_onnx_convs_padded_to_channel_blocks(exported, setup):
    """The ONNX artifact's ungrouped convs have channel counts in blocks of 8 (onnxruntime's
    NCHWc kernels, and oneDNN's blocked kernels behind CPU PyTorch for the other formats); the
    zero channels are counted in each artifact's MACs, not in the compact model's."""
    out, manifest = exported
    proto = onnx.load(str(out / "chain.onnx"))
    weights = {t.name: list(t.dims) for t in proto.graph.initializer}
    shapes = [weights[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"
              and all(a.name != "group" or a.i == 1 for a in n.attribute)]
    assert shapes and all(o % 8 == 0 and (i % 8 == 0 or i == 3) for o, i, *_ in shapes)
    formats = manifest["verification"]["formats"]
    assert {f: formats[f]["channel_multiple"] for f in FILES} == {f: 8 for f in FILES}
    assert all(formats[f]["macs"] == formats["onnx"]["macs"] > manifest["compact"]["macs"] for f in FILES)
    ts = torch.jit.load(str(out / "chain.ts"))
    ts_convs = [m for _, m in ts.named_modules() if m.original_name == "Conv2d" and m.groups == 1]
    assert ts_convs and all(m.weight.shape[0] % 8 == 0 for m in ts_convs)


def test_max_pool_form_per_runtime(tmp_path):
    """Each artifact gets the faster exact form of max pooling for its runtime: slices and maxima
    for TorchScript and pt2 (CPU PyTorch's max_pool2d computes indices nobody asked for), the
    MaxPool op for onnxruntime; all three pass verification against the masked model."""
    model = randomize(PoolNet())
    x = torch.randn(4, 3, 20, 20)
    chain = make_chain(model, x, seed=1, p_dead=0.0, p_gate=1.0)
    manifest = export(chain, model, tmp_path, images=x)
    formats = manifest["verification"]["formats"]
    assert {f: formats[f]["max_pool"] for f in FILES} == {"torchscript": "separable", "onnx": "native",
                                                          "pt2": "separable"}
    pools = [n for n in onnx.load(str(tmp_path / "chain.onnx")).graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 5
    # no residual scatter in this graph: CPU PyTorch's artifacts run channels-last (NHWC weights)
    assert {f: formats[f]["memory_format"] for f in FILES} == {"torchscript": "channels_last",
                                                              "onnx": "contiguous", "pt2": "channels_last"}
    ts_weights = [p for name, p in torch.jit.load(str(tmp_path / "chain.ts")).named_parameters()
                  if p.dim() == 4]
    assert ts_weights and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                              for w in ts_weights)
    graph = str(torch.jit.load(str(tmp_path / "chain.ts")).inlined_graph)
    assert graph.count("aten::max_pool2d") == 1 and "aten::maximum" in graph  # the ceil-mode pool stays
    ep = torch.export.load(str(tmp_path / "chain.pt2"))
    assert sum("max_pool2d" in str(n.target) for n in ep.graph.nodes) == 1
    sess = ort.InferenceSession(str(tmp_path / "chain.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = chain.apply(model)(x)
    _close(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], ref)
    _close(ep.module()(x), ref)


def test_enlarging_pool_folded_in_every_format(tmp_path):
    """The 4x4 -> 7x7 adaptive pool folded into the Linear survives every exporter: the ONNX
    graph's first Gemm reads the 16 pixels of each (padded) channel, the artifacts agree with the
    masked model in onnxruntime and torch.export, and they hold fewer parameters than the
    exact-copies export that keeps the pool."""
    model = randomize(PoolHeadNet())
    x = torch.randn(4, 3, 8, 8)
    chain = make_chain(model, x, seed=2, p_dead=0.0, p_gate=1.0, kept={"conv2": [1, 4, 5, 9, 17, 20, 23]})
    manifest = export(chain, model, tmp_path / "fold", images=x)
    exact = export(chain, model, tmp_path / "exact", images=x, keep_scores=True)
    for f in FILES:
        assert manifest["verification"]["formats"][f]["params"] < exact["verification"]["formats"][f]["params"]
    graph = onnx.load(str(tmp_path / "fold" / "chain.onnx")).graph
    inits = {i.name: list(i.dims) for i in graph.initializer}
    gemms = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    assert [d for d in inits[gemms[0].input[1]] if d != 32] == [8 * 16]  # 7 kept + 1 pad channels
    assert not [n for n in graph.node if "Pool" in n.op_type]
    with torch.no_grad():
        ref = chain.apply(model)(x)
    sess = ort.InferenceSession(str(tmp_path / "fold" / "chain.onnx"), providers=["CPUExecutionProvider"])
    _close(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], ref)
    _close(torch.export.load(str(tmp_path / "fold" / "chain.pt2")).module()(x), ref)


def test_pt2_and_torchscript_load(exported, setup):
    out, _ = exported
    ep = torch.export.load(str(out / "chain.pt2"))
    assert all("nchains" not in str(n.target) for n in ep.graph.nodes)
    ts = torch.jit.load(str(out / "chain.ts"))
    for n in (1, 6):
        x = torch.randn(n, 3, 16, 16)
        ref = _ref(setup, x)
        _close(ep.module()(x), ref)
        _close(ts(x), ref)


def test_artifacts_load_without_nchains(exported, setup, tmp_path):
    out, _ = exported
    x = torch.randn(3, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, warnings
sys.modules["nchains"] = None  # any import of nchains now fails
warnings.simplefilter("ignore")
import torch, onnxruntime
x = torch.load({str(tmp_path / 'x.pt')!r})
a = torch.jit.load({str(out / 'chain.ts')!r})(x)
b = torch.export.load({str(out / 'chain.pt2')!r}).module()(x)
s = onnxruntime.InferenceSession({str(out / 'chain.onnx')!r}, providers=["CPUExecutionProvider"])
c = torch.from_numpy(s.run(None, {{s.get_inputs()[0].name: x.numpy()}})[0])
torch.save(torch.stack([a, b, c]), {str(tmp_path / 'y.pt')!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = _ref(setup, x)
    for y in torch.load(tmp_path / "y.pt"):
        _close(y, ref)


def test_keep_scores_export(tmp_path):
    model = mixed_net(seed=2)
    x = torch.randn(2, 3, 16, 16)
    chain = make_chain(model, x, seed=2)
    manifest = export(chain, model, tmp_path, formats="ts,pt2", keep_scores=True, n_random=3)
    assert sorted(manifest["artifacts"]) == ["pt2", "torchscript"]
    assert manifest["compact"]["keep_scores"] is True
    assert not (tmp_path / "chain.onnx").exists()
    ep = torch.export.load(str(tmp_path / "chain.pt2"))
    with torch.no_grad():
        _close(ep.module()(x), chain.apply(model)(x))


# ---- failure: nothing written -------------------------------------------------------------------

def test_failed_verification_writes_nothing(setup, tmp_path, monkeypatch):
    model, x, chain = setup
    good = export_mod._EXPORTERS["pt2"]

    def bad_load(data):
        run = good.load(data)
        return lambda t: run(t) * 1.01  # an exporter bug: 1% off

    monkeypatch.setitem(export_mod._EXPORTERS, "pt2", dataclasses.replace(good, load=bad_load))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"pt2 export failed verification.*max \|diff\|.*nothing was written"):
        export(chain, model, out, formats=("ts", "pt2"), images=x)
    assert not out.exists()
    # an existing export is left untouched
    out.mkdir()
    (out / "chain.ts").write_bytes(b"old")
    old_manifest = json.dumps({"format": "nchains.export", "artifacts": {"torchscript": {"file": "chain.ts"}}})
    (out / "manifest.json").write_text(old_manifest)
    with pytest.raises(ExportError):
        export(chain, model, out, formats="pt2", images=x)
    assert sorted(os.listdir(out)) == ["chain.ts", "manifest.json"] and (out / "chain.ts").read_bytes() == b"old"
    assert (out / "manifest.json").read_text() == old_manifest and os.listdir(tmp_path) == ["out"]


def test_exporter_exception_names_format(setup, tmp_path, monkeypatch):
    model, x, chain = setup
    good = export_mod._EXPORTERS["torchscript"]

    def broken(gm, example):
        raise RuntimeError("unsupported thing\nmore lines")

    monkeypatch.setitem(export_mod._EXPORTERS, "torchscript", dataclasses.replace(good, prepare=broken))
    with pytest.raises(ExportError, match="torchscript export failed: RuntimeError: unsupported thing; nothing"):
        export(chain, model, tmp_path / "o", formats="ts")
    assert not (tmp_path / "o").exists()


def test_bad_arguments(setup, tmp_path):
    model, x, chain = setup
    with pytest.raises(ValueError, match="formats: unknown format 'tflite'"):
        export(chain, model, tmp_path, formats="ts,tflite")
    with pytest.raises(ValueError, match="formats must name"):
        export(chain, model, tmp_path, formats=[])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out_dir .* is not a directory"):
        export(chain, model, tmp_path / "file")
    with pytest.raises(TypeError, match="out_dir"):
        export(chain, model, 3)
    with pytest.raises(ValueError, match=r"images must have shape \[N, 3, 16, 16\]"):
        export(chain, model, tmp_path, images=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="not an nchains export"):  # tmp_path holds a file of the user's
        export(chain, model, tmp_path)
    with pytest.raises(ValueError, match="class_names must have 7"):
        export(chain, model, tmp_path / "out", class_names=["a"])
    with pytest.raises(ValueError, match="n_random"):
        export(chain, model, tmp_path / "out", n_random=1)
    with pytest.raises(ValueError, match="hash"):
        export(chain, mixed_net(seed=1), tmp_path / "out")
    with pytest.raises(TypeError, match="chain"):
        export(None, model, tmp_path / "out")
    assert os.listdir(tmp_path) == ["file"]


# ---- inspect ------------------------------------------------------------------------------------

def test_inspect_reports_and_detects_tampering(exported, tmp_path):
    import shutil

    src, manifest = exported
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    report = inspect_artifact(out)
    assert report["ok"] and report["kind"] == "export"
    assert [c["status"] for c in report["checks"]] == ["verified"] * 3
    text = format_report(report)
    for needle in ("parameters", "MACs", "ratio", "class0", "grp", "verified", "status: OK"):
        assert needle in text
    for file in FILES.values():
        assert inspect_artifact(out / file)["ok"]

    data = bytearray((out / "chain.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "chain.onnx").write_bytes(bytes(data))
    report = inspect_artifact(out)
    assert not report["ok"]
    assert "TAMPERED" in next(c["status"] for c in report["checks"] if c["format"] == "onnx")
    assert not inspect_artifact(out / "chain.onnx")["ok"]
    assert inspect_artifact(out / "chain.ts")["ok"]

    # a manifest edited to lie (class names) no longer matches what the artifacts embed
    shutil.copy(src / "chain.onnx", out / "chain.onnx")
    edited = json.loads((out / "manifest.json").read_text())
    edited["class_names"][0] = "forged"
    (out / "manifest.json").write_text(json.dumps(edited))
    report = inspect_artifact(out)
    assert not report["ok"] and all("embedded metadata differs" in c["status"] for c in report["checks"])

    (out / "chain.pt2").unlink()
    assert "missing" in [c["status"] for c in inspect_artifact(out)["checks"]]


def test_cli_export_and_inspect(setup, tmp_path, capsys):
    cli = pytest.importorskip("nchains.cli")
    torch.manual_seed(0)
    model = randomize(torchvision.models.resnet18(num_classes=10))
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    x = torch.randn(2, 3, 32, 32)
    chain = make_chain(model, x, seed=1)
    chain.model_spec = {"kind": "torchvision", "name": "resnet18", "weights": str(weights), "num_classes": 10}
    chain.save(tmp_path / "chain.json")
    out = tmp_path / "out"
    assert cli.main(["export", str(tmp_path / "chain.json"), "--out", str(out), "--formats", "ts,pt2",
                     "--quiet", "--keep-scores"]) == 0
    assert sorted(os.listdir(out)) == ["chain.pt2", "chain.ts", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text())["compact"]["keep_scores"] is True
    assert cli.main(["inspect", str(out / "chain.ts")]) == 0
    assert "verified" in capsys.readouterr().out
    assert cli.main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    with open(out / "chain.pt2", "ab") as f:
        f.write(b"\0")
    assert cli.main(["inspect", str(out)]) == 1
    assert "TAMPERED" in capsys.readouterr().out
    # bad arguments: one line, exit code 2
    assert cli.main(["export", str(tmp_path / "chain.json"), "--out", str(out), "--formats", "tflite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--formats" in err
    assert cli.main(["export", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert cli.main(["export", str(tmp_path / "chain.json"), "--out", str(out), "--model",
                     "torchvision:resnet34"]) == 2
    assert "hash" in capsys.readouterr().err
