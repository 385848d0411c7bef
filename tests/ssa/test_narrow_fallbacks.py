"""The narrowed SSA step's fallbacks and edge cases: a tail it does not handle against plain
per-(neuron, image) autograd; a BN in training mode, module hooks and training-mode modules in
the head take the full path; parameters changed after the step is built; memory layouts,
batches of one and repeated neurons; and whole SSA graphs identical with and without
narrowing (the nets are those of test_narrow_step.py)."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nchains
from nchains.models import zoo
from nchains.ssa import analysis
from nchains.ssa.step import prefix_graph, step_graph, step_relevance
from _models import digits_region, trained_digits_net
from test_narrow_step import _net, _neurons, _seeded

pytestmark = pytest.mark.usefixtures("one_thread")


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
