"""Activation maximisation raises each filter's activation (recomputed from the model's own
modules), stays finite and inside its bounds; top-activating images by hand."""

import pytest
import torch

from nchains.report.actmax import activation_maximisation, channel_bounds, mean_activations, top_activating

from _analyses_chain import analyses_chain

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv1_mean(net, chain, x):
    """Mean activation of each kept conv1 filter of the chain on its own row of ``x``."""
    kept = chain.kept["conv1"]
    s = torch.tensor(chain.scores["conv1"], dtype=x.dtype)
    with torch.no_grad():
        a = torch.relu(s[None, :, None, None] * net.bn1(net.conv1(x))[:, kept])
    return a[torch.arange(len(kept)), torch.arange(len(kept))].flatten(1).mean(1)


def test_activation_maximisation_raises_the_filters_activation():
    net, images, _, chain = analyses_chain()
    masked = chain.apply(net)
    kept = chain.kept["conv1"]
    lo, hi = channel_bounds(images)
    targets = [("conv1", f) for f in kept]
    res = activation_maximisation(masked, targets, chain.input_shape, steps=40, bounds=(lo, hi), seed=1,
                                  batch_size=5)  # three chunks: batching must not change which filter is which
    assert res.images.shape == (len(kept), 1, 8, 8)
    assert torch.isfinite(res.images).all() and torch.isfinite(res.final).all()
    assert float(res.images.min()) >= float(lo) - 1e-6 and float(res.images.max()) <= float(hi) + 1e-6
    by_hand = _conv1_mean(net, chain, res.images)
    assert torch.allclose(by_hand, res.final, atol=1e-5)
    assert (by_hand > res.start).all(), (res.start, by_hand)
    assert float(by_hand.mean()) > 2 * float(res.start.mean()) + 0.1


def test_deeper_layer_and_argument_checks():
    net, images, _, chain = analyses_chain()
    masked = chain.apply(net)
    # two layers in one batch: each row is optimised for its own layer's filter
    targets = [("layer2.0.conv2", f) for f in chain.kept["layer2.0.conv2"][:6]] + [("conv1", chain.kept["conv1"][0])]
    res = activation_maximisation(masked, targets, chain.input_shape, steps=30, seed=0)
    assert torch.isfinite(res.images).all()
    assert (res.final >= res.start).all() and (res.final > res.start).float().mean() >= 0.8
    assert torch.allclose(_conv1_mean(net, chain, res.images[6:].expand(len(chain.kept["conv1"]), -1, -1, -1))[:1],
                          res.final[6:], atol=1e-5)
    for kw, needle in (({"steps": -1}, "steps"), ({"lr": float("nan")}, "lr"), ({"jitter": 99}, "jitter"),
                       ({"blur_sigma": 0}, "blur_sigma")):
        with pytest.raises(ValueError, match=needle):
            activation_maximisation(masked, [("conv1", 0)], chain.input_shape, **kw)


def test_top_activating_images_by_hand():
    net, images, _, chain = analyses_chain()
    masked = chain.apply(net)
    means = mean_activations(chain, masked, images, ["conv1"])["conv1"]
    kept = chain.kept["conv1"]
    s = torch.tensor(chain.scores["conv1"])
    with torch.no_grad():
        want = (s[None, :, None, None] * torch.relu(net.bn1(net.conv1(images)))[:, kept]).mean((2, 3))
    assert torch.allclose(means, want, atol=1e-5)
    top = top_activating(means, k=3)
    assert top.shape == (len(kept), 3)
    for j in range(len(kept)):
        ranked = sorted(range(len(images)), key=lambda i: (-float(means[i, j]), i))
        assert top[j].tolist() == ranked[:3]
