"""The narrowed step (each upper neuron computes only its own channel, nchains.ssa.narrow.NarrowTail)
against the full computation (``narrow=False``: every stacked copy runs the whole unit through
autograd) in float64, on every step of several nets (residual, pooling, concat, grouped and
depthwise convs, strides, dilation, asymmetric "same" padding, convs with bias and without BN,
hidden linears, Conv2d subclasses and parametrizations, the shipped model), in float32 and
over several neuron chunks, and which narrowed path each step takes. The fallbacks, layouts
and whole-SSA checks are in test_narrow_fallbacks.py."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import nchains
from nchains.models import zoo
from nchains.ssa import step as ssa_step
from nchains.ssa.step import prefix_graph, step_graph, step_relevance
from _models import digits_region, trained_digits_net
from test_analysis import UserCNN
from test_steps import CatNet, PoolNet

pytestmark = pytest.mark.usefixtures("one_thread")


class MyBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass (forward inherited): a unit tail the narrowed step does not take."""


class OddNet(nn.Module):
    """Convs with bias and no BN, stride 2 on an odd size, dilation, even kernel with "same"
    (asymmetric pre-pad), 5x5 valid, 3x1, an elementwise op between a conv and its ReLU,
    a BN subclass, a hidden Linear with SiLU."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)  # 9x9 -> 5x5
        self.c3 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.c4 = nn.Conv2d(8, 6, 4, padding="same")  # even kernel: pre-pad (1, 2, 1, 2)
        self.c5 = nn.Conv2d(6, 10, 5)  # 5x5 -> 1x1
        self.c6 = nn.Conv2d(8, 4, (3, 1), padding=(1, 0))
        self.bn6 = MyBN(4)
        self.hidden, self.head = nn.Linear(10 + 4, 12), nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = torch.tanh(self.c2(x))
        y = F.relu(self.bn3(self.c3(x)) * 2.0)  # the mul ends c3's unit before its ReLU
        z = F.relu(self.c4(y))
        a = F.relu(self.c5(z)).flatten(1)
        b = F.adaptive_avg_pool2d(F.relu(self.bn6(self.c6(y))), 1).flatten(1)
        return self.head(F.silu(self.hidden(torch.cat([a, b], 1))))


class AddNet(nn.Module):
    """Heads of residual adds and ReLUs (the masked path): an add without a ReLU, a tree of
    ReLU-adds over three producers, and a broadcasting add of a 1x1 map (sent on to the
    batched backward by the shape check)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(2, 6, 3, padding=1)
        self.c = nn.Conv2d(2, 6, 5)  # 5x5 -> 1x1
        self.d = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.e = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.f = nn.Conv2d(6, 3, 1)
        self.fc = nn.Linear(6 + 5 + 3, 2)

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x)
        s = a + b
        d = F.relu(self.bn(self.d(s)))
        e = F.relu(self.e(F.relu(d + F.relu(s))))
        f = F.relu(self.f(F.relu(a + c)))
        pooled = [F.adaptive_avg_pool2d(t, 1).flatten(1) for t in (d, e, f)]
        return self.fc(torch.cat(pooled, 1))


class TFSame(nn.Conv2d):
    """TensorFlow-style "same" padding computed from the input size (asymmetric, stride aware)."""

    def forward(self, x):
        (ih, iw), (kh, kw), (sh, sw), (dh, dw) = x.shape[2:], self.kernel_size, self.stride, self.dilation
        ph = max((-(-ih // sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Standardised(nn.Conv2d):
    """Weight standardisation, a doubled bias and a fixed asymmetric pre-pad in forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(F.pad(x, (1, 0, 2, 1)), w, self.bias * 2, self.stride, self.padding, self.dilation,
                        self.groups)


class Mirror(nn.Module):
    def forward(self, w):
        return 0.5 * w + w.flip(-1)


class VariantNet(nn.Module):
    """Conv2d subclasses (computed "same" pre-pad with stride and dilation, a standardised
    grouped weight), a parametrized weight, groups with fewer outputs than inputs per group, a
    non-square kernel with per-axis stride and dilation, BN without affine, unit activations
    GELU (tanh) and ReLU6, LeakyReLU and Hardswish between units, a bias-free hidden Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.g1 = nn.Conv2d(12, 8, 3, padding=1, groups=4, bias=False)  # 3 inputs, 2 outputs per group
        self.bn1 = nn.BatchNorm2d(8, affine=False)
        self.t1 = TFSame(8, 8, 4, stride=2, dilation=2)
        self.s1 = Standardised(8, 6, 3, stride=2, groups=2)
        self.p1 = nn.Conv2d(6, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        parametrize.register_parametrization(self.p1, "weight", Mirror())
        self.hidden, self.head = nn.Linear(6, 5, bias=False), nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.gelu(self.bn1(self.g1(x)), approximate="tanh")
        x = F.leaky_relu(self.t1(x), 0.1)
        x = F.relu6(self.s1(x))
        x = F.hardswish(self.p1(x))
        return self.head(F.silu(self.hidden(x.mean((2, 3)))))


class PrePadAddNet(nn.Module):
    """Convs with a pre-pad (TFSame with stride 3 and dilation 2; Standardised with stride 2)
    reading a head of adds and ReLUs (the masked path), each with a ReLU of its own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.t, self.w = TFSame(6, 5, 4, stride=3, dilation=2), Standardised(6, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(5 + 4, 2)

    def forward(self, x):
        h = F.relu(self.a(x) + F.relu(self.b(x)))
        return self.fc(torch.cat([F.relu(self.t(h)).mean((2, 3)), F.relu(self.w(h)).mean((2, 3))], 1))


def _randomise_bn(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.weight is None:
                continue
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return net


def _digits():
    return copy.deepcopy(trained_digits_net()).double(), digits_region(classes=(3,), per_class=6)[0].double()


def _shipped():
    images, _, _ = zoo.default_images(["sneaker"], per_class=4, confident=None)
    return zoo.default_model().double(), images.double()


def _seeded(cls, shape, *args):
    torch.manual_seed(0)
    net = _randomise_bn(cls(*args)).eval().double()
    return net, torch.randn(*shape, dtype=torch.float64)


NETS = {
    "digits": _digits,
    "pool": lambda: _seeded(PoolNet, (5, 1, 8, 8)),
    "concat": lambda: _seeded(CatNet, (5, 1, 6, 6)),
    "user_cnn": lambda: _seeded(UserCNN, (3, 3, 32, 32)),
    "odd": lambda: _seeded(OddNet, (5, 2, 9, 9)),
    "adds": lambda: _seeded(AddNet, (6, 2, 5, 5)),
    "variants": lambda: _seeded(VariantNet, (4, 3, 15, 14)),
    "prepad_adds": lambda: _seeded(PrePadAddNet, (3, 3, 8, 7)),
    "shipped": _shipped,
}
#: the steps that keep the full computation (their tail is not a plain conv/BN/act)
FALLBACK = {"odd": {"c6"}}


@functools.lru_cache(maxsize=None)
def _net(name):
    net, x = NETS[name]()
    return net, x, nchains.analyze(net, x[:1])


def _neurons(graph, name):
    unit = graph.units[name]
    width = getattr(unit, "out_channels", None) or unit.out_features
    return sorted({0, width - 1, width // 3, (2 * width) // 3, 1 % width})


def _steps(name):
    _, _, graph = _net(name)
    return [u for u in graph.dag.order if graph.dag.producers(u)]


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("response", ["mean", "max"])
def test_narrow_equals_full(name, response):
    """Every step of the net: the narrowed relevance is the full one (float64 rounding)."""
    net, x, graph = _net(name)
    seen = set()
    for upper in _steps(name):
        lowers = graph.dag.producers(upper)
        step = step_graph(graph, upper, lowers)
        assert (step.narrow is None) == (upper in FALLBACK.get(name, ())), upper
        assert step.narrow is None or step.narrow.usable, upper  # else narrow=True would be the full path too
        seen.add(upper)
        with torch.no_grad():
            values = prefix_graph(graph, lowers)(x)
        neurons = _neurons(graph, upper)
        want = step_relevance(step, x, values, neurons, response, narrow=False)
        got = step_relevance(step, x, values, neurons, response)
        for lo in lowers:
            assert got[lo].shape == want[lo].shape and got[lo].dtype == torch.float64
            assert not got[lo].requires_grad
            torch.testing.assert_close(got[lo], want[lo], rtol=1e-9, atol=1e-12, msg=f"{upper} <- {lo}")
        assert any(want[lo].abs().max() > 0 for lo in lowers), f"{upper}: a vacuous comparison"
    assert seen


def test_which_narrowed_path():
    """Producer read directly, a head of adds and ReLUs (masks per producer), anything else
    (the batched backward): the paths the equality test above goes through."""
    _, x, graph = _net("adds")
    steps = {u: step_graph(graph, u, graph.dag.producers(u)).narrow for u in ("d", "e", "f", "fc")}
    assert graph.dag.producers("e") == ("a", "b", "d")
    assert steps["d"].masks[0] == {0: (), 1: ()}
    assert steps["e"].masks[0] == {2: (0,), 0: (0, 1), 1: (0, 1)}
    assert steps["fc"].masks is None  # pools and a concat
    with torch.no_grad():
        values = list(prefix_graph(graph, ["a", "c"])(x).values())
    assert steps["f"].masks is not None and steps["f"]._masked(x, values, torch.tensor([0, 2]), "mean") is None
    _, x, graph = _net("shipped")
    kinds = {}
    for u in _steps("shipped"):
        tail = step_graph(graph, u, graph.dag.producers(u)).narrow
        kinds[u] = "direct" if tail.direct is not None else "masks" if tail.masks is not None else "batched"
    assert kinds["layer1.0.conv2"] == "direct" and kinds["layer2.0.downsample.0"] == "masks"
    assert kinds["fc"] == "batched" and set(kinds.values()) == {"direct", "masks", "batched"}


def test_narrow_in_float32_and_several_chunks(monkeypatch):
    """float32 (the shipped model as is) within rounding, and the neuron chunks of a small
    gradient budget give the same relevance as one chunk."""
    images, _, _ = zoo.default_images(["bag"], per_class=5, confident=None)
    net = zoo.default_model()
    graph = nchains.analyze(net, images[:1])
    for upper in ("layer2.0.conv1", "layer3.0.downsample.0", "layer4.1.conv2", "fc"):
        lowers = graph.dag.producers(upper)
        step = step_graph(graph, upper, lowers)
        with torch.no_grad():
            values = prefix_graph(graph, lowers)(images)
        neurons = _neurons(graph, upper)
        want = step_relevance(step, images, values, neurons, narrow=False)
        got = step_relevance(step, images, values, neurons)
        monkeypatch.setattr(ssa_step, "GRAD_BUDGET_BYTES", 1)
        chunked = step_relevance(step, images, values, neurons)
        monkeypatch.undo()
        for lo in lowers:
            scale = float(want[lo].abs().max())
            torch.testing.assert_close(got[lo], want[lo], rtol=1e-4, atol=1e-5 * scale)
            torch.testing.assert_close(chunked[lo], got[lo], rtol=1e-5, atol=1e-6 * scale)
