"""The narrowed step (each upper neuron computes only its own channel, nchains.ssa.narrow.NarrowTail)
against the full computation (``narrow=False``: every stacked copy runs the whole unit through
autograd) in float64, on every step of several nets (residual, pooling, concat, grouped and
depthwise convs, strides, dilation, asymmetric "same" padding, convs with bias and without BN,
hidden linears, Conv2d subclasses and parametrizations, the shipped model); memory layouts,
batches of one and repeated neurons; the fallback for a tail it does not handle against plain
per-(neuron, image) autograd, and for hooks and training-mode modules; and whole SSA graphs
identical with and without narrowing."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import nchains
from nchains.models import zoo
from nchains.ssa import analysis, step as ssa_step
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


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def test_fallback_tail_is_plain_autograd():
    """OddNet's c6 (a BatchNorm2d subclass after the conv) keeps the full computation; it is
    the per-(neuron, image) autograd of the hand-written forward, and so is the narrowed c4
    (asymmetric "same" padding) and c3 (dilated, its unit ends before the mul; its producer's
    ends before the tanh)."""
    net, x, graph = _net("odd")
    with torch.no_grad():
        c1 = F.relu(net.c1(x))
        c2 = net.c2(c1)  # tanh is no unit activation: c2's unit ends at the conv
        c3 = net.bn3(net.c3(torch.tanh(c2)))
        y = F.relu(c3 * 2.0)
    hand = {
        "c6": ("c3", c3, lambda v: F.relu(net.bn6(net.c6(F.relu(v * 2.0)))).mean((2, 3))),
        "c4": ("c3", c3, lambda v: F.relu(net.c4(F.relu(v * 2.0))).mean((2, 3))),
        "c3": ("c2", c2, lambda v: net.bn3(net.c3(torch.tanh(v))).mean((2, 3))),
    }
    for upper, (lower, value, fn) in hand.items():
        assert graph.dag.producers(upper) == (lower,)
        step = step_graph(graph, upper, [lower])
        assert (step.narrow is None) == (upper == "c6")
        neurons = _neurons(graph, upper)
        got = step_relevance(step, x, {lower: value}, neurons)[lower]
        for i in range(len(x)):
            leaf = _leaf(value[i:i + 1])
            resp = fn(leaf)
            for j, n in enumerate(neurons):
                (g,) = torch.autograd.grad(resp[0, n], leaf, retain_graph=True)
                torch.testing.assert_close(got[j, i], g[0].mean((1, 2)), rtol=1e-9, atol=1e-12)
    assert y.shape == (5, 8, 5, 5)


def test_bn_in_training_mode_takes_the_full_path():
    """A BN switched to training mode after the step is built is computed as the module does
    (batch statistics), never with the running ones the narrowed tail reads."""
    net, x, graph = _net("digits")
    upper = "layer1.1.conv2"
    lowers = graph.dag.producers(upper)
    step = step_graph(graph, upper, lowers)
    with torch.no_grad():
        values = prefix_graph(graph, lowers)(x)
    evaluated = step_relevance(step, x, values, [0, 5])
    bn = net.layer1[1].bn2
    bn.train()
    try:
        assert not step.narrow.usable
        saved = (bn.running_mean.clone(), bn.running_var.clone())
        got = step_relevance(step, x, values, [0, 5])
        want = step_relevance(step, x, values, [0, 5], narrow=False)
    finally:
        bn.eval()
        bn.running_mean.copy_(saved[0])
        bn.running_var.copy_(saved[1])
    for lo in lowers:
        torch.testing.assert_close(got[lo], want[lo], rtol=0, atol=0)
        assert not torch.allclose(got[lo], evaluated[lo])


def _ssa_both(monkeypatch, model, per_class_images, graph, branching=3):
    full = functools.partial(step_relevance, narrow=False)
    out = []
    for fn in (step_relevance, full):
        monkeypatch.setattr(analysis, "step_relevance", fn)
        out.append([nchains.ssa(model, x, target=t, graph=graph, branching=branching) for t, x in per_class_images])
    monkeypatch.undo()
    return out


def _assert_same(new, old):
    for a, b in zip(new, old):
        assert a.nodes == b.nodes and a.edges == b.edges
        assert a.relevance.keys() == b.relevance.keys()
        for key, r in b.relevance.items():
            assert a.relevance[key] == pytest.approx(r, rel=1e-4, abs=1e-7)


def test_whole_ssa_unchanged_digits(monkeypatch):
    net = trained_digits_net()
    per_class = [(t, digits_region(classes=(t,), per_class=10)[0]) for t in (2, 7)]
    graph = nchains.analyze(net, per_class[0][1][:1])
    new, old = _ssa_both(monkeypatch, net, per_class, graph, branching=2)
    _assert_same(new, old)
    assert all(len(g.edges) > 5 for g in new)


def test_whole_ssa_unchanged_shipped(monkeypatch):
    net, names = zoo.default_model(), zoo.default_class_names()
    per_class = [(t, zoo.default_images([names[t]], per_class=10, confident=None)[0]) for t in (0, 9)]
    graph = nchains.analyze(net, per_class[0][1][:1])
    new, old = _ssa_both(monkeypatch, net, per_class, graph)
    _assert_same(new, old)
    assert all(len(g.nodes) > 20 for g in new)


def _compare(graph, x, upper, neurons, response="mean", rtol=1e-9):
    """The narrowed and the full relevance of one step; returns the step."""
    lowers = graph.dag.producers(upper)
    step = step_graph(graph, upper, lowers)
    assert step.narrow is not None and step.narrow.usable, upper
    with torch.no_grad():
        values = prefix_graph(graph, lowers)(x)
    want = step_relevance(step, x, values, neurons, response, narrow=False)
    got = step_relevance(step, x, values, neurons, response)
    for lo in lowers:
        assert want[lo].abs().max() > 0, f"{upper} <- {lo}: a vacuous comparison"
        torch.testing.assert_close(got[lo], want[lo], rtol=rtol, atol=rtol * 1e-3, msg=f"{upper} <- {lo}")
    return step


def test_layouts_batch_of_one_and_neuron_order():
    """channels_last model and images, a non-contiguous batch, one image, and neurons repeated
    and out of order: the narrowed relevance is still the full one on every narrowed path
    (adds: d a head of adds, e of adds and ReLUs, stride 2, f and fc the batched backward; odd:
    c4 and c5 read their producer directly, c4 with an asymmetric pre-pad, head a linear)."""
    cases = {"adds": {"d": [5, 0, 5, 2], "e": [4], "f": [2, 2, 0], "fc": [1, 0, 1]},
             "odd": {"c4": [5, 1, 1], "c5": [7, 0, 3], "head": [2, 0, 2]}}
    gen = torch.Generator().manual_seed(3)
    for name, neurons in cases.items():
        net, x, graph = _net(name)
        wide = torch.randn(len(x), x.shape[1], x.shape[2], 2 * x.shape[3], dtype=torch.float64, generator=gen)
        last = copy.deepcopy(net).to(memory_format=torch.channels_last)
        images_cl = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert next(iter(last.children()))(images_cl).is_contiguous(memory_format=torch.channels_last)
        runs = [(graph, wide[..., ::2]), (graph, x[:1]), (nchains.analyze(last, x[:1]), images_cl)]
        assert not runs[0][1].is_contiguous()
        for g, images in runs:
            for upper, ns in neurons.items():
                _compare(g, images, upper, ns, "max" if upper in ("e", "c4") else "mean")


def _hooks(net):
    """(name, add a hook to net, upper step it changes) -- each changes what the step computes."""
    return [
        ("forward hook on the unit's conv", lambda: net.d.register_forward_hook(lambda m, i, o: o * 0.5 + 0.1), "d"),
        ("pre-hook on the unit's conv", lambda: net.e.register_forward_pre_hook(lambda m, i: (i[0] * 3,)), "e"),
        ("backward hook on the unit's BN", lambda: net.bn.register_full_backward_hook(lambda m, gi, go: (gi[0] * 2,)),
         "d"),
        ("global forward hook", lambda: torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: o * 2 if isinstance(m, nn.Conv2d) else None), "f"),
    ]


def test_hooks_take_the_full_path():
    """A forward, pre- or backward hook on one of the step's modules (or a global module hook)
    runs in the full computation, which calls the modules; the narrowed ops call none, so the
    step takes the full path while the hook is there, and the narrowed one once it is removed."""
    net, x, graph = _net("adds")
    net = copy.deepcopy(net)
    graph = nchains.analyze(net, x[:1])
    for what, add, upper in _hooks(net):
        lowers = graph.dag.producers(upper)
        step = step_graph(graph, upper, lowers)
        with torch.no_grad():
            values = prefix_graph(graph, lowers)(x)
        plain = step_relevance(step, x, values, [0, 2], narrow=False)
        handle = add()
        try:
            assert not step.narrow.usable, what
            with torch.no_grad():
                values_h = prefix_graph(graph, lowers)(x)
            got = step_relevance(step, x, values_h, [0, 2])
            want = step_relevance(step, x, values_h, [0, 2], narrow=False)
        finally:
            handle.remove()
        assert step.narrow.usable
        for lo in lowers:
            torch.testing.assert_close(got[lo], want[lo], rtol=0, atol=0, msg=what)
        assert any(not torch.allclose(want[lo], plain[lo]) for lo in lowers), f"{what}: the hook changes nothing"


class HeadBNNet(nn.Module):
    """A standalone BN and a dropout after a residual add (in the step's head, not a unit's)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(2, 6, 3, padding=1)
        self.bn, self.drop = nn.BatchNorm2d(6, momentum=0.0), nn.Dropout(0.5)
        self.c, self.fc = nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.a(x) + self.b(x))))
        return self.fc(F.relu(self.c(h)).mean((2, 3)))


def test_training_mode_in_the_head_takes_the_full_path():
    """A BN in the head in training mode (batch statistics couple the full computation's
    stacked copies, so the narrowed VJP on N images differs) or a dropout in training mode:
    the full path, as for the unit's own BN; in eval mode the narrowed one, equal to it."""
    net, x = _seeded(HeadBNNet, (5, 2, 6, 6))
    graph = nchains.analyze(net, x[:1])
    step = _compare(graph, x, "c", [0, 3])
    assert step.narrow.usable and step.narrow.masks is None
    lowers = graph.dag.producers("c")
    with torch.no_grad():
        values = prefix_graph(graph, lowers)(x)
    for module in (net.bn, net.drop):
        module.train()
        try:
            assert not step.narrow.usable
            torch.manual_seed(1)
            got = step_relevance(step, x, values, [0, 3])
            torch.manual_seed(1)
            want = step_relevance(step, x, values, [0, 3], narrow=False)
        finally:
            module.eval()
        for lo in lowers:
            torch.testing.assert_close(got[lo], want[lo], rtol=0, atol=0)


def test_parameters_changed_after_the_step_is_built():
    """Step graphs are built once per analysis and reused (nchains.ssa caches them): a
    parametrization's original changed in place and parameters replaced afterwards are what the
    full computation uses, and so does the narrowed step."""
    net, x, _ = _net("variants")
    net = copy.deepcopy(net)
    graph = nchains.analyze(net, x[:1])
    steps = {u: step_graph(graph, u, graph.dag.producers(u)) for u in ("g1", "p1", "hidden", "head")}
    with torch.no_grad():
        values = {u: prefix_graph(graph, graph.dag.producers(u))(x) for u in steps}
    old = {u: step_relevance(step, x, values[u], _neurons(graph, u), narrow=False) for u, step in steps.items()}
    with torch.no_grad():
        net.p1.parametrizations.weight.original.mul_(-1.5)
        net.g1.weight = nn.Parameter(net.g1.weight.flip(0))
        net.hidden.weight = nn.Parameter(net.hidden.weight * 2)
        net.head.weight = nn.Parameter(net.head.weight.flip(1))
    for upper, step in steps.items():
        assert step.narrow is not None and step.narrow.usable
        neurons = _neurons(graph, upper)
        want = step_relevance(step, x, values[upper], neurons, narrow=False)
        got = step_relevance(step, x, values[upper], neurons)
        for lo in want:
            torch.testing.assert_close(got[lo], want[lo], rtol=1e-9, atol=1e-12, msg=f"{upper} <- {lo}")
            assert not torch.allclose(want[lo], old[upper][lo]), f"{upper} <- {lo}: the change changes nothing"
