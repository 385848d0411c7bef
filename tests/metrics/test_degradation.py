"""LeRF/MoRF on a linear model whose target logit is an explicit sum over pixels: removing a set
of pixels (fill zero) removes exactly their terms, so every point of the curve is known."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from nchains.metrics import lerf, morf

C, H, W, K = 2, 6, 6, 3


def linear_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K)).double().eval()
    return net


def data(n=4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, C, H, W, generator=gen, dtype=torch.float64)


def contributions(net, x, targets):
    """Per-pixel terms of the target logits: sum over channels of w[t, c, p] * x[c, p]. [N, H*W]."""
    w = net[1].weight.detach().view(K, C, H * W)
    return np.stack([(w[t] * x[i].view(C, H * W)).sum(0).numpy() for i, t in enumerate(targets)])


def expected_logits(net, x, targets, fractions, order, fill_of=None):
    """The target logit after removing each fraction of pixels, computed with numpy sorting."""
    w = net[1].weight.detach().view(K, C, H * W).numpy()
    b = net[1].bias.detach().numpy()
    terms = contributions(net, x, targets)
    out = np.zeros((len(x), len(fractions)))
    for i, t in enumerate(targets):
        keys = terms[i] if order == "lerf" else -terms[i]
        ranking = np.argsort(keys, kind="stable")
        fill = np.zeros((C, H * W)) if fill_of is None else fill_of(x[i].numpy()).reshape(C, H * W)
        for j, f in enumerate(fractions):
            removed = ranking[:int(round(f * H * W))]
            xi = x[i].numpy().reshape(C, H * W).copy()
            xi[:, removed] = fill[:, removed]
            out[i, j] = (w[t] * xi).sum() + b[t]
    return out


FRACTIONS = [0.0, 0.1, 0.25, 0.5, 0.8, 1.0]


@pytest.mark.parametrize("fn, order", [(lerf, "lerf"), (morf, "morf")])
def test_known_curve_with_zero_fill(fn, order):
    net, x = linear_model(), data()
    targets = net(x).argmax(1)
    attributions = net[1].weight.detach().view(K, C, H, W)[targets] * x  # exact per-value terms
    r = fn(net, x, attributions, fractions=FRACTIONS, batch_size=5)
    expected = expected_logits(net, x, targets.tolist(), FRACTIONS, order)
    np.testing.assert_allclose(r["logit"]["per_image"], expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(r["logit"]["mean"], expected.mean(0), rtol=1e-10, atol=1e-10)
    assert r["logit"]["auc"] == pytest.approx(np.trapezoid(expected.mean(0), FRACTIONS))
    phi = expected[:, :1]
    np.testing.assert_allclose(r["change"]["per_image"], np.abs(expected - phi) / np.abs(phi), rtol=1e-9)
    assert r["auc"]["change"] == pytest.approx(np.trapezoid((np.abs(expected - phi) / np.abs(phi)).mean(0), FRACTIONS))
    logits_all = net(x).detach().numpy()
    np.testing.assert_allclose(r["original_logit"], logits_all[np.arange(len(x)), targets])
    # at fraction 1 the image is all fill: the logit is the bias
    np.testing.assert_allclose(np.asarray(r["logit"]["per_image"])[:, -1], net[1].bias.detach()[targets].numpy())
    # removing the k smallest terms leaves the largest possible sum (the k largest, the smallest):
    # no other ranking does better, e.g. a random one
    other = fn(net, x, torch.randn(x.shape, dtype=torch.float64), fractions=FRACTIONS)
    sign = 1 if order == "lerf" else -1
    assert np.all(sign * (expected - np.asarray(other["logit"]["per_image"])) >= -1e-10)


def test_probability_is_the_softmax_of_the_degraded_logits():
    net, x = linear_model(), data(3)
    attributions = torch.randn(3, 1, H, W, dtype=torch.float64)
    r = lerf(net, x, attributions, fractions=[0.0, 0.5], target=1)
    # rebuild the degraded images for fraction 0.5 with numpy and run the model
    ranking = np.argsort(attributions.numpy().reshape(3, -1), axis=1, kind="stable")[:, :18]
    xs = x.numpy().reshape(3, C, -1).copy()
    for i in range(3):
        xs[i][:, ranking[i]] = 0.0
    p = torch.softmax(net(torch.from_numpy(xs).view(3, C, H, W)), 1)[:, 1].detach().numpy()
    np.testing.assert_allclose(np.asarray(r["probability"]["per_image"])[:, 1], p, rtol=1e-10)
    assert r["targets"] == [1, 1, 1]


def test_mean_and_blur_fills():
    net, x = linear_model(), data(2)
    targets = net(x).argmax(1)
    attributions = net[1].weight.detach().view(K, C, H, W)[targets] * x
    mean_fill = lambda xi: np.broadcast_to(xi.mean(axis=(1, 2), keepdims=True), xi.shape)
    r = lerf(net, x, attributions, fractions=FRACTIONS, fill="mean")
    np.testing.assert_allclose(r["logit"]["per_image"],
                               expected_logits(net, x, targets.tolist(), FRACTIONS, "lerf", mean_fill), rtol=1e-10)
    blur_fill = lambda xi: np.stack([gaussian_filter(ch, 2.0, mode="mirror", truncate=3.0) for ch in xi])
    r = morf(net, x, attributions, fractions=FRACTIONS, fill="blur", blur_sigma=2.0)
    np.testing.assert_allclose(r["logit"]["per_image"],
                               expected_logits(net, x, targets.tolist(), FRACTIONS, "morf", blur_fill), rtol=1e-9)


def test_absolute_ranks_by_magnitude_and_channels_are_summed():
    net, x = linear_model(), data(2)
    targets = net(x).argmax(1)
    terms = net[1].weight.detach().view(K, C, H, W)[targets] * x
    a = lerf(net, x, terms, fractions=FRACTIONS, absolute=True)
    b = lerf(net, x, terms.sum(1, keepdim=True).abs(), fractions=FRACTIONS)
    assert a["logit"]["per_image"] == b["logit"]["per_image"]
    c = lerf(net, x, terms.sum(1), fractions=FRACTIONS)  # a [N, H, W] map
    d = lerf(net, x, terms, fractions=FRACTIONS)
    assert c["logit"]["per_image"] == d["logit"]["per_image"]


def test_batching_does_not_change_the_result():
    net, x = linear_model(), data(3)
    attributions = torch.randn(3, C, H, W, dtype=torch.float64)
    one = lerf(net, x, attributions, fractions=FRACTIONS, batch_size=1)
    many = lerf(net, x, attributions, fractions=FRACTIONS, batch_size=1000)
    np.testing.assert_allclose(one["logit"]["per_image"], many["logit"]["per_image"], rtol=1e-12)


def test_images_follow_the_models_dtype():
    net, x = linear_model(), data(2)  # a float64 model
    attributions = torch.randn(2, 1, H, W)
    low = lerf(net, x.float(), attributions.float(), fractions=FRACTIONS)
    high = lerf(net, x.float().double(), attributions.double(), fractions=FRACTIONS)
    assert low["logit"]["per_image"] == high["logit"]["per_image"]  # computed in float64 both times


@pytest.mark.parametrize("kwargs, needle", [
    ({"fractions": [0.0, 0.5, 0.5]}, "strictly increasing"),
    ({"fractions": [0.0, 1.5]}, "in [0, 1]"),
    ({"fractions": []}, "at least one"),
    ({"fractions": [0.1, float("nan")]}, "in [0, 1]"),
    ({"fractions": "0.5"}, "sequence of floats"),
    ({"fill": "noise"}, "fill must be one of zero, mean, blur"),
    ({"attributions": torch.zeros(3, C, H, W)}, "shape [2, 2 or 1, 6, 6]"),
    ({"attributions": torch.zeros(2, 3, H, W)}, "shape [2, 2 or 1, 6, 6]"),
    ({"attributions": torch.full((2, 1, H, W), float("inf"))}, "non-finite"),
    ({"images": torch.zeros(2, C, H, W, dtype=torch.long)}, "floating-point"),
    ({"target": 7}, "classes in [0, 3)"),
    ({"target": [0]}, "one class per image"),
    ({"batch_size": 0}, "batch_size"),
    ({"blur_sigma": -1.0, "fill": "blur"}, "blur_sigma"),
])
def test_bad_arguments_are_refused(kwargs, needle):
    args = {"model": linear_model(), "images": data(2), "attributions": torch.zeros(2, 1, H, W), **kwargs}
    with pytest.raises((TypeError, ValueError)) as e:
        lerf(**args)
    assert needle in str(e.value)
