"""Stability: the nearest held-out images in the penultimate-layer space, ranked here with
torch.cdist on features computed by hand, and the chain's fidelity on them."""

from __future__ import annotations

import pytest
import torch

from nchains.neurochains.analyses import plot_stability, stability

from _analyses_chain import analyses_chain, held_out_digits


def _features(net, x):
    with torch.no_grad():  # DigitsNet.forward up to its classifier's input
        return torch.flatten(net.avgpool(net.layer2(net.layer1(net.relu(net.bn1(net.conv1(x)))))), 1)


def test_fidelity_on_the_k_nearest_by_cdist():
    net, images, _, chain = analyses_chain()
    pool = torch.cat([held_out_digits(150), images[:3]])  # three chain images hidden in the pool
    ks = [1, 5, 20, 60]
    res = stability(chain, net, images, pool=pool, ks=ks)
    held = pool[:150]
    assert res["excluded"] == 3 and res["pool_size"] == 150 and res["feature"] == "input of fc"
    with torch.no_grad():
        agree = net(held).argmax(1) == chain.apply(net)(held).argmax(1)
    dist = torch.cdist(_features(net, images).double(), _features(net, held).double())
    for i, k in enumerate(ks):
        nearest = [set(torch.topk(dist[n], k, largest=False).indices.tolist()) for n in range(len(images))]
        union = sorted(set().union(*nearest))
        assert res["neighbours"][i] == len(union)
        assert res["fidelity"][i] == pytest.approx(agree[union].double().mean().item())
        per_image = [agree[sorted(s)].double().mean().item() for s in nearest]
        assert res["fidelity_mean"][i] == pytest.approx(sum(per_image) / len(per_image))
    assert res["pool_agreement"] == pytest.approx(agree.double().mean().item())
    assert len(set(res["fidelity"])) > 1  # the ranking matters for this chain
    fig = plot_stability(res)
    assert fig.axes[0].get_title() == "Stability: test fidelity on 150 held-out images"
    assert len(fig.axes[0].patches) == len(ks)


def test_refusals():
    net, images, _, chain = analyses_chain()
    with pytest.raises(ValueError, match="held-out pool"):  # not the shipped model: no default pool
        stability(chain, net, images)
    with pytest.raises(ValueError, match="ks must be <= the held-out pool's size 10"):
        stability(chain, net, images, pool=held_out_digits(10), ks=[5, 11])
    with pytest.raises(ValueError, match=r"ks\[1\] must be an int >= 1"):
        stability(chain, net, images, pool=held_out_digits(10), ks=[5, 0])
    with pytest.raises(ValueError, match="pool must have shape"):
        stability(chain, net, images, pool=torch.zeros(4, 1, 9, 9))
    with pytest.raises(ValueError, match="pool must be None"):
        stability(chain, net, images, pool="train")


@pytest.mark.slow  # 10000 test images through both models
def test_fashion_mnist_test_split_pool():
    from nchains.models.fashion_mnist import FASHION_MNIST_ROOT

    import os

    if not os.path.isdir(FASHION_MNIST_ROOT):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    from _analyses_cli_chain import cli_chain

    model, images, chain = cli_chain()
    res = stability(chain, model, images, pool="test", ks=[20])
    assert res["pool"] == "the Fashion-MNIST test split"
    assert res["excluded"] == len(images) and res["pool_size"] == 10000 - len(images)  # the sample is of that split
    sample = stability(chain, model, images, ks=[20])
    assert sample["pool_size"] == 1000 - len(images)
