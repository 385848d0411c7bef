"""Conv2d subclasses with their own forward (static pad, TF "same" dynamic pad, weight
standardisation) are analysed from what their forward computes, and every model built from the
analysis (scored, masked, compact, exported) reproduces the original. The self-checks catch a
scored or compact model that does not, naming the first diverging unit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nchains
from nchains.graph.analysis import analyze
from nchains.instrument.scored_model import ScoredModel
from nchains.instrument.self_check import check_compact, check_scored
from conv_style_models import STYLES, SamePadConv, StaticPadConv, StdConv, style_net

OPEN = 50.0  # sigmoid(50 / 0.2) == 1.0 exactly: the gate passes f(x) unchanged
SHAPE = (3, 12, 12)


def _images(n=6, seed=1, dtype=torch.float32):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _close(got, want, rtol=1e-5):
    """Equal up to float rounding relative to the values' magnitude (weight standardisation
    makes logits large: their float32 rounding is larger than an absolute 1e-5)."""
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1.0))


def _tf_same_pad(x, k, s):
    """TensorFlow's "same" padding of one spatial dim, written independently of the models."""
    out = -(-x // s)
    total = max((out - 1) * s + k - x, 0)
    return total // 2, total - total // 2


@pytest.fixture(scope="module", params=sorted(STYLES))
def style(request):
    return request.param


@pytest.fixture(scope="module")
def extracted(style):
    net = style_net(STYLES[style])
    chain = nchains.extract(net, _images(), steps=6, finetune_steps=2, seed=0)
    return net, chain


def test_units_compute_what_each_forward_computes(style):
    net = style_net(STYLES[style])
    graph = analyze(net, _images(1))
    gm = graph.graph_module
    assert len(graph.layers) == 6
    for name, u in graph.layers.items():
        module = net.get_submodule(u.conv)
        x = torch.randn(3, *u.input_shape[1:], generator=torch.Generator().manual_seed(2))
        weight, bias = u.params(gm)
        with torch.no_grad():
            got = F.conv2d(F.pad(x, list(u.pre_pad)), weight, bias, u.stride, u.padding, u.dilation, u.groups)
            torch.testing.assert_close(got, module(x), rtol=0, atol=0, msg=name)
        if isinstance(module, (StaticPadConv, SamePadConv)) and module.stride == (2, 2):
            # stride 2 on a 12x12 map: TF pads 0 before, 1 after, which no symmetric padding is
            before, after = _tf_same_pad(u.input_shape[2], 3, 2)
            assert (before, after) == (0, 1)
            assert u.pre_pad == (0, 1, 0, 1) and u.padding == (0, 0), name
        elif isinstance(module, (StaticPadConv, SamePadConv)):
            assert u.pre_pad == (0, 0, 0, 0) and u.padding == (1, 1), name  # folded: symmetric
        if isinstance(module, StdConv):
            w = module.weight.detach()
            std = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
            torch.testing.assert_close(weight, std, rtol=0, atol=0)
            assert not torch.equal(weight, module.weight)
        else:
            assert weight is module.weight  # read from the module, not copied


def test_scored_model_with_open_gates_reproduces_the_original(style):
    net = style_net(STYLES[style])
    x = _images(5, seed=3)
    sm = ScoredModel(analyze(net, x[:1]))  # self-checked on random inputs
    with torch.no_grad():
        sm.flat_gate_logits.fill_(OPEN)
        _close(sm(x), net(x))


def test_float64_scored_model_is_exact_to_float64_rounding(style):
    net = style_net(STYLES[style], dtype=torch.float64)
    x = _images(3, seed=4, dtype=torch.float64)
    sm = ScoredModel(analyze(net, x[:1]))
    with torch.no_grad():
        sm.flat_gate_logits.fill_(OPEN)
        _close(sm(x), net(x), rtol=1e-11)


def _everything_kept(chain):
    """The chain with every filter kept at score 1 and every region kept: its masked and
    compact models must compute exactly what the original model computes."""
    kept = {n: list(range(size)) for n, size in chain.layer_sizes.items()}
    metrics = {**chain.metrics, "filters_kept": sum(chain.layer_sizes.values())}
    return dataclasses.replace(chain, kept=kept, scores={n: [1.0] * len(i) for n, i in kept.items()},
                               gates={r: 1 for r in chain.gates}, metrics=metrics)


def test_full_chain_apply_and_compact_equal_the_original(extracted):
    net, chain = extracted
    full = _everything_kept(chain)
    x = _images(7, seed=5)
    with torch.no_grad():
        want = net(x)
        _close(full.apply(net)(x), want)
        _close(nchains.compact(full, net)(x), want)


def test_extracted_chain_compacts_to_its_masked_model(extracted):
    net, chain = extracted
    assert 0 < chain.metrics["filters_kept"] <= chain.metrics["filters_total"]
    x = _images(7, seed=6)
    with torch.no_grad():
        masked = chain.apply(net)(x)
        for kw in ({}, {"channel_multiple": 8}, {"keep_scores": True}):
            small = nchains.compact(chain, net, **kw)
            _close(small(x), masked)
    # the asymmetric padding of layer2.conv1 (stride 2) is an explicit pad op of the compact graph
    pads = [n for n in small.graph.nodes if n.op == "call_function" and n.target is F.pad]
    padded = isinstance(net.layer2.conv1, (StaticPadConv, SamePadConv)) and chain.kept.get("layer2.conv1")
    assert len(pads) == (1 if padded else 0)


def test_export_verifies_every_format(style, extracted, tmp_path):
    net, chain = extracted
    formats = ["ts", "pt2"]
    if style == "same_pad":  # ONNX (slow to export) once: the asymmetric Pad node
        pytest.importorskip("onnxruntime")
        formats.append("onnx")
    nchains.export(chain, net, tmp_path / "out", formats)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert "chain.ts" in text and "chain.pt2" in text
    loaded = torch.jit.load(str(tmp_path / "out" / "chain.ts"))
    x = _images(3, seed=7)
    with torch.no_grad():
        _close(loaded(x), chain.apply(net)(x))


# ---- the self-checks --------------------------------------------------------------------------


def test_self_check_names_the_first_wrong_scored_unit():
    net = style_net(SamePadConv)
    graph = analyze(net, _images(1))
    sm = ScoredModel(graph, check=False)
    check_scored(sm, graph)  # as built: passes
    logits = sm.flat_gate_logits.detach().clone()
    with torch.no_grad():
        sm.unit("layer1.conv2").weight.mul_(1.5)
    with pytest.raises(ValueError, match=r"first diverging unit \S+ \('layer1\.conv2'\)") as info:
        check_scored(sm, graph)
    assert "\n" not in str(info.value) and "max |difference|" in str(info.value)
    assert torch.equal(sm.flat_gate_logits, logits)  # the check restores the gates it opened


def test_self_check_catches_attribute_padding_the_original_bug(monkeypatch):
    """Reading a subclass's padding from its attributes (what the analysis did before) builds
    a scored model that does not reproduce the model: the self-check refuses it."""
    from nchains.graph import conv_forward, units

    monkeypatch.setattr(units, "_conv_call", lambda conv, node: conv_forward.attribute_conv(conv, node.target))
    net = style_net(StaticPadConv)
    graph = analyze(net, _images(1))
    with pytest.raises(ValueError, match=r"scored model .* first diverging unit \S+ \('conv1'\)"):
        ScoredModel(graph)


def test_compact_self_check_names_the_first_wrong_unit(extracted, monkeypatch):
    net, chain = extracted
    graph = analyze(net, _images(1))
    small = nchains.compact(chain, net, check=False)
    masked = chain.apply(net)
    check_compact(small, masked, graph)  # as built: passes
    name = next(n for n in graph.layers if chain.kept.get(n) and n != "conv1")
    module = small.get_submodule(small.nchains_layers[name]["module"])
    with torch.no_grad():
        module.weight.mul_(1.5)
    with pytest.raises(ValueError, match=rf"compact model .*first diverging unit \S+ \('{name}'\)"):
        check_compact(small, masked, graph)


def test_compact_refuses_a_wrong_build(extracted, monkeypatch):
    from nchains.compact import units

    fold = units._fold64
    monkeypatch.setattr(units, "_fold64", lambda conv, bn: tuple(t * 1.1 for t in fold(conv, bn)))
    net, chain = extracted
    with pytest.raises(ValueError, match=r"compact model .*first diverging unit \S+ \('conv1'\)"):
        nchains.compact(chain, net)


# ---- plain convs the analysis also reads from their forward ----------------------------------


def test_plain_conv_with_asymmetric_same_padding_is_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 4, padding="same"), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding="same", dilation=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    x = _images(4, seed=8)
    graph = analyze(net, x[:1])
    u = graph.layers["0"]
    assert (u.padding, u.pre_pad) == ((1, 1), (0, 1, 0, 1))  # total 3: one before, two after
    assert graph.layers["3"].padding == (2, 2) and graph.layers["3"].pre_pad == (0, 0, 0, 0)
    sm = ScoredModel(graph)
    with torch.no_grad():
        sm.flat_gate_logits.fill_(OPEN)
        _close(sm(x), net(x))


def test_subclass_without_own_forward_is_read_from_its_attributes():
    class Tagged(nn.Conv2d):  # same forward as nn.Conv2d: attributes describe it
        pass

    net = nn.Sequential(Tagged(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 144, 2)).eval()
    graph = analyze(net, _images(1))
    u = graph.layers["0"]
    assert (u.padding, u.pre_pad, u.weight) == ((1, 1), (0, 0, 0, 0), None)


def test_depthwise_same_pad_conv_compacts_exactly():
    """A grouped (depthwise) TF-"same" conv of stride 2, as in MobileNet/EfficientNet ports: the
    pre-pad sits before a grouped conv whose groups the compact model keeps."""
    torch.manual_seed(0)
    net = nn.Sequential(SamePadConv(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                        SamePadConv(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    net[3].groups = 8
    net[3].weight = nn.Parameter(torch.randn(8, 1, 3, 3))
    net.eval()
    x = _images(6, seed=9)
    graph = analyze(net, x[:1])
    u = graph.layers["3"]
    assert (u.groups, u.pre_pad, u.padding) == (8, (0, 1, 0, 1), (0, 0))
    chain = nchains.extract(net, x, steps=4, finetune=False, seed=0)
    with torch.no_grad():
        _close(nchains.compact(chain, net)(x), chain.apply(net)(x))
        _close(nchains.compact(_everything_kept(chain), net)(x), net(x))
