"""Taylor contributions against per-call forward-hook autograd on torchvision's resnet18."""

import pytest
import torch
import torchvision

from nchains.contrib import contributions
from nchains.graph.analysis import analyze

from _hooks import out_of_place, per_call, relu_names

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    graph = analyze(model, x[:1])
    # reference: hooks on every ReLU call, a * grad of the summed target logits
    ref = out_of_place(model)
    with per_call(ref, relu_names(ref)) as acts:
        logits = ref(x)
        target = logits.argmax(1)
        logits.gather(1, target[:, None]).sum().backward()
    prods = {k: (a * a.grad).detach() for k, a in acts.items()}
    return model, x, graph, logits.detach(), target, prods


def test_every_relu_call_is_a_site_and_equals_hook_autograd(setup):
    model, x, graph, logits, target, prods = setup
    c = contributions(model, x, graph=graph)
    assert list(c) == list(prods)              # same calls, same execution order
    for key, p in prods.items():
        torch.testing.assert_close(c[key], p.sum((2, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c.logits, logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(c.target, target)
    assert [s.key for s in c.sites] == list(c)


def test_reused_relu_calls_are_different_sites(setup):
    model, x, graph, _, _, prods = setup
    c = contributions(model, x, graph=graph, unit="neuron")
    for block in ("layer1.0", "layer2.1", "layer4.1"):
        first, second = c[f"{block}.relu"], c[f"{block}.relu@1"]
        assert not torch.allclose(first, second)
        torch.testing.assert_close(second, prods[f"{block}.relu@1"], rtol=1e-4, atol=1e-6)
    site = {s.key: s for s in c.sites}["layer1.0.relu@1"]
    assert (site.module, site.call) == ("layer1.0.relu", 1)


def test_neuron_sums_to_channel_and_absolute(setup):
    model, x, graph, _, _, prods = setup
    ch = contributions(model, x, graph=graph)
    ne = contributions(model, x, graph=graph, unit="neuron")
    ab = contributions(model, x, graph=graph, unit="neuron", absolute=True)
    abc = contributions(model, x, graph=graph, absolute=True)
    for key, p in prods.items():
        assert ne[key].shape == p.shape
        torch.testing.assert_close(ne[key].sum((2, 3)), ch[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ab[key], p.abs(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(abc[key], p.abs().sum((2, 3)), rtol=1e-4, atol=1e-5)


def test_int_and_tensor_targets(setup):
    model, x, graph, _, _, _ = setup
    ref = out_of_place(model)
    with per_call(ref, ["layer3.1.relu"]) as acts:
        ref(x)[:, 4].sum().backward()
    want = (acts["layer3.1.relu@1"] * acts["layer3.1.relu@1"].grad).sum((2, 3))
    c = contributions(model, x, graph=graph, target=4, layers=["layer3.1.relu"])
    assert list(c) == ["layer3.1.relu", "layer3.1.relu@1"]
    torch.testing.assert_close(c["layer3.1.relu@1"], want, rtol=1e-4, atol=1e-6)
    assert c.target.tolist() == [4, 4]
    per_image = contributions(model, x, graph=graph, target=torch.tensor([4, 7]), layers=["layer3.1.relu"])
    torch.testing.assert_close(per_image["layer3.1.relu@1"][0], want[0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(per_image["layer3.1.relu@1"][1], want[1])


def test_units_layers_and_determinism(setup):
    model, x, graph, _, _, _ = setup
    units = contributions(model, x, graph=graph, layers="units")
    assert list(units) == list(graph.layers)
    assert units["layer1.0.conv2"].shape == (2, 64)
    again = contributions(model, x, graph=graph, layers="units")
    for k in units:
        assert torch.equal(units[k], again[k])


def test_a_unit_without_activation_is_its_batchnorm_output(setup):
    model, x, graph, _, target, _ = setup
    ref = out_of_place(model)
    with per_call(ref, ["layer2.0.downsample.1"]) as seen:
        ref(x).gather(1, target[:, None]).sum().backward()
    bn = seen["layer2.0.downsample.1"]
    c = contributions(model, x, graph=graph, layers="units", unit="neuron")
    torch.testing.assert_close(c["layer2.0.downsample.0"], bn * bn.grad, rtol=1e-4, atol=1e-6)


class _SkipFromInput(torch.nn.Module):
    """The model input is read again after the first site: the backward must run to the images."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.act1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.act2 = torch.nn.ReLU()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):
        y = self.act2(self.conv2(self.act1(self.conv1(x))) + x)
        return self.fc(y.mean((2, 3)))


def test_where_the_backward_stops_and_frozen_weights(setup):
    from nchains.contrib.taylor import _first_cut
    from nchains.instrument.taps import sites

    model, x, graph, _, _, prods = setup
    assert _first_cut(graph, sites(graph)).key == "relu"          # resnet18: everything reads the stem
    skip = _SkipFromInput().eval()
    xs = torch.randn(2, 3, 6, 6)
    g2 = analyze(skip, xs[:1])
    assert _first_cut(g2, sites(g2)) is None
    ref = out_of_place(skip)
    with per_call(ref, ["act1", "act2"]) as acts:
        ref(xs)[:, 1].sum().backward()
    c = contributions(skip, xs, target=1, graph=g2, unit="neuron")
    for key in ("act1", "act2"):
        torch.testing.assert_close(c[key], acts[key] * acts[key].grad, rtol=1e-5, atol=1e-7)
    frozen = out_of_place(model).requires_grad_(False)
    cf = contributions(frozen, x, graph=analyze(frozen, x[:1]))
    for key, p in prods.items():
        torch.testing.assert_close(cf[key], p.sum((2, 3)), rtol=1e-4, atol=1e-6)
