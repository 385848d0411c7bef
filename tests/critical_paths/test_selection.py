"""Network-wise and per-layer selection: exact counts, deterministic ties, against a sort."""

import pytest
import torch

import nchains
from nchains.critical_paths.selection import kept_count, select, threshold
from tests.critical_paths._helpers import neuron_mct, plain_cnn


def _scores(seed=0, shapes=((4, 5, 5), (7,), (3, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    return {f"s{i}": torch.randn(shape, generator=g) for i, shape in enumerate(shapes)}


def _by_sort(scores, k):
    """Reference: a full stable sort of (-value, site order, flat index); the first k are kept."""
    entries = [(-float(v), i, j) for i, t in enumerate(scores.values()) for j, v in enumerate(t.reshape(-1))]
    keep = {(i, j) for _, i, j in sorted(entries)[:k]}
    return {key: torch.tensor([(i, j) in keep for j in range(t.numel())]).reshape(t.shape)
            for i, (key, t) in enumerate(scores.items())}


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
def test_network_wise_matches_a_full_sort(sparsity):
    scores = _scores()
    total = sum(t.numel() for t in scores.values())
    got = select(scores, sparsity)
    k = round((1 - sparsity) * total)
    assert sum(int(m.sum()) for m in got.values()) == k
    want = _by_sort(scores, k)
    assert list(got) == list(scores)
    for key in scores:
        assert got[key].dtype == torch.bool and got[key].shape == scores[key].shape
        assert torch.equal(got[key], want[key]), key


def test_ties_keep_the_first_in_site_then_index_order():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.tensor([5.0, 1.0])}
    got = select(scores, 1 - 5 / 12)  # 5 of 12: c[0] (largest), then the first four ones
    assert got["c"].tolist() == [True, False]
    assert got["a"].reshape(-1).tolist() == [True] * 4 + [False] * 2
    assert not got["b"].any()
    assert torch.equal(_by_sort(scores, 5)["a"], got["a"])


def test_selection_is_deterministic_and_threshold_is_the_smallest_kept():
    scores = {k: v.round(decimals=1) for k, v in _scores(3).items()}  # many ties
    a, b = select(scores, 0.7), select(scores, 0.7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    kept = torch.cat([scores[k][a[k]] for k in a])
    dropped = torch.cat([scores[k][~a[k]] for k in a])
    assert threshold(scores, 0.7) == float(kept.min())
    assert float(dropped.max()) <= float(kept.min())
    assert threshold(scores, 1.0) == float("inf")


def test_per_layer_keeps_the_fraction_of_every_site():
    scores = _scores(1)
    got = select(scores, 0.8, per_layer=True)
    for key, t in scores.items():
        assert int(got[key].sum()) == round(0.2 * t.numel())
        assert torch.equal(got[key], _by_sort({key: t}, round(0.2 * t.numel()))[key])


def test_network_wise_and_per_layer_differ_where_layers_differ_in_scale():
    model = plain_cnn()
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    scores, _ = neuron_mct(nchains.analyze(model, x), x)
    big, small = list(scores)  # 1024 neurons of conv1, 4 of conv2
    assert scores[small].mean() > 20 * scores[big].mean()  # the construction's premise
    net, per = select(scores, 0.9), select(scores, 0.9, per_layer=True)
    assert int(per[small].sum()) == round(0.1 * 4) and int(per[big].sum()) == round(0.1 * 1024)
    total = 1028
    assert sum(int(m.sum()) for m in net.values()) == round(0.1 * total)
    # network-wise, the small site's neurons outrank the big one's: most of them are kept (per layer: none)
    assert int(net[small].sum()) >= 3 > int(per[small].sum())
    assert not torch.equal(net[big], per[big])


@pytest.mark.parametrize("bad,err,needle", [
    (-0.1, ValueError, "sparsity must be a number in [0, 1]"), (1.5, ValueError, "got 1.5"),
    (float("nan"), ValueError, "got nan"), ("0.9", TypeError, "got str"), (True, TypeError, "got bool"),
])
def test_bad_sparsity_is_refused(bad, err, needle):
    with pytest.raises(err) as info:
        select(_scores(), bad)
    assert needle in str(info.value)


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        select({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        select({"a": torch.tensor([1, 2])}, 0.5)
    with pytest.raises(TypeError, match="non-empty mapping"):
        select({}, 0.5)
    with pytest.raises(TypeError, match="per_layer must be a bool"):
        select(_scores(), 0.5, per_layer="yes")
    assert kept_count(0.9, 10) == 1
