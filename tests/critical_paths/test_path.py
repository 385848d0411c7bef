"""CriticalPath: the sparsity-0 gradient identity, local linearity (Prop. 4/5), checks."""

import pytest
import torch

import nchains
from nchains import zoo
from nchains.critical_paths import CriticalPath, select
from nchains.instrument.taps import sites
from tests.critical_paths._helpers import neuron_mct, plain_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped():
    model = zoo.default_model()
    x = zoo.default_images(["sneaker"], per_class=1)[0]
    graph = nchains.analyze(model, x)
    scores, target = neuron_mct(graph, x)
    return model, x, graph, scores, target


def _input_grad(f, x, target):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(f(x)[0, target], x)[0]


def test_sparsity_zero_attribution_is_the_plain_input_gradient(shipped):
    model, x, graph, scores, target = shipped
    path = CriticalPath(model, x, select(scores, 0.0), target=target, method="mct", graph=graph)
    assert path.sparsity == 0.0 and path.n_kept == path.n_total == sum(s.numel() for s in scores.values())
    want = _input_grad(model, x, target)
    assert torch.allclose(path.attribution(), want, rtol=1e-6, atol=1e-7)
    assert torch.allclose(path.attribution(times_input=True), want * x, rtol=1e-6, atol=1e-7)


def test_path_gradient_is_stable_in_a_small_ball_where_the_plain_gradient_is_not(shipped):
    model, x, graph, scores, target = shipped
    path = CriticalPath(model, x, select(scores, 0.9), target=target, method="mct", contributions=scores,
                        graph=graph, requested_sparsity=0.9)
    assert path.threshold > 0  # c_kappa > 0: Prop. 5's condition, so every path neuron is active
    phi = path.linear_model()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    at_x = path.attribution()
    assert torch.equal(at_x, _input_grad(phi, x, target))
    plain = _input_grad(model, x, target)
    for eps in (1e-4, 1e-3):
        near = _input_grad(phi, x + eps * noise, target)
        assert float((near - at_x).norm() / at_x.norm()) < 1e-5, eps  # one linear region
    plain_near = _input_grad(model, x + 1e-3 * noise, target)
    assert float((plain_near - plain).norm() / plain.norm()) > 1e-2  # the full network's is not


def test_path_neurons_are_active_and_summary_counts(shipped):
    model, x, graph, scores, target = shipped
    path = CriticalPath(model, x, select(scores, 0.99), target=target, method="mct", contributions=scores,
                        graph=graph, requested_sparsity=0.99)
    from nchains.critical_paths.path_model import site_activations

    acts = site_activations(graph, path.sites, path.image)
    assert all(bool((acts[k][m] > 0).all()) for k, m in path.mask.items())  # Remark 2: no dead neuron
    s = path.summary()
    assert s["kept"] == round(0.01 * path.n_total) == sum(e["kept"] for e in s["sites"])
    assert [e["key"] for e in s["sites"]] == [site.key for site in sites(graph)]
    assert s["sites"][0]["label"] == "Conv1" and s["target"] == target
    assert abs(path.sparsity - 0.99) < 1e-4
    with torch.no_grad():  # the zero-constant model is another function, equal only with every neuron kept
        assert not torch.allclose(path.linear_model("zero")(x), model(x))


def test_constructor_refuses_what_does_not_fit_the_model():
    model = plain_cnn()
    x = torch.randn(1, 1, 8, 8)
    graph = nchains.analyze(model, x)
    good = {s.key: torch.ones(s.shape[1:], dtype=torch.bool) for s in sites(graph)}
    cases = [
        (dict(mask={"act1": good["act1"]}), ValueError, "no entry for site 'act2'"),
        (dict(mask={**good, "act9": good["act1"]}), ValueError, "unknown site 'act9'"),
        (dict(mask={**good, "act2": torch.ones(4, dtype=torch.bool)}), ValueError, "neuron shape [4, 1, 1]"),
        (dict(mask={**good, "act2": torch.ones(4, 1, 1)}), TypeError, "must be a BoolTensor"),
        (dict(target=3), ValueError, "class index in [0, 3), got 3"),
        (dict(target="max"), ValueError, "target must be 'pred' or a class index"),
        (dict(image=torch.randn(2, 1, 8, 8)), ValueError, "must be one image"),
        (dict(image=torch.full((1, 8, 8), float("nan"))), ValueError, "non-finite"),
        (dict(method=""), TypeError, "method must be a non-empty str"),
        (dict(requested_sparsity=2.0), ValueError, "sparsity must be a number in [0, 1]"),
        (dict(contributions={"act1": torch.zeros(16, 8, 8)}), TypeError, "contributions['act2']"),
    ]
    for change, err, needle in cases:
        args = dict(model=model, image=x, mask=good, target=0, method="test", **{})
        args.update(change)
        with pytest.raises(err) as info:
            CriticalPath(args.pop("model"), args.pop("image"), args.pop("mask"), **args)
        assert needle in str(info.value), (change, str(info.value))
    path = CriticalPath(model, x[0], good, target="pred", method="test")  # [C, H, W] is one image
    assert path.image.shape == (1, 1, 8, 8) and path.target == int(model(x).argmax())
