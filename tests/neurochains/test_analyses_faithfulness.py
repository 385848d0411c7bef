"""Faithfulness: the batched removal of each kept filter against brute force (the chain re-applied
without that filter), and the rank correlation against a hand computation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from nchains.neurochains.analyses import faithfulness, plot_faithfulness
from nchains.neurochains.analyses.faithfulness import removable_filters
from nchains.neurochains.analyses.ranks import average_ranks, pearson, spearman

from _analyses_chain import REMOVED_BLOCK, analyses_chain

pytestmark = pytest.mark.usefixtures("one_thread")


def _without(chain, layer, f):
    pos = chain.kept[layer].index(f)
    kept = dict(chain.kept, **{layer: [i for i in chain.kept[layer] if i != f]})
    scores = dict(chain.scores, **{layer: [s for k, s in enumerate(chain.scores[layer]) if k != pos]})
    metrics = dict(chain.metrics, filters_kept=chain.metrics["filters_kept"] - 1,
                   layers_kept=sum(1 for v in kept.values() if v))
    return dataclasses.replace(chain, kept=kept, scores=scores, metrics=metrics)


@pytest.fixture(scope="module")
def result():
    net, images, _, chain = analyses_chain()
    return faithfulness(chain, net, images, batch_size=100)  # several forwards of 8 variants


def test_damage_matches_brute_force(result):
    net, images, _, chain = analyses_chain()
    rows = {(r["layer"], r["filter"]): r for r in result["filters"]}
    with torch.no_grad():
        y = net(images).argmax(1)
        q = F.softmax(chain.apply(net)(images).double(), 1)
    for layer in ("conv1", "layer1.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"):
        for f in chain.kept[layer][:2]:
            with torch.no_grad():
                r = F.softmax(_without(chain, layer, f).apply(net)(images).double(), 1)
            damage = float((q[range(len(y)), y] - r[range(len(y)), y]).mean())
            changed = float((r.argmax(1) != y).double().mean())
            kl = float((q * (q.log() - r.log())).sum(1).mean())
            got = rows[(layer, f)]
            assert got["damage"] == pytest.approx(damage, abs=1e-5)
            assert got["changed"] == pytest.approx(changed)
            assert got["kl"] == pytest.approx(kl, abs=1e-5)
            assert got["score"] == pytest.approx(chain.scores[layer][chain.kept[layer].index(f)])


def test_filters_of_a_removed_block_are_left_out(result):
    _, _, _, chain = analyses_chain()
    inside = set(chain.regions[REMOVED_BLOCK]["layers"])
    expected = sum(len(v) for k, v in chain.kept.items() if k not in inside)
    assert len(result["filters"]) == expected == len(removable_filters(chain))
    assert not inside & {r["layer"] for r in result["filters"]}


def test_batch_size_does_not_change_the_numbers(result):
    net, images, _, chain = analyses_chain()
    small = faithfulness(chain, net, images, batch_size=1)  # one variant per forward
    for a, b in zip(result["filters"], small["filters"]):
        assert a["damage"] == pytest.approx(b["damage"], abs=1e-6)


def test_correlations_are_those_of_the_rows(result):
    rows = result["filters"]
    s = torch.tensor([r["score"] for r in rows], dtype=torch.float64)
    d = torch.tensor([r["damage"] for r in rows], dtype=torch.float64)

    def ranks(v):  # average ranks: 1 + number below + (number equal - 1) / 2
        return torch.stack([1 + (v < x).sum() + ((v == x).sum() - 1) / 2 for x in v]).double()

    rho = torch.corrcoef(torch.stack([ranks(s), ranks(d)]))[0, 1]
    assert result["spearman"] == pytest.approx(float(rho), abs=1e-9)
    assert result["pearson"] == pytest.approx(float(torch.corrcoef(torch.stack([s, d]))[0, 1]), abs=1e-9)


def test_ranks_and_spearman_by_hand():
    assert average_ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    # a = [1, 2, 3, 4], b = [1, 3, 2, 4]: d = [0, 1, -1, 0], rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and pearson([1.0], [2.0]) is None
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [1, 2, 2, 3, 5, 5, 5], [2, 1, 4, 4, 3, 9, 0]
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)


def test_plot_has_its_titles(result):
    fig = plot_faithfulness(result)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("Faithfulness: damage of removing one filter (Spearman")
    assert len(fig.axes[0].collections[0].get_offsets()) == len(result["filters"])


def test_refuses_bad_arguments():
    net, images, _, chain = analyses_chain()
    with pytest.raises(ValueError, match="batch_size"):
        faithfulness(chain, net, images, batch_size=0)
    with pytest.raises(TypeError, match="chain must be"):
        faithfulness("chain.json", net, images)
    with pytest.raises(ValueError, match="images must have shape"):
        faithfulness(chain, net, images[:, :, :4])
    bad = images.clone()
    bad[2, 0, 1, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        faithfulness(chain, net, bad)
