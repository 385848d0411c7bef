"""A critical path's linear model exported through the verified exporter runs the same in onnxruntime."""

import json

import pytest
import torch

import nchains
from nchains import zoo
from nchains.critical_paths import CriticalPath, select
from tests.critical_paths._helpers import neuron_mct

pytestmark = pytest.mark.usefixtures("one_thread")


def test_exported_linear_model_matches_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = zoo.default_model()
    x = zoo.default_images(["pullover"], per_class=1)[0]
    graph = nchains.analyze(model, x)
    scores, target = neuron_mct(graph, x)
    path = CriticalPath(model, x, select(scores, 0.9), target=target, method="mct", graph=graph)
    manifest = path.export(tmp_path / "out", formats="onnx")
    assert manifest["kind"] == "module" and manifest["critical_path"]["kept"] == path.n_kept
    assert manifest["verification"]["formats"]["onnx"]["passed"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["artifacts"]["onnx"]["file"] == "chain.onnx"
    session = ort.InferenceSession(str(tmp_path / "out" / "chain.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    probe = torch.cat([x, x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))])
    got = torch.from_numpy(session.run(None, {name: probe.numpy()})[0])
    with torch.no_grad():
        want = path.linear_model()(probe)
        original = model(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert torch.allclose(got[:1], original, rtol=1e-4, atol=1e-4 * float(original.abs().max()))
    # an existing folder that is not an export is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an nchains export"):
        path.export(tmp_path / "mine", formats="onnx")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
