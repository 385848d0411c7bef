"""SSA's steps against independent computations on a small trained ResNet (tests/_models.py
DigitsNet): relevance by plain autograd per (neuron, image) on a hand-written forward with the
producers' outputs as leaves, Tukey fences by numpy percentiles, frequency and top-b by hand;
the residual adjacency rule, pooling skip (a VGG-like net) and a channel concat."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nchains
from nchains.ssa.outliers import outliers, select_top
from nchains.ssa.step import prefix_graph, step_graph, step_relevance
from _models import digits_region, trained_digits_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net():
    return trained_digits_net()


@pytest.fixture(scope="module")
def images():
    return digits_region(classes=(7,), per_class=12)[0]


@pytest.fixture(scope="module")
def graph(net, images):
    return nchains.analyze(net, images[:1])


@pytest.fixture(scope="module")
def result(net, images, graph):
    return nchains.ssa(net, images, target=7, branching=2, graph=graph)


def _rel(graph, upper, lowers, x, neurons, response="mean"):
    """nchains' step: producers' outputs from a prefix forward, then the step graph's VJP."""
    with torch.no_grad():
        values = prefix_graph(graph, lowers)(x)
    return step_relevance(step_graph(graph, upper, lowers), x, values, neurons, response)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _parts(net, x):
    """Every unit output of DigitsNet by hand: stem, per block (conv1 unit, conv2 unit = bn2
    output, shortcut unit = downsample output or None)."""
    out = {"conv1": F.relu(net.bn1(net.conv1(x)))}
    stream = out["conv1"]
    for s, stage in enumerate((net.layer1, net.layer2), start=1):
        for b, blk in enumerate(stage):
            p = f"layer{s}.{b}."
            out[p + "conv1"] = F.relu(blk.bn1(blk.conv1(stream)))
            out[p + "conv2"] = blk.bn2(blk.conv2(out[p + "conv1"]))
            short = stream
            if blk.downsample is not None:
                out[p + "downsample.0"] = short = blk.downsample(stream)
            stream = F.relu(out[p + "conv2"] + short)
    return out


def _hand_omega(upper_fn, lowers, parts, neurons, n_images):
    """omega[n, i, k] by one autograd call per (neuron, image) of ``upper_fn(leaves)``."""
    out = {lo: torch.zeros(len(neurons), n_images, parts[lo].shape[1]) for lo in lowers}
    for i in range(n_images):
        leaves = {lo: _leaf(parts[lo][i:i + 1]) for lo in lowers}
        resp = upper_fn(leaves)
        for j, n in enumerate(neurons):
            grads = torch.autograd.grad(resp[0, n], [leaves[lo] for lo in lowers], retain_graph=True)
            for lo, g in zip(lowers, grads):
                out[lo][j, i] = g[0].mean((1, 2)) if g.dim() == 4 else g[0]
    return out


def test_fc_step_is_the_residual_stream_partial_derivative(net, images, graph):
    """The classifier's lower layers are the three units feeding the last stream; each is
    differentiated with the others held: fc(gap(relu(c + relu(a + b))))."""
    lowers = ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2")
    assert graph.dag.producers("fc") == lowers
    with torch.no_grad():
        parts = _parts(net, images)

    def upper(lv):
        s = F.relu(lv["layer2.0.conv2"] + lv["layer2.0.downsample.0"])
        return net.fc(torch.flatten(net.avgpool(F.relu(lv["layer2.1.conv2"] + s)), 1))

    want = _hand_omega(upper, lowers, parts, [3, 5], len(images))
    got = _rel(graph, "fc", lowers, images, [3, 5])
    for lo in lowers:
        torch.testing.assert_close(got[lo], want[lo], rtol=1e-4, atol=1e-6)


def test_conv_step_through_a_block_input(net, images, graph):
    """layer2.0.conv1 reads relu(layer1.1.conv2 + relu(layer1.0.conv2 + conv1)); its response
    is the spatial mean of its ReLU output channel."""
    lowers = graph.dag.producers("layer2.0.conv1")
    assert lowers == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    with torch.no_grad():
        parts = _parts(net, images)
    blk = net.layer2[0]

    def upper(lv):
        s = F.relu(lv["layer1.1.conv2"] + F.relu(lv["layer1.0.conv2"] + lv["conv1"]))
        return F.relu(blk.bn1(blk.conv1(s))).mean((2, 3))

    neurons = [0, 7, 31]
    want = _hand_omega(upper, lowers, parts, neurons, len(images))
    got = _rel(graph, "layer2.0.conv1", lowers, images, neurons)
    for lo in lowers:
        torch.testing.assert_close(got[lo], want[lo], rtol=1e-4, atol=1e-6)


def test_max_response(net, images, graph):
    with torch.no_grad():
        parts = _parts(net, images)
    blk = net.layer1[1]

    def upper(lv):
        return blk.bn2(blk.conv2(lv["layer1.1.conv1"])).amax((2, 3))

    want = _hand_omega(upper, ["layer1.1.conv1"], parts, [2, 9], len(images))
    got = _rel(graph, "layer1.1.conv2", ["layer1.1.conv1"], images, [2, 9], response="max")
    torch.testing.assert_close(got["layer1.1.conv1"], want["layer1.1.conv1"], rtol=1e-4, atol=1e-6)


def test_tukey_fences_match_numpy_percentiles():
    gen = torch.Generator().manual_seed(1)
    for k in (1, 2, 5, 16, 33):
        omega = torch.randn(4, 6, k, generator=gen, dtype=torch.float64)
        omega[..., 0] += 4 * (k > 2)  # an outlier in most rows
        a = omega.numpy()
        q1, q3 = np.percentile(a, 25, axis=-1, keepdims=True), np.percentile(a, 75, axis=-1, keepdims=True)
        want = a > q3 + 1.5 * (q3 - q1)
        assert (outliers(omega).numpy() == want).all()
    # only positive outliers: a very negative value is not relevant
    assert outliers(torch.tensor([[0.0, 0.1, 0.2, 0.1, -50.0]])).tolist() == [[False] * 5]


def test_select_top_ties_by_mean_then_index():
    freq = torch.tensor([[3, 5, 5, 0, 5, 1], [0, 0, 0, 0, 0, 0], [2, 2, 2, 2, 0, 0]])
    mean = torch.tensor([[9.0, 1.0, 2.0, 99.0, 2.0, 0.0], [1.0] * 6, [0.5, 0.7, 0.7, 0.1, 5.0, 5.0]],
                        dtype=torch.float64)
    got = select_top(freq, mean, 3)
    assert [[k for k, _, _ in row] for row in got] == [[2, 4, 1], [], [1, 2, 0]]
    assert got[0][0] == (2, 5, 2.0)
    # zero frequency is never picked, even when it would fill the branching
    assert [k for k, _, _ in select_top(freq, mean, 6)[0]] == [2, 4, 1, 0, 5]


def _hand_picks(omega, b):
    """STEPS 2-4 by hand with numpy: per upper neuron the top-b (frequency, mean, -index)."""
    a = omega.numpy().astype(np.float64)
    q1, q3 = np.percentile(a, 25, axis=-1, keepdims=True), np.percentile(a, 75, axis=-1, keepdims=True)
    freq = (a > q3 + 1.5 * (q3 - q1)).sum(1)
    mean = a.mean(1)
    picks = []
    for n in range(a.shape[0]):
        cands = sorted((k for k in range(a.shape[2]) if freq[n, k] > 0), key=lambda k: (-freq[n, k], -mean[n, k], k))
        picks.append({k: int(freq[n, k]) for k in cands[:b]})
    return picks


def test_first_two_levels_by_hand(net, images, graph, result):
    """The root's edges and the edges out of one lower unit recomputed from the hand-written
    forward: Tukey fences by numpy, frequencies counted, top-b by the documented order."""
    with torch.no_grad():
        parts = _parts(net, images)
    lowers = graph.dag.producers("fc")

    def fc_upper(lv):
        s = F.relu(lv["layer2.0.conv2"] + lv["layer2.0.downsample.0"])
        return net.fc(torch.flatten(net.avgpool(F.relu(lv["layer2.1.conv2"] + s)), 1))

    omega = _hand_omega(fc_upper, lowers, parts, [7], len(images))
    root = ("fc", 7)
    for lo in lowers:
        want = _hand_picks(omega[lo], 2)[0]
        got = {k[1]: f for u, k, f in result.edges if u == root and k[0] == lo}
        assert got == want, lo
    # the next level: layer2.1.conv2's nodes against their producer layer2.1.conv1
    neurons = sorted(k for layer, k in result.nodes if layer == "layer2.1.conv2")
    assert neurons
    blk = net.layer2[1]
    omega = _hand_omega(lambda lv: blk.bn2(blk.conv2(lv["layer2.1.conv1"])).mean((2, 3)), ["layer2.1.conv1"],
                        parts, neurons, len(images))["layer2.1.conv1"]
    for n, want in zip(neurons, _hand_picks(omega, 2)):
        got = {k[1]: f for u, k, f in result.edges if u == ("layer2.1.conv2", n)}
        assert got == want
        for k in got:
            assert result.relevance[(("layer2.1.conv2", n), ("layer2.1.conv1", k))] == pytest.approx(
                float(omega[neurons.index(n), :, k].mean()), rel=1e-4, abs=1e-7)


def test_graph_structure(graph, result, images):
    """Edges only along DAG producer -> consumer pairs, at most b per (upper node, lower layer),
    every node reached from the root."""
    dag = graph.dag
    assert result.nodes[-1] == ("fc", 7)  # layers in topological order: the classifier last
    per = {}
    for u, lo, f in result.edges:
        assert lo[0] in dag.producers(u[0])
        assert 1 <= f <= len(images)
        per[(u, lo[0])] = per.get((u, lo[0]), 0) + 1
    assert max(per.values()) <= 2
    reached = {("fc", 7)} | {lo for _, lo, _ in result.edges}
    assert reached == set(result.nodes)
    uppers = {u for u, _, _ in result.edges}
    assert uppers <= set(result.nodes)


def test_deterministic_and_chunk_independent(net, images, graph, result, monkeypatch):
    """Same graph with other chunks, and without the unit-output cache (recomputed per step)."""
    from nchains.ssa import analysis

    monkeypatch.setattr(analysis, "CACHE_BYTES", 0)
    again = nchains.ssa(net, images, target=7, branching=2, graph=graph, chunk=5)
    assert again.nodes == result.nodes and again.edges == result.edges
    for key, r in result.relevance.items():
        assert again.relevance[key] == pytest.approx(r, rel=1e-5, abs=1e-8)
    assert again.images_hash == result.images_hash


class PoolNet(nn.Module):
    """VGG-like: conv-relu-maxpool-conv-relu-avgpool-flatten-fc."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        x = self.pool(F.relu(self.c1(x)))
        x = F.adaptive_avg_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_pooling_is_skipped():
    """conv2's lower layer is conv1 itself: the relevance is taken through the max-pool to
    conv1's (pre-pool) output, the fc's through the average pool and flatten to conv2's."""
    torch.manual_seed(0)
    net = PoolNet().eval()
    x = torch.randn(9, 1, 8, 8)
    graph = nchains.analyze(net, x[:1])
    assert graph.dag.producers("c2") == ("c1",) and graph.dag.producers("fc") == ("c2",)
    with torch.no_grad():
        parts = {"c1": F.relu(net.c1(x))}
        parts["c2"] = F.relu(net.c2(net.pool(parts["c1"])))
    want = _hand_omega(lambda lv: F.relu(net.c2(net.pool(lv["c1"]))).mean((2, 3)), ["c1"], parts, [0, 5], len(x))
    got = _rel(graph, "c2", ["c1"], x, [0, 5])
    torch.testing.assert_close(got["c1"], want["c1"], rtol=1e-4, atol=1e-6)
    want = _hand_omega(lambda lv: net.fc(torch.flatten(F.adaptive_avg_pool2d(lv["c2"], 2), 1)), ["c2"], parts,
                       [1], len(x))
    got = _rel(graph, "fc", ["c2"], x, [1])
    torch.testing.assert_close(got["c2"], want["c2"], rtol=1e-4, atol=1e-6)
    result = nchains.ssa(net, x, target=1, branching=2)
    assert {lo[0] for _, lo, _ in result.edges} <= {"c1", "c2"}


class CatNet(nn.Module):
    """stem -> two branches -> channel concat -> mix conv -> gap -> fc."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.mix, self.fc = nn.Conv2d(10, 12, 3, padding=1), nn.Linear(12, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        s = self.relu(self.stem(x))
        y = torch.cat([self.relu(self.a(s)), self.relu(self.b(s))], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.relu(self.mix(y)), 1), 1))


def test_concat_branches_are_lower_layers_of_the_consumer():
    torch.manual_seed(0)
    net = CatNet().eval()
    x = torch.randn(7, 1, 6, 6)
    graph = nchains.analyze(net, x[:1])
    assert graph.dag.producers("mix") == ("a", "b")
    with torch.no_grad():
        s = F.relu(net.stem(x))
        parts = {"a": F.relu(net.a(s)), "b": F.relu(net.b(s))}
    want = _hand_omega(lambda lv: F.relu(net.mix(torch.cat([lv["a"], lv["b"]], 1))).mean((2, 3)), ["a", "b"],
                       parts, [0, 4, 11], len(x))
    got = _rel(graph, "mix", ["a", "b"], x, [0, 4, 11])
    for lo in ("a", "b"):
        assert got[lo].shape == (3, 7, parts[lo].shape[1])
        torch.testing.assert_close(got[lo], want[lo], rtol=1e-4, atol=1e-6)


def test_float64_model_and_linear_lower_layer():
    """A float64 model with a hidden Linear (an FC lower layer: the relevance vector as is)."""
    from test_analysis import UserCNN

    torch.manual_seed(0)
    net = UserCNN().eval().double()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    result = nchains.ssa(net, x, target=2, branching=2)
    assert result.root == ("head", 2) and result.nodes[-1] == ("head", 2)
    graph = nchains.analyze(net, x[:1])
    with torch.no_grad():
        h = F.relu(net.hidden(torch.flatten(net.gap(F.avg_pool2d(torch.relu(net.grouped(
            net.pool(net.branches(net.res(net.silu(net.same(F.relu(net.stem_bn(net.stem(x)))))))))), 1)), 1)))
    leaf = _leaf(h)
    want = torch.stack([torch.autograd.grad(net.head(leaf)[i, 2], leaf)[0][i] for i in range(len(x))])
    got = _rel(graph, "head", ["hidden"], x, [2])["hidden"]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-12)
