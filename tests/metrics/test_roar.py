"""ROAR on a tiny Fashion-MNIST subset (slow: a few retrainings)."""

import pytest
import torch

from nchains.metrics import gradient, random_attribution, roar, train_classifier
from nchains.metrics.roar import accuracy, fashion_subsets

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SIZES = {"train_size": 300, "test_size": 200, "seed": 5, "batch_size": 32}


def test_roar_tiny_subset():
    seen = []

    def recording(model, images, targets):
        seen.append(targets.clone())
        return gradient(model, images, targets)

    r = roar({"gradient": recording, "random": random_attribution(0)}, fractions=[0.0, 0.5, 1.0], epochs=1,
             **SIZES)
    train_x, train_y, test_x, test_y = fashion_subsets(300, 200, seed=5)
    # the methods explain the true labels of the train and test images
    assert torch.equal(torch.cat(seen), torch.cat([train_y, test_y]))
    # k = 0 is a plain training run with the same seed, shared by every method
    plain = accuracy(train_classifier(train_x, train_y, epochs=1, seed=5, batch_size=32), test_x, test_y)
    assert r["methods"]["gradient"]["accuracy"][0] == r["methods"]["random"]["accuracy"][0] == plain
    assert plain > 0.4  # 300 images, 1 epoch: well above chance
    # k = 1: every image is the fill everywhere, the network sees one input: one class's share at most
    share = torch.bincount(test_y, minlength=10).max().item() / len(test_y)
    for m in r["methods"].values():
        assert 0.0 <= m["accuracy"][-1] <= share + 1e-12
        assert m["auc"] == pytest.approx(0.25 * (m["accuracy"][0] + 2 * m["accuracy"][1] + m["accuracy"][2]))
    assert r["fractions"] == [0.0, 0.5, 1.0] and r["train_size"] == 300


def test_roar_checks_before_training():
    with pytest.raises(ValueError, match="non-empty mapping"):
        roar({})
    with pytest.raises(ValueError, match="strictly increasing"):
        roar({"g": gradient}, fractions=[0.5, 0.3])
    with pytest.raises(ValueError, match="fill must be one of"):
        roar({"g": gradient}, fill="noise")
    with pytest.raises(ValueError, match="epochs"):
        roar({"g": gradient}, epochs=0)
    with pytest.raises(TypeError, match="callables"):
        roar({"g": "gradient"})
    with pytest.raises(ValueError, match="train_size"):
        roar({"g": gradient}, train_size=5)


def _label_stripe(model, images, targets):
    """A map whose top pixels are row ``2 * label + 3`` of the image: its removal mask names the label."""
    maps = torch.zeros(len(images), 1, 28, 28)
    maps[torch.arange(len(images)), 0, 2 * targets + 3, :] = 1.0
    return maps


def test_mask_control_detects_a_leaking_mask():
    from nchains.metrics import removal_masks

    r = roar({"stripe": _label_stripe, "random": random_attribution(0)}, fractions=[0.0, 28 / 784], epochs=3,
             mask_control=True, **SIZES)
    stripe, rand = r["methods"]["stripe"], r["methods"]["random"]
    assert stripe["mask_accuracy"][0] is None and r["mask_control"] is True
    # the stripe's removal mask is the label's row, exactly: the masks alone classify (nearly) perfectly
    assert stripe["mask_accuracy"][1] > 0.9
    # a random map's mask carries nothing about the label: about chance (10 classes, 200 test images)
    assert rand["mask_accuracy"][1] < 0.25
    _, train_y, _, _ = fashion_subsets(300, 200, seed=5)
    masks = removal_masks(_label_stripe(None, torch.zeros(len(train_y), 1, 28, 28), train_y), 28 / 784)
    assert torch.equal(masks.sum((1, 2, 3)), torch.full((len(train_y),), 28.0))
    rows = masks[:, 0].sum(2).argmax(1)
    assert torch.equal(rows, 2 * train_y + 3)


def test_mask_control_is_a_bool():
    with pytest.raises(TypeError, match="mask_control must be a bool"):
        roar({"g": gradient}, mask_control="yes")
