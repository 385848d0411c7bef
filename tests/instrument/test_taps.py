"""Per-call taps against forward hooks on the original model, call by call."""

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nchains.graph.analysis import analyze
from nchains.instrument.taps import Site, sites, tap

from test_scoring import _randomize_bn  # same folder


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, x, analyze(model, x)


def _record_calls(model: nn.Module, types):
    """Forward hooks recording every call's output, a list per module path in call order."""
    calls, handles = defaultdict(list), []
    for name, m in model.named_modules():
        if isinstance(m, types):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: calls[name].append(out.detach().clone())))
    return calls, handles


def test_every_relu_call_is_its_own_site_with_the_value_of_that_call(resnet18):
    model, x, graph = resnet18
    calls, handles = _record_calls(model, nn.ReLU)
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        for h in handles:
            h.remove()
    acts = sites(graph)
    # resnet18: the stem's ReLU once, each of the 8 BasicBlocks' one ReLU twice
    assert sum(len(v) for v in calls.values()) == len(acts) == 17
    assert [(s.module, s.call) for s in acts if s.module == "layer1.0.relu"] == [("layer1.0.relu", 0),
                                                                                  ("layer1.0.relu", 1)]
    assert [s.key for s in acts[1:3]] == ["layer1.0.relu", "layer1.0.relu@1"]
    with torch.no_grad():
        out, values = tap(graph, acts)(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert list(values) == [s.key for s in acts]
    for s in acts:
        recorded = calls[s.module][s.call]
        assert s.shape == tuple(recorded.shape), s.key  # the analysis ran on x itself
        torch.testing.assert_close(values[s.key], recorded, rtol=0, atol=0, msg=s.key)
    for block in ("layer1.0", "layer2.1", "layer4.1"):
        first, second = values[f"{block}.relu"], values[f"{block}.relu@1"]
        assert first.shape == second.shape and not torch.allclose(first, second), block
    labels = {s.key: s.label for s in acts}
    assert labels["relu"] == "Conv1" and labels["layer1.0.relu"] == "L1B1C1"
    assert labels["layer1.0.relu@1"] == "L1B1" and labels["layer3.0.relu@1"] == "L3B1"


def test_bottleneck_relu_called_three_times_gives_three_sites():
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet50(num_classes=10))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    graph = analyze(model, x)
    calls, handles = _record_calls(model.layer3[1], nn.ReLU)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    chosen = [s for s in sites(graph) if s.module == "layer3.1.relu"]
    assert [s.key for s in chosen] == ["layer3.1.relu", "layer3.1.relu@1", "layer3.1.relu@2"]
    assert [s.label for s in chosen] == ["L3B2C1", "L3B2C2", "L3B2"]
    with torch.no_grad():
        _, values = tap(graph, chosen)(x)
    for s in chosen:
        torch.testing.assert_close(values[s.key], calls["relu"][s.call], rtol=0, atol=0, msg=s.key)


def test_gradients_at_the_two_calls_of_one_relu_match_per_call_hook_autograd(resnet18):
    model, x, graph = resnet18
    kept, count = {}, defaultdict(int)

    def keep(mod, inp, out, name):
        key = name if count[name] == 0 else f"{name}@{count[name]}"
        count[name] += 1
        z = out.clone()  # the next block's in-place add must not write into the kept tensor
        kept[key] = z
        return z.clone()
    relu = model.layer2[0].relu
    h = relu.register_forward_hook(lambda m, i, o: keep(m, i, o, "layer2.0.relu"))
    try:
        ref = model(x)
    finally:
        h.remove()
    want = torch.autograd.grad(ref[:, 3].sum(), [kept["layer2.0.relu"], kept["layer2.0.relu@1"]])
    chosen = [s for s in sites(graph) if s.module == "layer2.0.relu"]
    out, values = tap(graph, chosen)(x)
    got = torch.autograd.grad(out[:, 3].sum(), list(values.values()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0].sum((0, 2, 3)), got[1].sum((0, 2, 3)))


def test_unit_sites_are_the_conv_bn_act_outputs(resnet18):
    model, x, graph = resnet18
    bn_out, handles = _record_calls(model, nn.BatchNorm2d)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    units = sites(graph, "units")
    assert [s.key for s in units] == list(graph.layers) and len(units) == 20
    with torch.no_grad():
        _, values = tap(graph, units)(x)
    for s in units:
        unit = graph.layers[s.key]
        assert (s.module, s.call, s.label) == (unit.conv, 0, unit.label)
        z = bn_out[unit.bn][0]
        torch.testing.assert_close(values[s.key], F.relu(z) if unit.act == "relu" else z, rtol=0, atol=0)
    assert {graph.layers[s.key].act for s in units} == {"relu", None}  # both kinds were checked


class _InPlace(nn.Module):
    """One in-place ReLU module called twice, a function ReLU, and an in-place add that
    would overwrite the first call's activation if the tap kept the ops in place."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.relu(self.a(x))
        y.add_(self.b(x))
        y = F.relu(y - 0.5, inplace=True)
        return self.head(self.relu(y * 2).mean((2, 3)))


def test_in_place_ops_never_overwrite_a_tapped_activation():
    torch.manual_seed(0)
    model, x = _InPlace().eval(), torch.randn(2, 3, 6, 6)
    graph = analyze(model, x)
    acts = sites(graph)
    assert [(s.module, s.call) for s in acts][0::2] == [("relu", 0), ("relu", 1)]
    assert acts[1].call == 0 and acts[1].module == acts[1].key  # the function call: its fx node name
    with torch.no_grad():
        z = model.a(x)
        first = F.relu(z)
        second_in = F.relu(first + model.b(x) - 0.5)
        want = [first, second_in, F.relu(second_in * 2)]
        ref = model(x)
        out, values = tap(graph, acts)(x)
    torch.testing.assert_close(out, ref)
    for s, w in zip(acts, want):
        torch.testing.assert_close(values[s.key], w, msg=s.key)
    assert model.relu.inplace  # the model's own module is untouched


def test_tap_refuses_what_is_not_a_site_of_the_graph(resnet18):
    _, x, graph = resnet18
    acts = sites(graph)
    other = analyze(torchvision.models.resnet18(num_classes=10), x)
    with pytest.raises(TypeError, match="graph must be a ModelGraph"):
        tap(nn.Linear(2, 2), acts)
    with pytest.raises(TypeError, match="sites must be Site objects"):
        tap(graph, ["layer1.0.relu"])
    with pytest.raises(ValueError, match="not a site of this graph"):
        tap(graph, sites(other)[:1])
    with pytest.raises(ValueError, match="unique keys"):
        tap(graph, [acts[0], acts[0]])
    with pytest.raises(ValueError, match="layers must be 'activations' or 'units', got 'convs'"):
        sites(graph, "convs")
    assert isinstance(acts[0], Site) and "node" not in repr(acts[0])
