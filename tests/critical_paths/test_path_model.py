"""The path model: exactly the original at the image, constants off the path, no gradient
through them; checked against forward hooks on a model without reused modules."""

import pytest
import torch
import torchvision

import nchains
from nchains import zoo
from nchains.critical_paths.path_model import build_path_model, site_activations
from nchains.instrument.taps import sites, tap
from tests.critical_paths._helpers import plain_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_masks(graph, p=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s.key: torch.rand(s.shape[1:], generator=g) < p for s in sites(graph)}


def _hooked(model, masks, constants):
    """The reference: forward hooks on the (not reused) activation modules of PlainCNN."""
    handles = []
    for name, module in (("act1", model.act1), ("act2", model.act2)):
        def hook(mod, inp, out, name=name):
            return torch.where(masks[name], out, constants[name])
        handles.append(module.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("which", ["shipped", "resnet18"])
def test_path_model_returns_exactly_the_original_logits_at_the_image(which):
    if which == "shipped":
        model = zoo.default_model()
        x = zoo.default_images(["bag"], per_class=1)[0]
    else:
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).eval()
        x = torch.randn(1, 3, 32, 32)
    graph = nchains.analyze(model, x)
    phi = build_path_model(graph, _random_masks(graph), image=x)
    with torch.no_grad():
        assert torch.equal(phi(x), model(x))
        # away from the image it is another function (the masks matter)
        assert not torch.allclose(phi(x + 0.5), model(x + 0.5))


def test_constants_match_forward_hooks_away_from_the_image():
    model = plain_cnn()
    gen = torch.Generator().manual_seed(1)
    x, other = torch.randn(1, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    graph = nchains.analyze(model, x)
    masks = _random_masks(graph, 0.5, seed=2)
    with torch.no_grad():
        original = {"act1": model.act1(model.conv1(x))[0]}
        original["act2"] = model.act2(model.conv2(original["act1"][None]))[0]
    for constants, values in (("original", original), ("zero", {k: torch.zeros_like(v) for k, v in original.items()})):
        phi = build_path_model(graph, masks, constants, image=x)
        handles = _hooked(model, masks, values)
        try:
            with torch.no_grad():
                want = model(other)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            assert torch.allclose(phi(other), want, atol=1e-6), constants
    assert {k: v.tolist() for k, v in site_activations(graph, sites(graph), x).items()} == \
        {k: v.tolist() for k, v in original.items()}


def test_no_gradient_flows_through_neurons_off_the_path():
    model = plain_cnn()
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    graph = nchains.analyze(model, x)
    masks = {s.key: torch.ones(s.shape[1:], dtype=torch.bool) for s in sites(graph)}
    masks["act1"][:] = False  # the first site entirely off the path: Φ(x; e) is constant in x
    phi = build_path_model(graph, masks, image=x, return_sites=True)
    xg = x.clone().requires_grad_(True)
    logits, gated = phi(xg)
    (grad,) = torch.autograd.grad(logits[0, 0], xg)
    assert torch.count_nonzero(grad) == 0
    assert list(gated) == ["act1", "act2"] and gated["act2"].shape == (1, 4, 1, 1)
    with torch.no_grad():
        assert torch.equal(gated["act1"], model.act1(model.conv1(x)))  # held at the original values


def test_masks_and_constants_are_overwritable_buffers():
    model = zoo.default_model()
    x = zoo.default_images(["sandal"], per_class=1)[0]
    graph = nchains.analyze(model, x)
    first, second = _random_masks(graph, 0.5, 0), _random_masks(graph, 0.2, 1)
    phi = build_path_model(graph, first, "zero", image=x)
    phi.set_masks(second)
    fresh = build_path_model(graph, second, "zero", image=x)
    y = x + 0.1
    with torch.no_grad():
        assert torch.equal(phi(y), fresh(y))
        phi.set_constants(site_activations(graph, sites(graph), x))
        assert torch.equal(phi(x), model(x))
        # a float mask blends: m = 0.5 everywhere at the image, constants = original -> the original
        phi.set_masks({k: torch.full_like(m, 0.5, dtype=torch.float32) for k, m in second.items()})
        assert torch.allclose(phi(x), model(x), atol=1e-5)
    assert set(phi.masks) == {s.key for s in sites(graph)}
    assert all(not b.requires_grad for b in phi.constants.values())


def test_return_sites_values_are_the_tapped_activations_at_the_image():
    model = zoo.default_model()
    x = zoo.default_images(["coat"], per_class=1)[0]
    graph = nchains.analyze(model, x)
    phi = build_path_model(graph, _random_masks(graph), image=x, return_sites=True)
    with torch.no_grad():
        logits, values = phi(x)
        ref_logits, ref = tap(graph, sites(graph))(x)
    assert torch.equal(logits, ref_logits)
    assert list(values) == list(ref) and all(torch.equal(values[k], ref[k]) for k in ref)


def test_bad_masks_and_constants_are_refused():
    model = plain_cnn()
    x = torch.randn(1, 1, 8, 8)
    graph = nchains.analyze(model, x)
    good = _random_masks(graph)
    with pytest.raises(ValueError, match="unknown site 'nope'"):
        build_path_model(graph, {**good, "nope": torch.ones(1, dtype=torch.bool)}, image=x)
    with pytest.raises(ValueError, match=r"neuron shape \[4, 1, 1\], got \[4\]"):
        build_path_model(graph, {**good, "act2": torch.ones(4, dtype=torch.bool)}, image=x)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        build_path_model(graph, {**good, "act2": torch.full((4, 1, 1), 2.0)}, image=x)
    with pytest.raises(TypeError, match="bool or floating point"):
        build_path_model(graph, {**good, "act2": torch.ones(4, 1, 1, dtype=torch.long)}, image=x)
    with pytest.raises(ValueError, match="needs the image"):
        build_path_model(graph, good)
    with pytest.raises(ValueError, match="constants must be 'original', 'zero'"):
        build_path_model(graph, good, "mean", image=x)
    with pytest.raises(ValueError, match="non-finite"):
        build_path_model(graph, good, {"act1": torch.full((16, 8, 8), float("nan")),
                                       "act2": torch.zeros(4, 1, 1)})


def test_float64_model_path_model_and_attribution_follow_its_dtype():
    from nchains.critical_paths import CriticalPath

    model = zoo.default_model().double()
    x = zoo.default_images(["shirt"], per_class=1)[0]  # float32: moved to the model's dtype
    graph = nchains.analyze(model, x.double())
    masks = _random_masks(graph, 0.3)
    path = CriticalPath(model, x, masks, target="pred", method="test", graph=graph)
    assert path.image.dtype == torch.float64
    phi = path.linear_model()
    assert all(b.dtype == torch.float64 for b in phi.constants.values())
    with torch.no_grad():
        assert torch.equal(phi(path.image), model(path.image))
    assert path.attribution().dtype == torch.float64
