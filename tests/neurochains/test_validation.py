"""Validation of the numbers, tensors and chains that NeuroChains takes: config ranges and
finiteness, non-finite images, a Chain built in Python, chain versions, the chain against the
model, the model family, and the strongest filters against an independent Taylor computation."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import nchains
from nchains import Chain, NeuroChainsConfig
from nchains.neurochains.config import MAX_STEPS
from nchains.neurochains.extraction import model_family

from _models import DigitsNet, digits_region
from _small_chain import small_digits_chain


@pytest.fixture(scope="module")
def extracted():
    """(net, images, chain) with kept and removed blocks, partly pruned layers, two classes."""
    net, images, chain = small_digits_chain()
    assert set(chain.gates.values()) == {0, 1} and len(chain.classes) == 2
    return net, images, chain


def _copy(chain: Chain) -> Chain:
    return Chain.from_dict(json.loads(json.dumps(chain.to_dict())))


# ---- config ----------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_CONFIG = [
    ("lam", NAN, ValueError, "lam must be a number >= 0"), ("lam", INF, ValueError, "NaN and infinity"),
    ("lam", -INF, ValueError, "lam must be"), ("lam", -1.0, ValueError, "got -1.0"),
    ("lam", "0.1", TypeError, "lam must be"), ("lam_gate", NAN, ValueError, "lam_gate must be"),
    ("temperature", 0.0, ValueError, "temperature must be a number > 0"), ("temperature", NAN, ValueError, "NaN"),
    ("lr", INF, ValueError, "lr must be a number > 0"), ("lr", 0, ValueError, "lr must be"),
    ("lr", -0.1, ValueError, "lr must be"), ("tau", NAN, ValueError, "tau must be a number >= 0"),
    ("tau", INF, ValueError, "tau must be"), ("finetune_lr", 0.0, ValueError, "finetune_lr must be"),
    ("finetune_kl", NAN, ValueError, "finetune_kl must be"), ("stop_delta", -INF, ValueError, "stop_delta must be"),
    ("steps", MAX_STEPS + 1, ValueError, "steps must be an int >= 0 and <= 1000000"),
    ("steps", 1.5, TypeError, "steps must be an int"), ("steps", True, TypeError, "steps must be an int"),
    ("finetune_steps", -1, ValueError, "finetune_steps must be"), ("stop_window", 0, ValueError, "stop_window must be"),
    ("seed", -1, ValueError, r"seed must be an int in \[0, 2\*\*63\)"), ("seed", 2**63, ValueError, "seed must be"),
    ("finetune", 1, TypeError, "finetune must be True or False"), ("score_linear", "yes", TypeError, "score_linear"),
]


@pytest.mark.parametrize("name,value,exc,match", BAD_CONFIG, ids=[f"{n}={v!r}" for n, v, _, _ in BAD_CONFIG])
def test_config_refuses_bad_numbers(name, value, exc, match):
    with pytest.raises(exc, match=match):
        NeuroChainsConfig(**{name: value})
    with pytest.raises(exc, match=match):  # the same check guards replace(), i.e. extract's overrides
        NeuroChainsConfig().replace(**{name: value})


def test_config_accepts_the_bounds_and_normalises_numpy_scalars():
    cfg = NeuroChainsConfig(lam=0, lam_gate=0.0, tau=0, finetune_kl=0, stop_delta=0, steps=0, finetune_steps=MAX_STEPS,
                            stop_window=MAX_STEPS, seed=2**63 - 1)
    assert (cfg.steps, cfg.finetune_steps, cfg.seed) == (0, MAX_STEPS, 2**63 - 1)
    cfg = NeuroChainsConfig(lam=np.float32(0.25), lr=np.float64(0.01), steps=np.int64(7), seed=np.int32(3))
    assert type(cfg.lam) is float and type(cfg.steps) is int and type(cfg.seed) is int
    assert (cfg.lam, cfg.steps, cfg.seed) == (0.25, 7, 3)
    json.dumps(cfg.to_dict())  # NumPy scalars would not serialise


def test_config_from_dict_refuses_non_dicts_and_unknown_fields():
    with pytest.raises(TypeError, match="config must be a dict"):
        NeuroChainsConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match=r"unknown NeuroChainsConfig field\(s\) \['lamda'\]"):
        NeuroChainsConfig.from_dict({"lamda": 1})


# ---- tensors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_extract_refuses_non_finite_images_before_any_work(value):
    images, _ = digits_region(per_class=2)
    images = images.clone()
    images[0, 0, 1, :3] = value
    images[2, 0, 0, 0] = value

    class NeverRun(DigitsNet):
        def forward(self, x):
            raise AssertionError("the model ran on non-finite images")

    with pytest.raises(ValueError) as info:
        nchains.extract(NeverRun().eval(), images, steps=1)
    assert str(info.value).startswith("images contains 4 non-finite values (NaN/Inf) at images 0, 2;")
    assert "\n" not in str(info.value)


def test_non_finite_message_names_one_image_and_caps_the_list():
    from nchains._util.tensors import check_finite

    x = torch.zeros(8, 1, 2, 2, dtype=torch.float64)
    x[5, 0, 1, 1] = NAN
    with pytest.raises(ValueError, match=r"^images contains 1 non-finite value \(NaN/Inf\) at image 5;"):
        check_finite(x, "images")
    x[:, 0, 0, 0] = INF
    with pytest.raises(ValueError, match=r"9 non-finite values \(NaN/Inf\) at images 0, 1, 2, 3, 4 \(and 3 more\)"):
        check_finite(x, "images")
    assert check_finite(torch.arange(4), "images") is not None  # integers are finite


def test_export_refuses_non_finite_images(extracted, tmp_path):
    net, images, chain = extracted
    bad = images.clone()
    bad[1, 0, 4, 4] = NAN
    with pytest.raises(ValueError, match=r"images contains 1 non-finite value \(NaN/Inf\) at image 1"):
        nchains.export(chain, net, tmp_path / "out", formats=["ts"], images=bad)
    assert not (tmp_path / "out").exists()


# ---- a Chain built in Python -----------------------------------------------------------------

def test_save_and_apply_refuse_an_invalid_chain_built_in_python(extracted, tmp_path):
    net, _, chain = extracted
    bad = _copy(chain)
    layer = next(name for name, idx in bad.kept.items() if idx)
    bad.kept[layer] = [bad.layer_sizes[layer]] + bad.kept[layer][1:]
    needle = f"malformed chain: kept[{layer!r}][0]: index {bad.layer_sizes[layer]} out of range"
    with pytest.raises(ValueError, match=r"^" + needle.replace("[", r"\[").replace("(", r"\(")):
        bad.save(tmp_path / "chain.json")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="malformed chain: kept"):
        bad.apply(net)
    with pytest.raises(ValueError, match="malformed chain: kept"):
        nchains.compact(bad, net)
    nan = _copy(chain)
    nan.scores[layer][0] = NAN
    with pytest.raises(ValueError, match=rf"scores\[{layer!r}\]\[0\]: must be a finite number, got nan"):
        nan.validate()


def test_the_unmodified_chain_is_valid_and_round_trips(extracted, tmp_path):
    _, _, chain = extracted
    chain.validate()
    chain.save(tmp_path / "c.json")
    assert Chain.load(tmp_path / "c.json").to_dict() == json.loads(json.dumps(chain.to_dict()))


# ---- versions and the rename -----------------------------------------------------------------

def test_versions_1_and_2_load_their_paths_as_strongest_filters(extracted, tmp_path):
    _, _, chain = extracted
    assert chain.strongest_filters
    for version in (1, 2):
        data = json.loads(json.dumps(chain.to_dict()))
        data["version"] = version
        data["paths"] = data.pop("strongest_filters")
        path = tmp_path / f"v{version}.json"
        path.write_text(json.dumps(data))
        loaded = Chain.load(path)
        assert loaded.strongest_filters == json.loads(json.dumps(chain.strongest_filters))
        assert loaded.to_dict()["version"] == 3 and "paths" not in loaded.to_dict()


@pytest.mark.parametrize("version,key", [(3, "paths"), (2, "strongest_filters"), (1, "strongest_filters")])
def test_each_version_refuses_the_other_versions_name(extracted, version, key):
    _, _, chain = extracted
    data = json.loads(json.dumps(chain.to_dict()))
    data["version"] = version
    data[key] = data.pop("strongest_filters")
    with pytest.raises(ValueError, match=rf"unknown field\(s\) \[{key!r}\] for version {version}"):
        Chain.from_dict(data)


def test_paths_is_a_deprecated_read_only_alias(extracted):
    _, _, chain = extracted
    with pytest.warns(DeprecationWarning, match="use Chain.strongest_filters"):
        assert chain.paths is chain.strongest_filters
    with pytest.raises(AttributeError):
        chain.paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chain.describe()  # nchains itself no longer reads the old name


def test_describe_lists_the_strongest_filters(extracted):
    _, _, chain = extracted
    lines = chain.describe().splitlines()[1:]
    assert len(lines) == len(chain.strongest_filters) == len(chain.classes)
    for line, (c, entries) in zip(lines, chain.strongest_filters.items()):
        assert line == f"{c}: " + " → ".join(f"{chain.labels[layer]}_{i}" for layer, i, _ in entries)


# ---- the chain against the model -------------------------------------------------------------

def test_apply_and_compact_name_the_first_layer_whose_width_differs(extracted):
    net, _, chain = extracted
    bad = _copy(chain)
    bad.layer_sizes["layer1.0.conv2"] += 1
    bad.metrics["filters_total"] += 1
    needle = "the chain does not match the model: layer 'layer1.0.conv2' has 17 filters in the chain but 16 in "
    with pytest.raises(ValueError, match=needle):
        bad.apply(net)
    with pytest.raises(ValueError, match=needle):
        nchains.compact(bad, net)


def test_apply_names_a_region_the_model_does_not_have(extracted):
    net, _, chain = extracted
    bad = _copy(chain)
    region = next(iter(bad.regions))
    bad.regions["extra"] = dict(bad.regions[region])
    with pytest.raises(ValueError, match="the chain's region 'extra' is not a gateable region of the model"):
        bad.apply(net)
    bad = _copy(chain)
    del bad.regions[region], bad.gates[region]
    bad.labels.pop(region, None)
    with pytest.raises(ValueError, match=f"the model's region {region!r} is missing from the chain's regions"):
        bad.apply(net)


def test_check_graph_refuses_another_architecture(extracted):
    net, _, chain = extracted
    other = nchains.analyze(torchvision.models.resnet18(num_classes=10), torch.zeros(1, 1, 8, 8).expand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="the chain does not match the model: layer 'conv1' has 16 filters in the "
                                         "chain but 64 in the model"):
        chain.check_graph(other)
    chain.check_graph(nchains.analyze(net, torch.zeros(1, *chain.input_shape)))


# ---- model family ----------------------------------------------------------------------------

class _PlainBlock(nn.Module):
    """conv-bn-relu twice at constant shape, no shortcut: a gateable block that is not residual."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _VGGBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1, self.block2 = _PlainBlock(8), _PlainBlock(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.block2(self.block1(torch.relu(self.stem(x)))))


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


class _TopLevelAdd(nn.Module):
    """A residual add in the model's own forward: no gateable block holds it."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.relu(x + self.conv(x)))


def _graph(model, shape=(1, 3, 16, 16)):
    return nchains.analyze(model.eval(), torch.zeros(shape))


def test_model_family_vgg_with_gateable_plain_blocks_is_not_resnet():
    g = _graph(_VGGBlocks())
    assert [r.kind for r in g.regions.values()] == ["block", "block"] and not g.adds  # what fooled the old rule
    assert model_family(g) == "vgg"
    assert model_family(_graph(torchvision.models.vgg11(num_classes=10), (1, 3, 32, 32))) == "vgg"


def test_model_family_resnet_needs_residual_adds_inside_gateable_blocks():
    g = _graph(torchvision.models.resnet18(num_classes=10), (1, 3, 32, 32))
    assert model_family(g) == "resnet"
    assert model_family(_graph(DigitsNet(), (1, 1, 8, 8))) == "resnet"
    g = _graph(_TopLevelAdd())
    assert len(g.adds) == 1 and model_family(g) == "other"


def test_model_family_concat_is_other():
    g = _graph(_Concat())
    assert g.concats and model_family(g) == "other"


# ---- strongest filters against an independent Taylor computation -----------------------------

def _bn_of(conv: str) -> str:
    """DigitsNet's BatchNorm after each conv (torchvision BasicBlock naming)."""
    if conv.endswith("downsample.0"):
        return conv[:-1] + "1"
    head, _, last = conv.rpartition(".")
    return f"{head + '.' if head else ''}bn{last[len('conv'):]}"


def _masked_taylor(net, chain, images, classes):
    """Per class, per layer: Tensor[C] of sum over the class's images of |z * dy_c/dz|, where z is
    the layer's BatchNorm output times its chain score, computed on the ORIGINAL model with hooks
    (removed blocks replaced by their input). For a unit followed by a ReLU, a = relu(z) gives
    a * dy/da = z * dy/dz elementwise, so this is the contribution of the unit's activation."""
    scores = chain.full_scores()
    outs, hooks = {}, []
    for layer in chain.layer_sizes:
        s = scores[layer].to(images.dtype)[None, :, None, None]

        def scale(mod, inp, out, layer=layer, s=s):
            outs[layer] = z = out * s
            return z.clone()  # BasicBlock's `out += identity` and ReLU(inplace) would overwrite z
        hooks.append(net.get_submodule(_bn_of(layer)).register_forward_hook(scale))
    for region, gate in chain.gates.items():
        if gate == 0:
            hooks.append(net.get_submodule(region).register_forward_hook(lambda m, inp, out: inp[0]))
    try:
        logits = net(images.clone().requires_grad_(True))
        result = {}
        for c in sorted(set(classes.tolist())):
            sel = classes == c
            layers = [layer for layer, idx in chain.kept.items() if idx]
            grads = torch.autograd.grad(logits[sel, c].sum(), [outs[layer] for layer in layers], retain_graph=True)
            result[c] = {layer: (outs[layer] * g).abs()[sel].sum((0, 2, 3)).detach() for layer, g in zip(layers, grads)}
    finally:
        for h in hooks:
            h.remove()
    return logits.detach(), result


def test_strongest_filter_is_the_argmax_of_an_independent_taylor_contribution(extracted):
    net, images, chain = extracted
    with torch.no_grad():
        classes = net(images).argmax(1)
        expected_logits = chain.apply(net)(images)
    logits, taylor = _masked_taylor(net, chain, images, classes)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)  # the hooks mask as apply does
    assert sorted(map(int, chain.strongest_filters)) == sorted(taylor)
    checked = 0
    for c, entries in chain.strongest_filters.items():
        per_layer = taylor[int(c)]
        assert [layer for layer, _, _ in entries] == list(per_layer)  # every kept layer, graph order
        for layer, index, contrib in entries:
            kept = torch.as_tensor(chain.kept[layer])
            values = per_layer[layer][kept]
            assert index == int(kept[values.argmax()]), (c, layer, values)
            assert contrib == pytest.approx(float(values.max()), rel=1e-4, abs=1e-7)
            checked += 1
    assert checked >= 2 * 5
