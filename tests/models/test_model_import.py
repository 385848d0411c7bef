"""--model FILE: torch.export / TorchScript files rebuilt as analysable modules."""

import io
import json
import os
import zipfile

import pytest
import torch
import torch._export.converter
import torch.nn.functional as F
import torchvision
from torch import fx, nn

from nchains.models.file_import import convert_torchscript
from nchains.graph.analysis import analyze
from nchains.models.file_import import load_model_file, looks_like_model_file

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated

STANDARD = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
            nn.Dropout, nn.Sequential, fx.GraphModule)


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class SmallCNN(nn.Module):
    """A user CNN: a Sequential stem, a residual add, a channel concat, functional relu."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.side = nn.Conv2d(8, 4, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        a = self.stem(x)
        b = F.relu(self.bn2(self.conv2(a)) + a)
        c = self.pool(torch.cat([b, self.side(a)], 1))
        return self.fc(c.view(c.size(0), -1).view(c.size(0), 12, -1).mean(2))


def _summary(g):
    return (list(g.layers), dict(g.label_of),
            [(r.name, r.kind, r.units) for r in g.regions.values()],
            [a.producers for a in g.adds], [c.channels for c in g.concats], g.classifier)


def _assert_same(model, original, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = model(x), original(x)
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-6


def _assert_standard(model):
    for name, m in model.named_modules():
        if name and next(m.parameters(recurse=False), None) is not None:
            assert isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)), name
    fx.symbolic_trace(model)  # traceable again, standard layers as leaves


def _save(model, x, kind, path):
    if kind == "export":
        torch.export.save(torch.export.export(model, (x,)), path)
    elif kind == "script":
        torch.jit.save(torch.jit.script(model), path)
    else:
        torch.jit.save(torch.jit.trace(model, x), path)
    return path


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return _randomize_bn(torchvision.models.resnet18(num_classes=10))


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return _randomize_bn(SmallCNN())


# ---- torch.export -----------------------------------------------------------------------------

def test_export_resnet18(resnet18, tmp_path):
    x = torch.randn(1, 3, 64, 64)
    model = load_model_file(_save(resnet18, x, "export", tmp_path / "r18.pt2"))
    _assert_same(model, resnet18, (3, 3, 64, 64))  # exported at batch 1, runs at any batch
    _assert_standard(model)
    conv = model.get_submodule("layer4.0.conv2")
    assert isinstance(conv, nn.Conv2d) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert torch.equal(conv.weight, resnet18.layer4[0].conv2.weight)
    bn = model.get_submodule("layer2.0.downsample.1")
    assert isinstance(bn, nn.BatchNorm2d) and not bn.training
    assert torch.equal(bn.running_var, resnet18.layer2[0].downsample[1].running_var)
    assert isinstance(model.layer1, nn.Sequential) and model.nchains_input_shape == (1, 3, 64, 64)

    g = analyze(model, x)
    assert g.label_of["layer4.0.conv2"] == "L4B1C2" and g.label_of["conv1"] == "Conv1"
    assert g.label_of["layer2.0.downsample.0"] == "L2B1SC"
    blocks = ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]  # no downsample
    assert [(r.name, r.kind) for r in g.regions.values()] == [(b, "block") for b in blocks]
    assert g.regions["layer3.1"].label == "L3B2"
    assert _summary(g) == _summary(analyze(resnet18, x))


def test_export_vgg11_bn(tmp_path):
    torch.manual_seed(0)
    vgg = _randomize_bn(torchvision.models.vgg11_bn(num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    model = load_model_file(_save(vgg, x, "export", tmp_path / "vgg.pt2"))
    _assert_same(model, vgg, (2, 3, 32, 32))
    _assert_standard(model)
    assert isinstance(model.features, nn.Sequential) and isinstance(model.classifier[2], nn.Dropout)
    g = analyze(model, x)
    assert g.label_of["features.0"] == "L0" and g.label_of["features.25"] == "L25"
    assert g.label_of["classifier.6"] == "FC3" and g.classifier == "classifier.6"
    assert _summary(g) == _summary(analyze(vgg, x))


def test_export_user_cnn_with_dynamic_batch(small_cnn, tmp_path):
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(small_cnn, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, tmp_path / "cnn.pt2")
    model = load_model_file(tmp_path / "cnn.pt2")
    _assert_same(model, small_cnn, (5, 3, 8, 8))
    _assert_standard(model)
    g = analyze(model, x)
    assert [a.producers for a in g.adds] == [("conv2", "stem.0")]
    assert [c.channels for c in g.concats] == [(8, 4)]
    assert g.label_of["stem.0"] == "L0" and set(g.layers) == {"stem.0", "conv2", "side"}
    assert _summary(g) == _summary(analyze(small_cnn, x))


def test_export_block_called_twice_and_functional_conv(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(x)) + x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.block = Block()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.block(self.block(F.conv2d(x, self.weight, padding=1)))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    net = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    model = load_model_file(_save(net, x, "export", tmp_path / "net.pt2"))
    _assert_same(model, net, (2, 3, 8, 8))
    assert isinstance(model.block, fx.GraphModule) and isinstance(model.block.conv, nn.Conv2d)
    g = analyze(model, x)
    # the functional conv becomes a Conv2d next to its weight: analysable, unlike the original
    assert set(g.layers) == {"weight_conv2d", "block.conv", "block.conv@1"}
    assert list(g.regions) == ["block", "block@1"]
    with pytest.raises(ValueError, match="parameter 'weight' is used directly"):
        analyze(net, x)


class AliasNet(nn.Module):
    """``y.relu_()`` also changes the view ``v`` taken before it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        y = self.conv(x)
        v = torch.flatten(y, 1)
        y.relu_()
        return self.fc(v)


def test_export_inplace_op_on_aliased_value_is_functionalised(tmp_path, monkeypatch):
    calls = []
    decompose = torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda self, *a, **k: calls.append(1) or decompose(self, *a, **k))
    net = AliasNet().eval()
    model = load_model_file(_save(net, torch.randn(1, 3, 4, 4), "export", tmp_path / "a.pt2"))
    assert calls and isinstance(model.fc, nn.Linear)
    _assert_same(model, net, (3, 3, 4, 4))


# ---- TorchScript ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["script", "trace"])
def test_torchscript_user_cnn(small_cnn, tmp_path, kind):
    x = torch.randn(2, 3, 8, 8)
    model = load_model_file(_save(small_cnn, x, kind, tmp_path / "cnn.pt"), example_input=x)
    _assert_same(model, small_cnn, (3, 3, 8, 8))
    _assert_standard(model)
    g = analyze(model, x)
    assert _summary(g) == _summary(analyze(small_cnn, x))


@pytest.mark.parametrize("kind", ["script", pytest.param("trace", marks=pytest.mark.slow)])
def test_torchscript_resnet18(resnet18, tmp_path, kind):
    x = torch.randn(1, 3, 64, 64)
    model = load_model_file(_save(resnet18, x, kind, tmp_path / "r18.ts"), example_input=x)
    _assert_same(model, resnet18, (2, 3, 64, 64))
    _assert_standard(model)
    g = analyze(model, x)
    assert g.label_of["layer4.0.conv2"] == "L4B1C2" and g.label_of["conv1"] == "Conv1"
    assert _summary(g) == _summary(analyze(resnet18, x))


def test_torchscript_without_module_path_tags(small_cnn, tmp_path, monkeypatch):
    """If the private converter API changes, the plain converter still gives layers named
    by their weights (no block structure)."""
    monkeypatch.setattr(convert_torchscript, "_tagging_converter", lambda: None)
    x = torch.randn(2, 3, 8, 8)
    model = load_model_file(_save(small_cnn, x, "script", tmp_path / "cnn.pt"), example_input=x)
    _assert_same(model, small_cnn, (3, 3, 8, 8))
    g = analyze(model, x)
    assert set(g.layers) == {"stem.0", "conv2", "side"} and g.label_of["fc"] == "FC"

    def broken(*args, **kwargs):
        raise RuntimeError("converter broke")

    monkeypatch.setattr(torch._export.converter, "TS2EPConverter", broken)
    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.raises(ValueError, match="could not convert TorchScript to an analysable model"):
        load_model_file(tmp_path / "cnn.pt", example_input=x)


def test_torchscript_input_shape_inferred_or_asked_for(tmp_path):
    class Mnist(nn.Module):  # only 1x28x28 inputs fit the linear layer
        def __init__(self, side):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * side * side, 10)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    net = Mnist(28).eval()
    model = load_model_file(_save(net, None, "script", tmp_path / "mnist.pt"))
    assert model.nchains_input_shape == (1, 1, 28, 28)
    _assert_same(model, net, (4, 1, 28, 28))
    with pytest.raises(ValueError, match="--input-shape"):
        load_model_file(_save(Mnist(17).eval(), None, "script", tmp_path / "odd.pt"))


# ---- errors and safety ------------------------------------------------------------------------

def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="--model .*does not exist"):
        load_model_file(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="--model .*not a zip"):
        load_model_file(tmp_path / "junk.pt")
    torch.save({"conv.weight": torch.ones(1)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="--model .*torch.save checkpoint.*--weights"):
        load_model_file(tmp_path / "state.pt")
    with zipfile.ZipFile(tmp_path / "other.pt2", "w") as z:
        z.writestr("a/readme.txt", "hello")
    with pytest.raises(ValueError, match="--model .*unknown format"):
        load_model_file(tmp_path / "other.pt2")
    with pytest.raises(TypeError):
        load_model_file(tmp_path / "x.pt2", example_input=[1, 2])
    assert not looks_like_model_file("torchvision:resnet18")
    assert looks_like_model_file(str(tmp_path / "state.pt"))


def test_unsupported_op_names_op_and_module(tmp_path):
    class Head(nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=1).values

    net = nn.Sequential(nn.Conv2d(3, 4, 1), Head()).eval()
    x = torch.randn(1, 3, 4, 4)
    for kind in ("export", "trace"):
        with pytest.raises(ValueError, match=r"--model .*aten\.sort.* at module '1'"):
            load_model_file(_save(net, x, kind, tmp_path / f"sort.{kind}"), example_input=x)


def test_training_mode_batchnorm_is_refused(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        load_model_file(_save(net, x, "export", tmp_path / "train.pt2"))


class _Payload:
    """Unpickling this creates a file: proof that a pickle ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite(src, dst, edit):
    with zipfile.ZipFile(src) as zin:
        entries = {n: zin.read(n) for n in zin.namelist()}
    edit(entries)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name, data in entries.items():
            zout.writestr(name, data)
    return dst


def test_export_archive_payloads_never_run(tmp_path):
    # AliasNet makes the loader call run_decompositions, which calls ExportedProgram.module()
    base = _save(AliasNet().eval(), torch.randn(1, 3, 4, 4), "export", tmp_path / "base.pt2")
    marker = tmp_path / "payload_ran"

    def model_json(entries):
        return next(n for n in entries if n.endswith("models/model.json"))

    def pickled_inputs(entries):  # torch.export.load would retry this with weights_only=False
        _Payload.marker = str(marker)
        buf = io.BytesIO()
        torch.save((_Payload(),), buf)
        entries[next(n for n in entries if "/data/sample_inputs/" in n)] = buf.getvalue()

    def guard_code(entries):  # ExportedProgram.module() compiles and runs this
        doc = json.loads(entries[model_json(entries)])
        doc["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]
        entries[model_json(entries)] = json.dumps(doc).encode()

    def shape_expr(entries):  # sympify() evaluates these
        doc = json.loads(entries[model_json(entries)])
        doc["range_constraints"]["s0"] = {"expr_str": f"__import__('os').remove({str(base)!r})"}
        entries[model_json(entries)] = json.dumps(doc).encode()

    def aoti(entries):  # a shared library torch.export.load would dlopen
        entries[model_json(entries).split("/")[0] + "/data/aotinductor/m/m.so"] = b"\x7fELF"

    for edit, refused in [(pickled_inputs, "could not be loaded"), (guard_code, None),
                          (shape_expr, "symbolic-shape expression"), (aoti, "AOTInductor")]:
        path = _rewrite(base, tmp_path / f"{edit.__name__}.pt2", edit)
        if refused:
            with pytest.raises(ValueError, match=f"--model .*{refused}"):
                load_model_file(path)
        else:
            load_model_file(path)
        assert not marker.exists(), edit.__name__
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
