"""Neuron integrated gradients: completeness on the shipped model, a per-step hook loop on a small
CNN, and chunking."""

import pytest
import torch

from nchains.contrib import contributions
from nchains.graph.analysis import analyze
from nchains.models import zoo

from _hooks import out_of_place, per_call, relu_names
from _models import random_digits_net

pytestmark = pytest.mark.usefixtures("one_thread")


def _phi_zero(model, x, key, target):
    """Φ(x; a = 0) with a hook zeroing one call's output, the rest of the network unchanged."""
    name = key.partition("@")[0]
    with torch.no_grad(), per_call(model, [name], replace={key: torch.zeros_like}, retain=False):
        return model(x).gather(1, target[:, None])[:, 0]


def _completeness(model, x, layers):
    c = contributions(model, x, method="intgrad", steps=50, layers=layers)
    ref = out_of_place(model)
    with torch.no_grad():
        phi = ref(x).gather(1, c.target[:, None])[:, 0]
    for key, value in c.items():
        gap = phi - _phi_zero(ref, x, key, c.target)
        total = value.sum(1)
        torch.testing.assert_close(c.delta[key], total - gap, rtol=1e-4, atol=1e-4)
        # per site, over the images: |delta| within 2% of |Φ(x) − Φ(x; a = 0)|; per image the
        # midpoint rule on a piecewise-linear path can do worse where the gap itself is small
        # (the stem of the bag image: gap 1.7 of a logit 9.3, error 7.7%), so a looser bound
        assert float(c.delta[key].abs().sum()) <= 0.02 * float(gap.abs().sum()), (key, c.delta[key], gap)
        assert bool((c.delta[key].abs() <= 0.1 * gap.abs() + 1e-3 * phi.abs()).all()), (key, c.delta[key], gap)


def test_completeness_on_the_shipped_model_early_middle_late_sites():
    model = zoo.default_model()
    x, _, _ = zoo.default_images(["sneaker", "bag"], per_class=1)
    _completeness(model, x, ["relu", "layer2.0.relu", "layer4.1.relu"])


@pytest.mark.slow
def test_completeness_on_the_shipped_model_every_site():
    model = zoo.default_model()
    x, _, _ = zoo.default_images(["sneaker", "ankle-boot", "bag"], per_class=1)
    _completeness(model, x, relu_names(model))


def _loop_reference(model, x, key, target, steps):
    """IG of one call's output by a plain loop over the steps, one hooked forward each."""
    name = key.partition("@")[0]
    with torch.no_grad(), per_call(model, [name], retain=False) as seen:
        model(x)
    a = seen[key].detach()
    total = torch.zeros_like(a)
    for j in range(steps):
        scaled = ((j + 0.5) / steps * a).requires_grad_(True)
        with per_call(model, [name], replace={key: lambda out, s=scaled: s}):
            model(x).gather(1, target[:, None]).sum().backward()
        total += scaled.grad
    return a * total / steps


def test_intgrad_equals_a_per_step_loop_on_a_small_cnn():
    model = random_digits_net(3)
    x = torch.randn(2, 1, 8, 8)
    target = torch.tensor([1, 6])
    c = contributions(model, x, method="intgrad", unit="neuron", target=target, steps=7)
    ref = out_of_place(model)
    assert list(c) == ["relu", "layer1.0.relu", "layer1.0.relu@1", "layer1.1.relu", "layer1.1.relu@1",
                       "layer2.0.relu", "layer2.0.relu@1", "layer2.1.relu", "layer2.1.relu@1"]
    for key in c:
        torch.testing.assert_close(c[key], _loop_reference(ref, x, key, target, 7), rtol=1e-4, atol=1e-6)
    channel = contributions(model, x, method="intgrad", target=target, steps=7)
    for key in c:
        torch.testing.assert_close(channel[key], c[key].sum((2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(channel.delta[key], c.delta[key], rtol=1e-4, atol=1e-5)


def test_batch_size_chunking_and_determinism():
    model = random_digits_net(1)
    x = torch.randn(3, 1, 8, 8)
    graph = analyze(model, x[:1])
    whole = contributions(model, x, method="intgrad", steps=5, graph=graph)
    for batch_size in (1, 4, 7):  # chunks that split steps and images
        part = contributions(model, x, method="intgrad", steps=5, graph=graph, batch_size=batch_size)
        for key in whole:
            torch.testing.assert_close(part[key], whole[key], rtol=1e-5, atol=1e-6)
    again = contributions(model, x, method="intgrad", steps=5, graph=graph)
    assert all(torch.equal(again[k], whole[k]) and torch.equal(again.delta[k], whole.delta[k]) for k in whole)


def test_one_step_is_the_gradient_at_half_the_activation():
    model = random_digits_net(2)
    x = torch.randn(1, 1, 8, 8)
    c = contributions(model, x, method="intgrad", steps=1, unit="neuron", layers=["layer2.1.relu"], target=3)
    ref = out_of_place(model)
    torch.testing.assert_close(c["layer2.1.relu@1"], _loop_reference(ref, x, "layer2.1.relu@1",
                                                                        torch.tensor([3]), 1), rtol=1e-4, atol=1e-6)
