import numpy as np
import pytest
import torch

from nchains.metrics import jaccard, jaccard_matrix

SHAPES = {"a": (3, 4, 4), "b": (5,), "c": (2, 2)}


def random_mask(seed, p=0.4):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(s, generator=gen) < p for k, s in SHAPES.items()}


def index_set(mask, keys):
    """The path as a Python set of (site, flat neuron index)."""
    return {(k, int(i)) for k in keys for i in np.flatnonzero(mask[k].numpy().ravel())}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_network_and_per_layer_match_python_sets(seed):
    m1, m2 = random_mask(seed), random_mask(seed + 10, p=0.6)
    s1, s2 = index_set(m1, SHAPES), index_set(m2, SHAPES)
    assert jaccard(m1, m2) == pytest.approx(len(s1 & s2) / len(s1 | s2))
    r = jaccard(m1, m2, per_layer=True)
    assert r["network"] == pytest.approx(len(s1 & s2) / len(s1 | s2))
    assert list(r["per_layer"]) == list(SHAPES)
    for k in SHAPES:
        a, b = index_set(m1, [k]), index_set(m2, [k])
        assert r["per_layer"][k] == pytest.approx(len(a & b) / len(a | b) if a | b else 1.0)


def test_identical_disjoint_and_empty():
    m = random_mask(0)
    assert jaccard(m, m) == 1.0
    assert jaccard(m, {k: ~v for k, v in m.items()}) == 0.0
    empty = {k: torch.zeros(s, dtype=torch.bool) for k, s in SHAPES.items()}
    assert jaccard(empty, empty) == 1.0
    assert jaccard(empty, m) == 0.0


def test_matrix_is_the_pairwise_jaccard():
    paths = {f"p{i}": random_mask(i) for i in range(3)}
    r = jaccard_matrix(paths, per_layer=True)
    assert r["names"] == ["p0", "p1", "p2"] and r["layers"] == list(SHAPES)
    for i, a in enumerate(r["names"]):
        assert r["matrix"][i][i] == 1.0
        for j, b in enumerate(r["names"]):
            assert r["matrix"][i][j] == pytest.approx(jaccard(paths[a], paths[b]))
            for k in SHAPES:
                assert r["per_layer"][k][i][j] == pytest.approx(jaccard(paths[a], paths[b], True)["per_layer"][k])


@pytest.mark.parametrize("other, needle", [
    ({"a": torch.zeros(3, 4, 4, dtype=torch.bool)}, "same sites"),
    ({**random_mask(1), "b": torch.zeros(4, dtype=torch.bool)}, "one shape per site"),
    ({**random_mask(1), "b": torch.zeros(5)}, "BoolTensor"),
    ("mask", "CriticalPath or a mapping"),
])
def test_mismatched_paths_are_refused(other, needle):
    with pytest.raises((TypeError, ValueError)) as e:
        jaccard(random_mask(0), other)
    assert needle in str(e.value)


def test_per_layer_must_be_a_bool():
    with pytest.raises(TypeError, match="per_layer"):
        jaccard(random_mask(0), random_mask(1), per_layer="yes")
