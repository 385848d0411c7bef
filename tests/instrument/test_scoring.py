"""Tests of nchains.scoring.ScoredModel against the original models.

BatchNorm running statistics and affine parameters are randomised so that BN folding is
exercised. torchvision VGGs keep their exact ``features`` but get a narrow classifier
(same layout, 64 hidden units) so that the tests do not spend seconds initialising 120M
classifier weights.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn

import nchains.ops._reference as reference_ops
import nchains.instrument.scored_model as scoring
from nchains.graph.analysis import analyze
from nchains.instrument.scored_model import ScoredModel

from test_analysis import UserCNN

OPEN = 50.0  # sigmoid(50 / 0.2) == 1.0 exactly in float32: the gate passes f(x) unchanged


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def _vgg(name: str) -> nn.Module:
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(),
            nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.uniform_(m.bias, -0.1, 0.1)
    return _randomize_bn(model)


class Pair(nn.Module):
    """A shape-preserving block without a shortcut whose output is a unit's activation."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.b(torch.relu(self.a(x)))))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "user":
        return _randomize_bn(UserCNN())
    if name == "sequential":
        return _randomize_bn(nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Pair(8), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(8, 3)))
    if name.startswith("vgg"):
        return _vgg(name)
    return _randomize_bn(getattr(torchvision.models, name)(weights=None, num_classes=10))


def _open(sm: ScoredModel, value: float = OPEN) -> ScoredModel:
    with torch.no_grad():
        for _, alpha in sm.named_gate_logits():
            alpha.fill_(value)
    return sm


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    err = (out - ref).abs().max().item()
    top = ref.abs().max().item()
    assert err <= tol * top, f"max error {err}, max logit {top}"


def _x(seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


FAST = ["user", "sequential", "resnet18", "resnet50", "resnext50_32x4d", "vgg11_bn", "vgg16"]
SLOW = ["resnet34", "resnet101", "resnet152", "wide_resnet50_2", "vgg11", "vgg13", "vgg19",
        "vgg13_bn", "vgg16_bn", "vgg19_bn"]


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_open_gates_unit_scores_reproduce_logits(name):
    model, x = _model(name), _x()
    sm = ScoredModel(analyze(model, x))
    with torch.no_grad():
        ref = model(x)
        half = sm(x)  # alpha = 0: G = 0.5 everywhere
        _close(_open(sm)(x), ref)
        _close(sm.set_hard()(x), ref)  # hard mode, every gate kept, scores 1
        assert sm.hard and set(sm.hard_gates.values()) == {1}
    assert not torch.allclose(half, ref, atol=1e-3 * ref.abs().max().item())


@pytest.fixture(scope="module")
def resnet18():
    model, x = _model("resnet18"), _x()
    return model, x, analyze(model, x)


def _blend_hooks(model: nn.Module, graph, g: float = 0.5):
    """Reference gates on the original model: ``g * f(x) + (1 - g) * x`` per region."""
    handles = []
    for r in graph.regions.values():
        if r.kind == "block":
            handles.append(model.get_submodule(r.name).register_forward_hook(
                lambda m, inp, out: g * out + (1 - g) * inp[0]))
            continue
        unit, box = graph.layers[r.units[0]], {}
        handles.append(model.get_submodule(unit.conv).register_forward_pre_hook(
            lambda m, inp, box=box: box.update(x=inp[0].clone())))
        handles.append(model.get_submodule(unit.last.target).register_forward_hook(
            lambda m, inp, out, box=box: g * out + (1 - g) * box["x"]))
    return handles


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "user", "sequential"])
def test_half_open_gates_blend_region_output_with_input(name):
    model, x = _model(name), _x()
    graph = analyze(model, x)
    sm = ScoredModel(graph)
    assert all(sm.gate(r).item() == 0.5 for r in graph.regions)
    handles = _blend_hooks(model, graph)
    with torch.no_grad():
        ref = model(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        _close(sm(x), ref)


def test_gradients_reach_only_scores_and_gates(resnet18):
    model, x, graph = resnet18
    sm = ScoredModel(graph)
    sm(x)[:, 3].sum().backward()
    trainable = {n for n, p in sm.named_parameters() if p.requires_grad}
    assert trainable == {"net.flat_scores", "net.flat_gate_logits"}
    assert sm.flat_scores.numel() == sum(u.out_channels for u in graph.layers.values())
    assert len(sm.flat_gate_logits) == len(graph.regions) == 5
    assert len(dict(sm.named_scores())) == len(graph.layers)
    for name, s in sm.named_scores():
        grad = sm.flat_scores.grad[sm.score_slice(name)]
        assert s.shape == grad.shape == (graph.layers[name].out_channels,)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    grad = sm.flat_gate_logits.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).all()
    assert [n for n, _ in sm.named_gate_logits()] == list(graph.regions)
    assert all(b.grad is None for b in sm.buffers())
    assert all(p.grad is None for p in model.parameters())


def test_score_gradient_is_batch_summed_taylor_contribution(resnet18):
    model, x, graph = resnet18
    box = {}

    def keep(m, inp, out):
        z = out.clone()  # the BN output, safe from the in-place relu / += downstream
        z.retain_grad()
        box[m] = z
        return z.clone()
    names = ["layer1.0.conv1", "layer2.0.conv2", "layer3.1.conv2", "layer4.0.downsample.0"]
    bns = [model.get_submodule(graph.layers[n].bn) for n in names]
    handles = [bn.register_forward_hook(keep) for bn in bns]
    model(x)[:, 3].sum().backward()
    for h in handles:
        h.remove()
    sm = _open(ScoredModel(graph))
    sm(x)[:, 3].sum().backward()
    for name, bn in zip(names, bns):
        taylor = (box[bn].grad * box[bn]).sum((0, 2, 3))
        tol = 1e-4 * taylor.abs().max().item()
        grad = sm.flat_scores.grad[sm.score_slice(name)]
        assert torch.allclose(grad, taylor, atol=tol), name


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "user"])
def test_fused_residual_tails_match_unfused_values_and_gradients(name):
    """The soft graph runs residual tails (add, ReLU, block gate) inside the last unit's op;
    values and gradients must be those of the unfused graph, at random scores and gates."""
    model, x = _model(name), _x()
    graph = analyze(model, x)
    fused, plain = ScoredModel(graph), ScoredModel(graph, fuse=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        scores = torch.rand(fused.flat_scores.shape, generator=gen) * 1.5
        scores[torch.rand(scores.shape, generator=gen) < 0.3] = 0.0
        logits = torch.randn(fused.flat_gate_logits.shape, generator=gen) * 0.3
        for sm in (fused, plain):
            sm.flat_scores.copy_(scores)
            sm.flat_gate_logits.copy_(logits)
    n_calls = lambda sm: sum(1 for n in sm.net.graph.nodes if n.op != "placeholder")  # noqa: E731
    if name != "user" or graph.adds:
        assert n_calls(fused) < n_calls(plain)  # something was fused
    out_f, out_p = fused(x), plain(x)
    _close(out_f, out_p, tol=1e-5)
    g = torch.randn_like(out_f)
    out_f.backward(g)
    out_p.backward(g)
    for a, b in ((fused.flat_scores.grad, plain.flat_scores.grad),
                 (fused.flat_gate_logits.grad, plain.flat_gate_logits.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("name, layers", [
    ("resnet50", ["layer2.0.conv2", "layer1.1.conv3", "layer3.0.downsample.0"]),
    ("vgg11_bn", ["features.11", "features.4"]),
    ("user", ["same", "res.dw", "branches.b"]),
])
def test_zero_scores_give_exactly_zero_maps(name, layers):
    model, x = _model(name), _x()
    graph = analyze(model, x)
    sm = _open(ScoredModel(graph, fuse=False))  # hooks read each unit's own maps
    gen = torch.Generator().manual_seed(0)
    masks, outputs, handles = {}, {}, []
    for layer in layers:
        unit = graph.layers[layer]
        mask = (torch.rand(unit.out_channels, generator=gen) < 0.5).float()
        masks[layer] = mask
        with torch.no_grad():
            sm.score(layer).copy_(mask)
        handles.append(sm.unit(layer).register_forward_hook(
            lambda m, i, out, layer=layer: outputs.__setitem__(layer, out)))
        # reference: multiply the filter maps after BN (or conv) and before the activation
        handles.append(model.get_submodule(unit.bn or unit.conv).register_forward_hook(
            lambda m, i, out, mask=mask: out * mask.view(1, -1, 1, 1)))
    with torch.no_grad():
        ref = model(x)
        for mode in ("soft", "hard"):
            out = sm(x) if mode == "soft" else sm.set_hard({k: v for k, v in masks.items()})(x)
            _close(out, ref)
            for layer, mask in masks.items():
                maps = outputs[layer]
                removed = maps[:, mask == 0]
                assert torch.equal(removed, torch.zeros_like(removed)), (mode, layer)
                assert maps[:, mask == 1].abs().sum() > 0, (mode, layer)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("name, removed", [
    ("resnet18", ["layer2.1"]),
    ("resnet50", ["layer1.1", "layer1.2", "layer3.4"]),
    ("vgg11_bn", ["features.11", "features.22"]),
    ("user", ["same", "res"]),
    ("sequential", ["2"]),
])
def test_hard_removed_region_is_identity(name, removed):
    model, x = _model(name), _x()
    graph = analyze(model, x)
    sm = ScoredModel(graph)
    sm.set_hard(gates={r: 0 for r in removed} | {r: 1 for r in graph.regions if r not in removed})
    calls = []
    for r in removed:
        for u in graph.regions[r].units:
            sm.unit(u).register_forward_hook(lambda *a: calls.append(1))
    reference = copy.deepcopy(model)
    for r in removed:
        for path in ([r] if graph.regions[r].kind == "block" else
                     [n.target for n in graph.layers[r].nodes]):
            parent, _, leaf = path.rpartition(".")
            setattr(reference.get_submodule(parent), leaf, nn.Identity())
    with torch.no_grad():
        _close(sm(x), reference(x))
    assert calls == []  # the convs of removed regions are not run
    assert sm.hard_gates == {r: int(r not in removed) for r in graph.regions}


def test_hard_mode_uses_fixed_scores_and_soft_restores(resnet18):
    model, x, graph = resnet18
    sm = ScoredModel(graph)
    with torch.no_grad():
        soft = sm(x)
        sm.gate_logit("layer1.0").fill_(-1.0)  # G < 0.5: binarised to removed
        sm.score("conv1")[5] = 0.0
        sm.set_hard()
        assert sm.hard_gates["layer1.0"] == 0 and sm.hard_gates["layer1.1"] == 1
        assert sm.hard_score("conv1")[5] == 0 and sm.hard_score("conv1")[4] == 1
        hard = sm(x)
        sm.score("conv1").fill_(3.0)  # learnable scores do not reach the hard network
        assert torch.equal(sm(x), hard)
        sm.score("conv1").fill_(1.0)
        sm.gate_logit("layer1.0").fill_(0.0)
        sm.soft()
        assert not sm.hard and torch.equal(sm(x), soft)


def test_hard_mode_reads_the_hard_score_buffer_and_freezes_everything_else(resnet18):
    model, x, graph = resnet18
    sm = ScoredModel(graph).set_hard()
    params = dict(sm.named_parameters())
    buffers = dict(sm.named_buffers())
    # only the learnable scores and gate logits are trainable; every copied weight is frozen
    assert {n for n, p in params.items() if p.requires_grad} == {"net.flat_scores", "net.flat_gate_logits"}
    assert not any(b.requires_grad for b in buffers.values())
    assert "net.hard_flat_scores" in buffers and "net.hard_flat_scores" not in params
    assert buffers["net.hard_flat_scores"].shape == sm.flat_scores.shape
    reads = {n.target for n in sm.net.graph.nodes if n.op == "get_attr"}
    assert "hard_flat_scores" in reads and "flat_scores" not in reads and "flat_gate_logits" not in reads
    # the hard network computes with that buffer: zeroing one layer's part changes the logits
    # exactly as zeroing that filter map in the original model does
    with torch.no_grad():
        before = sm(x)
        sm.net.hard_flat_scores[sm.score_slice("layer4.1.conv2")] = 0.0
        h = model.get_submodule(graph.layers["layer4.1.conv2"].bn).register_forward_hook(lambda m, i, o: o * 0)
        ref = model(x)
        h.remove()
        _close(sm(x), ref)
    assert not torch.allclose(before, ref)
    assert not sm(x).requires_grad  # the hard network reaches no trainable tensor


def test_set_hard_validates_arguments(resnet18):
    _, _, graph = resnet18
    sm = ScoredModel(graph)
    with pytest.raises(ValueError, match="kept_scores has unknown names"):
        sm.set_hard({"layer9.conv1": torch.ones(3)})
    with pytest.raises(ValueError, match=r"kept_scores\['conv1'\] must have shape \(64,\)"):
        sm.set_hard({"conv1": torch.ones(3)})
    with pytest.raises(ValueError, match="gates has unknown names"):
        sm.set_hard(gates={"layer2.0": 0})
    with pytest.raises(ValueError, match="gates values must be 0 or 1"):
        sm.set_hard(gates={"layer1.0": 0.3})
    with pytest.raises(ValueError, match="hard mode"):
        sm.hard_score("conv1")
    with pytest.raises(ValueError, match="scored layer"):
        sm.score("fc")
    with pytest.raises(ValueError, match="gated region"):
        sm.gate_logit("conv1")
    with pytest.raises(TypeError, match="ModelGraph"):
        ScoredModel(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="temperature"):
        ScoredModel(graph, temperature=0.0)


def test_score_linear_scores_hidden_neurons_only():
    model, x = _model("user"), _x()
    graph = analyze(model, x)
    assert "hidden" not in dict(ScoredModel(graph).named_scores())
    sm = _open(ScoredModel(graph, score_linear=True))
    assert [n for n, _ in sm.named_scores()][-1] == "hidden" and "head" not in sm._score_keys
    mask = (torch.arange(24) % 3 != 0).float()
    with torch.no_grad():
        sm.score("hidden").copy_(mask)
        h = model.hidden.register_forward_hook(lambda m, i, out: out * mask)
        ref = model(x)
        h.remove()
        _close(sm(x), ref)
        _close(sm.set_hard()(x), ref)


def test_train_mode_keeps_network_in_eval(resnet18):
    _, x, graph = resnet18
    sm = _open(ScoredModel(graph)).train()
    assert sm.training and not any(m.training for m in sm.net.model.modules())
    with torch.no_grad():
        assert torch.equal(sm(x), sm.eval()(x))


def test_state_dict_roundtrip_and_traceable(resnet18):
    _, x, graph = resnet18
    sm = ScoredModel(graph)
    with torch.no_grad():
        sm.score("layer3.0.conv1").uniform_(0, 2)
        sm.gate_logit("layer2.1").fill_(0.3)
    other = ScoredModel(graph)
    other.load_state_dict(sm.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), sm(x))
        traced = torch.fx.symbolic_trace(sm)
        assert torch.equal(traced(x), sm(x))
        copied = copy.deepcopy(sm.set_hard())
        assert torch.equal(copied(x), sm(x)) and copied.hard


@pytest.mark.parametrize("ops", ["compiled", "reference"])
def test_torch_export_soft_and_hard(ops, monkeypatch):
    if ops == "reference":  # the rewritten graph itself, independent of the fused kernels
        monkeypatch.setattr(scoring, "_ops", reference_ops)
    else:
        assert scoring._ops.__name__ == "nchains.ops"  # fused kernels on the hot path
    model, x = _model("user"), _x()
    sm = ScoredModel(analyze(model, x))
    for mode in ("soft", "hard"):
        if mode == "hard":
            sm.set_hard(gates={"res": 0})
        with torch.no_grad():
            ep = torch.export.export(sm, (x,))
            assert torch.allclose(ep.module()(x), sm(x), atol=1e-6)
