"""The chain graph: one node per computed kept filter, edges weighted by sum |W| over the kernel
(checked by hand from the model's own weights), through residual adds and a channel concat."""

import dataclasses
import re

import pytest
import torch
from torch import nn

import nchains
from nchains.report.chain_graph import chain_graph
from nchains.report.chain_svg import chain_svg, drawn_edges

from _analyses_chain import REMOVED_BLOCK, analyses_chain

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(cg):
    return {(e.src_layer, e.src, e.dst_layer, e.dst): e.weight for e in cg.edges}


def test_nodes_are_the_computed_kept_filters_and_the_svg_draws_each_once():
    net, images, _, chain = analyses_chain()
    cg = chain_graph(chain, nchains.analyze(net, images[:1]))
    removed = set(chain.regions[REMOVED_BLOCK]["layers"])
    want = sum(len(idx) for layer, idx in chain.kept.items() if layer not in removed)
    assert sum(len(c.kept) for c in cg.columns if c.status == "kept") == want
    assert {c.name for c in cg.columns if c.status == "skipped"} == removed
    svg = chain_svg(cg, edges_per_filter=None, class_names=chain.class_names)
    assert len(re.findall(r'<circle class="filter"', svg)) == want
    assert len(re.findall(r'<path class="edge"', svg)) == sum(1 for e in cg.edges if e.weight > 0)
    assert svg.count('class="skipped-layer"') == len(removed) and "removed (identity)" in svg
    assert "L1B1C1_" in svg and "score" in svg
    two = chain_svg(cg, edges_per_filter=2)
    into = {}
    for e in drawn_edges(cg, 2):
        into[(e.dst_layer, e.dst)] = into.get((e.dst_layer, e.dst), 0) + 1
    assert max(into.values()) == 2 and len(re.findall(r'<path class="edge"', two)) == sum(into.values())


def test_edge_weights_by_hand_through_residual_adds():
    net, images, _, chain = analyses_chain()
    cg = chain_graph(chain, nchains.analyze(net, images[:1]))
    w = _weights(cg)
    k = chain.kept
    # layer2.0.conv1 reads layer1's output: conv1 + layer1.0.conv2 (through the adds); layer1.1 is removed
    conv = net.layer2[0].conv1.weight.detach().double().abs().sum((2, 3))
    want = {(src, a, "layer2.0.conv1", b): float(conv[b, a]) for src in ("conv1", "layer1.0.conv2")
            for a in k[src] for b in k["layer2.0.conv1"]}
    got = {key: v for key, v in w.items() if key[2] == "layer2.0.conv1"}
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9)
    # the classifier: the three producers of the last add, |fc.weight| of each channel
    fc = net.fc.weight.detach().abs().double()
    srcs = ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2")
    want = {(s, a, "classes", c): float(fc[c, a]) for s in srcs for a in k[s] for c in sorted(chain.classes)}
    got = {key: v for key, v in w.items() if key[2] == "classes"}
    assert got.keys() == want.keys() and all(got[x] == pytest.approx(want[x], rel=1e-9) for x in want)


class _Cat(nn.Module):
    """Two convs concatenated along channels (3 + 2), then a grouped conv reading the concat."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 2, 1)
        self.c = nn.Conv2d(5, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.head(torch.relu(self.c(y)).mean((2, 3)))


def test_edge_weights_by_hand_through_a_concat():
    torch.manual_seed(0)
    net = _Cat().eval()
    x = torch.randn(4, 1, 6, 6)
    full = nchains.extract(net, x, steps=0, finetune_steps=0, progress=False)
    kept = {"a": [0, 2], "b": [1], "c": [0, 3]}
    chain = dataclasses.replace(full, kept=kept, scores={n: [1.0] * len(v) for n, v in kept.items()},
                                strongest_filters={})
    w = _weights(chain_graph(chain, nchains.analyze(net, x[:1])))
    wc = net.c.weight.detach().double().abs().sum((2, 3))
    want = {("a", i, "c", o): float(wc[o, i]) for i in (0, 2) for o in (0, 3)}
    want.update({("b", 1, "c", o): float(wc[o, 3 + 1]) for o in (0, 3)})  # b's channel 1 is the concat's 4
    got = {key: v for key, v in w.items() if key[2] == "c"}
    assert got.keys() == want.keys() and all(got[x] == pytest.approx(want[x], rel=1e-9) for x in want)
