"""critical_path on the contribution engine: MCT against per-call taps, NeuronIntGrad's
completeness per site against the path model with that site zeroed, nesting, determinism."""

import pytest
import torch

import nchains
from nchains import zoo
from nchains.critical_paths import critical_path, critical_paths, select
from nchains.critical_paths.path_model import build_path_model
from tests.critical_paths._helpers import neuron_mct

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped():
    model = zoo.default_model()
    x = zoo.default_images(["ankle-boot"], per_class=1)[0]
    return model, x, nchains.analyze(model, x)


def test_mct_path_is_the_selection_of_tapped_taylor_scores(shipped):
    model, x, graph = shipped
    path = critical_path(model, x, 0.9, method="mct", graph=graph)
    scores, target = neuron_mct(graph, x)
    assert path.target == target and path.method == "mct"
    for key, ref in scores.items():
        assert torch.allclose(path.contributions[key], ref, rtol=1e-4, atol=1e-7), key
    want = select(scores, 0.9)
    differ = sum(int((path.mask[k] ^ want[k]).sum()) for k in want)
    assert differ <= 2  # only float ties at the threshold may swap
    assert path.n_kept == round(0.1 * path.n_total)


def test_intgrad_contributions_are_complete_per_site(shipped):
    model, x, graph = shipped
    path = critical_path(model, x, 0.9, method="intgrad", graph=graph)
    with torch.no_grad():
        phi = float(model(x)[0, path.target])
        for site in path.sites[::4]:
            zeroed = build_path_model(graph, {site.key: torch.zeros(site.shape[1:], dtype=torch.bool)}, "zero")
            gap = phi - float(zeroed(x)[0, path.target])
            total = float(path.contributions[site.key].sum())
            assert abs(total - gap) <= 0.02 * abs(gap) + 1e-3, (site.key, total, gap)
    assert path.threshold is not None and path.threshold > 0  # Prop. 5's condition at 90%


def test_paths_at_several_sparsities_nest_and_are_deterministic(shipped):
    model, x, graph = shipped
    loose, tight = critical_paths(model, x, [0.9, 0.99], method="mct", graph=graph)
    assert all(bool((tight.mask[k] <= loose.mask[k]).all()) for k in loose.mask)  # one network-wise ranking
    again = critical_path(model, x, 0.99, method="mct", graph=graph)
    assert all(torch.equal(again.mask[k], tight.mask[k]) for k in tight.mask)
    per = critical_path(model, x, 0.99, method="mct", graph=graph, per_layer=True)
    assert all(per.kept_per_site[s.key] == round(0.01 * per.mask[s.key].numel()) for s in per.sites)


@pytest.mark.parametrize("kwargs,err,needle", [
    (dict(sparsity=1.2), ValueError, "sparsity must be a number in [0, 1]"),
    (dict(method="shap"), ValueError, "method must be one of intgrad, mct"),
    (dict(steps=0), ValueError, "steps must be an int in [1, 100000]"),
    (dict(constants="mean"), ValueError, "constants must be 'original' or 'zero'"),
    (dict(target=10), ValueError, "class index in [0, 10), got 10"),
])
def test_bad_arguments_are_refused(shipped, kwargs, err, needle):
    model, x, graph = shipped
    with pytest.raises(err) as info:
        critical_path(model, x, **kwargs)
    assert needle in str(info.value)
