"""The magnitude baseline keeps, per layer, the chain's count of the filters with the largest
conv-weight L1 norm (checked here from the modules' weights), and its numbers are those of that
chain run here."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nchains.neurochains.analyses import magnitude_baseline, plot_magnitude

from _analyses_chain import analyses_chain

pytestmark = pytest.mark.usefixtures("one_thread")


def test_keeps_the_largest_norm_filters():
    net, images, _, chain = analyses_chain()
    res = magnitude_baseline(chain, net, images, finetune=False)
    for layer, idx in chain.kept.items():
        w = net.get_submodule(layer).weight.detach()
        norms = w.abs().sum((1, 2, 3))
        expected = sorted(torch.topk(norms, len(idx)).indices.tolist())
        assert res["kept"][layer] == expected
    assert res["filters_kept"] == chain.metrics["filters_kept"]
    assert res["overlap"] == len(chain.filters() & {(k, i) for k, v in res["kept"].items() for i in v})
    assert "magnitude_finetuned" not in res and res["finetune_steps_run"] == 0

    base = dataclasses.replace(chain, kept=res["kept"], scores={k: [1.0] * len(v) for k, v in res["kept"].items()})
    with torch.no_grad():
        p = F.log_softmax(net(images).double(), 1)
        for key, c in (("magnitude", base), ("neurochains", chain)):
            q = F.log_softmax(c.apply(net)(images).double(), 1)
            assert res[key]["kl"] == pytest.approx(float((p.exp() * (p - q)).sum(1).mean()), abs=1e-6)
            assert res[key]["agreement"] == pytest.approx(float((q.argmax(1) == p.argmax(1)).double().mean()))


def test_finetuning_lowers_the_kl():
    net, images, _, chain = analyses_chain()
    assert chain.config["finetune_steps"] == 0  # the test chain's own: the argument overrides it
    res = magnitude_baseline(chain, net, images, finetune_steps=20)
    assert res["finetune_steps_run"] > 0
    assert res["magnitude_finetuned"]["kl"] < res["magnitude"]["kl"]
    fig = plot_magnitude(res)
    assert fig.axes[0].get_title() == f"Magnitude baseline vs NeuroChains ({res['filters_kept']} filters each)"
    assert len(fig.axes[0].patches) == 3
    with pytest.raises(TypeError, match="finetune must be True or False"):
        magnitude_baseline(chain, net, images, finetune=1)
    with pytest.raises(ValueError, match="finetune_steps must be an int >= 0"):
        magnitude_baseline(chain, net, images, finetune_steps=-2)
