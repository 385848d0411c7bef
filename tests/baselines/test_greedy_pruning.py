"""Greedy pruning (Algorithm 1) against a step-by-step reference built on module hooks."""

from __future__ import annotations

import warnings

import pytest
import torch

from nchains.baselines import GreedyStoppedEarly, greedy_paths, greedy_pruning
from nchains.critical_paths import CriticalPath
from tests.baselines._reference import greedy_by_hand, masked_scores, original_activations, small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(seed=1):
    return torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def _target(model, x):
    with torch.no_grad():
        return int(model(x)[0].argmax())


def _n(model, x):
    return sum(a.numel() for a in original_activations(model, x).values())


def test_first_step_is_the_brute_force_ranking():
    model, x = small_cnn(0), _image()
    t, n = _target(model, x), _n(model, x)
    ones = {k: torch.ones_like(a, dtype=torch.bool) for k, a in original_activations(model, x).items()}
    scores = masked_scores(model, x, ones, t)
    flat = torch.cat([s.flatten() for s in scores.values()])
    # sparsity = step: exactly one step of round(0.05 N) removals, of the lowest non-zero scores
    path = greedy_pruning(model, x, 0.05, step=0.05)
    n_rm = round(0.05 * n)
    live = torch.nonzero(flat != 0).flatten()
    assert len(live) > n_rm and len(live) < n  # the model has dead neurons, and enough live ones
    removed = live[torch.argsort(flat[live])[:n_rm]]
    expected = torch.ones(n, dtype=torch.bool)
    expected[removed] = False
    got = torch.cat([path.mask[k].flatten() for k in scores])
    assert torch.equal(got, expected)
    assert path.n_kept == n - n_rm and path.method == "greedy" and path.target == t
    assert flat[~got].min() > 0  # no dead neuron was removed


@pytest.mark.parametrize("sparsity,step", [(0.5, 0.01), (0.8, 0.05)])
def test_whole_run_matches_the_reference(sparsity, step):
    model, x = small_cnn(2, bias=0.3), _image(3)
    t, n = _target(model, x), _n(model, x)
    kappa = round((1 - sparsity) * n)
    ref, stuck = greedy_by_hand(model, x, kappa, t, step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GreedyStoppedEarly)
        path = greedy_pruning(model, x, sparsity, step=step)
    for k, m in ref.items():
        assert torch.equal(path.mask[k], m), k
    assert (path.n_kept > kappa) == stuck


def test_stops_when_the_non_zero_scores_run_out():
    model, x = small_cnn(0), _image()
    t = _target(model, x)
    with pytest.warns(GreedyStoppedEarly, match="reached"):
        path = greedy_pruning(model, x, 0.99)
    assert path.requested_sparsity == 0.99 and path.sparsity < 0.99
    # the stop condition: every neuron still on the path scores zero in the masked network
    scores = masked_scores(model, x, path.mask, t)
    assert all(float(scores[k][path.mask[k]].sum()) == 0 for k in scores)
    assert path.contributions is not None
    assert all(float(path.contributions[k].max()) == 0 for k in scores)


def test_continue_by_activation_reaches_the_sparsity():
    model, x = small_cnn(0), _image()
    n = _n(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GreedyStoppedEarly)
        path = greedy_pruning(model, x, 0.99, continue_by_activation=True)
    assert path.n_kept == round(0.01 * n)
    # up to the stop the two runs agree: continuing only removes neurons the stopped path kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GreedyStoppedEarly)
        short = greedy_pruning(model, x, 0.99)
    assert all(bool((path.mask[k] <= short.mask[k]).all()) for k in path.mask)


def test_several_sparsities_and_images_in_one_run():
    model = small_cnn(2, bias=0.3)
    xs = torch.cat([_image(3), _image(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GreedyStoppedEarly)
        both = greedy_paths(model, xs, [0.6, 0.3])
        alone = [greedy_pruning(model, xs[i:i + 1], 0.3) for i in range(2)]
    assert len(both) == 2 and [p.requested_sparsity for p in both[0]] == [0.6, 0.3]
    for i in range(2):
        assert all(torch.equal(both[i][1].mask[k], alone[i].mask[k]) for k in alone[i].mask)
        # the 60 % path continues from the 30 % one
        assert all(bool((both[i][0].mask[k] <= both[i][1].mask[k]).all()) for k in alone[i].mask)


def test_returns_a_working_critical_path():
    model, x = small_cnn(1, bias=0.3), _image(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GreedyStoppedEarly)
        path = greedy_pruning(model, x, 0.5, target=2)
    assert isinstance(path, CriticalPath) and path.target == 2
    with torch.no_grad():
        assert torch.allclose(path.linear_model()(x), model(x), atol=1e-6)  # original constants
    heat = path.attribution()
    assert heat.shape == x.shape and bool(torch.isfinite(heat).all())


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"sparsity": 1.5}, ValueError, "sparsity"),
    ({"sparsity": "0.9"}, TypeError, "sparsity"),
    ({"sparsity": 0.9, "step": 0.0}, ValueError, "step"),
    ({"sparsity": 0.9, "step": 1.5}, ValueError, "step"),
    ({"sparsity": 0.9, "step": float("nan")}, ValueError, "step"),
    ({"sparsity": 0.9, "continue_by_activation": 1}, TypeError, "continue_by_activation"),
    ({"sparsity": 0.9, "target": 9}, ValueError, "target"),
])
def test_bad_arguments(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        greedy_pruning(small_cnn(0), _image(), **kwargs)


def test_bad_images():
    model = small_cnn(0)
    with pytest.raises(ValueError, match="one image"):
        greedy_pruning(model, torch.zeros(2, 1, 6, 6), 0.9)
    bad = _image()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        greedy_pruning(model, bad, 0.9)
