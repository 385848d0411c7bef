"""Ablation against brute force: zero one channel of one call with a hook, rerun the full model."""

import pytest
import torch

from nchains.contrib import contributions
from nchains.graph.analysis import analyze

from _hooks import out_of_place, per_call, relu_names
from _models import random_digits_net

pytestmark = pytest.mark.usefixtures("one_thread")


def _zero_channel(c):
    def replace(out):
        out = out.clone()
        out[:, c] = 0
        return out
    return replace


def _brute_force(model, x, key, channels, target):
    name = key.partition("@")[0]
    with torch.no_grad():
        phi = model(x).gather(1, target[:, None])[:, 0]
        cols = []
        for c in range(channels):
            with per_call(model, [name], replace={key: _zero_channel(c)}, retain=False):
                cols.append(phi - model(x).gather(1, target[:, None])[:, 0])
    return torch.stack(cols, 1)


def test_ablation_equals_brute_force_on_every_relu_call():
    model = random_digits_net(4)
    x = torch.randn(2, 1, 8, 8)
    graph = analyze(model, x[:1])
    c = contributions(model, x, method="ablation", graph=graph, batch_size=13)  # chunks split channels
    ref = out_of_place(model)
    assert len(c) == 9 and c.method == "ablation"
    for site in c.sites:
        want = _brute_force(ref, x, site.key, site.shape[1], c.target)
        torch.testing.assert_close(c[site.key], want, rtol=1e-4, atol=1e-5)
    whole = contributions(model, x, method="ablation", graph=graph, absolute=True)
    for key in c:
        torch.testing.assert_close(whole[key], c[key].abs(), rtol=1e-5, atol=1e-6)


def test_ablation_of_a_block_and_of_each_call_of_a_module():
    model = random_digits_net(5)
    x = torch.randn(3, 1, 8, 8)
    c = contributions(model, x, method="ablation", layers=["layer2.1", "layer1.0.relu"], target=2)
    # the block's output is its second ReLU call; each call of layer1.0.relu is its own site
    assert list(c) == ["layer1.0.relu", "layer1.0.relu@1", "layer2.1"]
    ref = out_of_place(model)
    target = torch.full((3,), 2)
    torch.testing.assert_close(c["layer2.1"], _brute_force(ref, x, "layer2.1.relu@1", 32, target),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c["layer1.0.relu@1"], _brute_force(ref, x, "layer1.0.relu@1", 16, target),
                               rtol=1e-4, atol=1e-5)


def test_ablation_is_channel_only():
    model = random_digits_net(0)
    with pytest.raises(ValueError, match="unit must be 'channel' with method='ablation'"):
        contributions(model, torch.randn(1, 1, 8, 8), method="ablation", unit="neuron")
