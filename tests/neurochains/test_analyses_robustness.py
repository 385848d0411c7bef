"""Robustness: FGSM against a one-step attack written here, PGD inside its eps ball and bounds,
and the probabilities robustness() reports against the models run on those examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nchains.neurochains.analyses import fgsm, pgd, plot_robustness, robustness

from _analyses_chain import analyses_chain

pytestmark = pytest.mark.usefixtures("one_thread")


def _manual_fgsm(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)  # the mean: same sign as the sum
    return (x + eps * grad.sign()).detach()


def test_fgsm_is_one_signed_gradient_step():
    net, images, labels, _ = analyses_chain()
    got = fgsm(net, images, labels, 0.2)
    assert all(p.grad is None for p in net.parameters())  # the model is not touched
    assert torch.equal(got, _manual_fgsm(net, images, labels, 0.2))
    clipped = fgsm(net, images, labels, 0.2, bounds=(-0.5, 0.5))
    assert torch.equal(clipped, _manual_fgsm(net, images, labels, 0.2).clamp(-0.5, 0.5))


def test_pgd_stays_in_the_ball_and_attacks():
    net, images, labels, _ = analyses_chain()
    eps = 0.15
    adv = pgd(net, images, labels, eps, steps=8, step_size=0.05, seed=3)
    assert float((adv - images).abs().max()) <= eps + 1e-6
    assert torch.equal(adv, pgd(net, images, labels, eps, steps=8, step_size=0.05, seed=3))  # seeded
    with torch.no_grad():
        clean = F.cross_entropy(net(images), labels)
        assert F.cross_entropy(net(adv), labels) > clean
    low, high = images.min() + 0.1, images.max() - 0.1
    bounded = pgd(net, images, labels, eps, steps=3, bounds=(float(low), float(high)))
    assert float(bounded.min()) >= float(low) - 1e-6 and float(bounded.max()) <= float(high) + 1e-6
    assert torch.equal(pgd(net, images, labels, 0.0, steps=2), images)


def test_robustness_reports_the_attacked_probabilities():
    net, images, labels, chain = analyses_chain()
    res = robustness(chain, net, images, labels=labels, eps=0.2, steps=4, seed=1)
    masked = chain.apply(net)
    adv = _manual_fgsm(net, images, labels, 0.2)
    white = _manual_fgsm(masked, images, labels, 0.2)
    with torch.no_grad():
        for who, model in (("original", net), ("chain", masked)):
            for name, x in (("clean", images), ("fgsm", adv)):
                p = torch.softmax(model(x).double(), 1)[range(len(labels)), labels]
                assert res[who][name] == pytest.approx(p.tolist(), abs=1e-6)
                assert res["means"][who][name] == pytest.approx(p.mean().item(), abs=1e-6)
        p = torch.softmax(masked(white).double(), 1)[range(len(labels)), labels]
        assert res["chain_white_box"]["fgsm"] == pytest.approx(p.tolist(), abs=1e-6)
    assert res["means"]["original"]["pgd"] < res["means"]["original"]["clean"]
    assert res["step_size"] == pytest.approx(0.05) and res["labels"] == "given"
    fig = plot_robustness(res)
    assert [ax.get_title() for ax in fig.axes] == ["Robustness of the original model (eps = 0.2)",
                                                    "Robustness of the chain (eps = 0.2)"]


def test_refusals():
    net, images, labels, chain = analyses_chain()
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        robustness(chain, net, images, eps=-1.0)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        robustness(chain, net, images, steps=0)
    with pytest.raises(ValueError, match=r"labels must have shape \[12\]"):
        robustness(chain, net, images, labels=labels[:3])
    with pytest.raises(ValueError, match="labels must be classes in"):
        robustness(chain, net, images, labels=labels + 10)
    with pytest.raises(ValueError, match="low < high"):
        robustness(chain, net, images, bounds=(1.0, 0.0))
