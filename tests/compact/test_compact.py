"""The compact model equals the masked model, with physically smaller layers and no dead convs."""

import operator
import random

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nchains._util.io import hash_model
from nchains.graph.analysis import analyze
from nchains.neurochains.chain import Chain
from nchains.compact.walk import compact


# ---- helpers (also used by test_export.py and test_cpp_client.py) ------------------------------

def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN running stats and affine, random conv biases: every constant is nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.out_channels, generator=g) * 0.3)
    return model.eval()


def make_chain(model: nn.Module, x: torch.Tensor, seed: int = 0, p_keep: float = 0.5, p_gate: float = 0.7,
               p_dead: float = 0.1, kept=None, gates=None) -> Chain:
    """A chain with random kept sets and gates (stress test of the channel bookkeeping)."""
    g = analyze(model, x[:1])
    rng = random.Random(seed)
    kept_all, scores, sizes = {}, {}, {}
    for name, u in g.layers.items():
        k = sorted(i for i in range(u.out_channels) if rng.random() < p_keep)
        if rng.random() < p_dead:
            k = []
        if kept is not None and name in kept:
            k = list(kept[name])
        kept_all[name] = k
        scores[name] = [rng.uniform(0.5, 1.5) for _ in k]
        sizes[name] = u.out_channels
    all_gates = {r: int(rng.random() < p_gate) for r in g.regions}
    all_gates.update(gates or {})
    return Chain(kept=kept_all, scores=scores, gates=all_gates, config={}, seed=0, model_hash=hash_model(model),
                 images_hash="0" * 64, metrics={"filters_kept": sum(map(len, kept_all.values())),
                                                "filters_total": sum(sizes.values())},
                 layer_sizes=sizes, labels={n: g.label_of[n] for n in [*sizes, *g.regions]},
                 regions={n: {"kind": r.kind, "layers": list(r.units)} for n, r in g.regions.items()},
                 input_shape=list(x.shape[1:]), class_names=None)


class MixedNet(nn.Module):
    """Depthwise and grouped convs, residual adds, a concat, a standalone (pre-activation) BN,
    SiLU, a spatial flatten into a hidden Linear."""

    def __init__(self, classes: int = 7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dw_bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(24)
        self.grp = nn.Conv2d(24, 24, 3, padding=1, groups=4, bias=False)
        self.grp_bn = nn.BatchNorm2d(24)
        self.br_a = nn.Conv2d(24, 8, 1)
        self.br_b = nn.Conv2d(24, 12, 3, padding=1)
        self.pre_bn = nn.BatchNorm2d(20)
        self.post = nn.Conv2d(20, 24, 3, padding=1, bias=False)
        self.post_bn = nn.BatchNorm2d(24)
        self.down = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.head_bn = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 40)
        self.fc2 = nn.Linear(40, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + F.silu(self.dw_bn(self.dw(x)))
        x = F.relu(self.pw_bn(self.pw(x)))
        x = torch.relu(x + self.grp_bn(self.grp(x)))
        c = torch.cat([self.br_a(x), self.br_b(x)], 1)
        c = F.relu(self.pre_bn(c))
        x = x + self.post_bn(self.post(c))
        x = F.max_pool2d(x, 2)
        x = F.adaptive_avg_pool2d(F.relu(self.head_bn(self.down(x))), 4)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def mixed_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(MixedNet(), seed)


def assert_matches(chain: Chain, model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    small = compact(chain, model, **kw)
    with torch.no_grad():
        ref, got = chain.apply(model)(x), small(x)
    assert got.shape == ref.shape
    err = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
    assert err <= 1e-5, err
    return small


def compacted(small: nn.Module, model: nn.Module):
    """(compact module, original module, layer info) of every analysed layer that runs."""
    modules = dict(model.named_modules())
    for name, info in small.nchains_layers.items():
        if info["module"] is not None:
            yield getattr(small, info["module"]), modules[name], info


def convs(small: nn.Module):
    return {name: m for name, m in small.named_children() if isinstance(m, nn.Conv2d)}


# ---- equality with the masked model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return randomize(torchvision.models.resnet18(num_classes=10))


@pytest.mark.parametrize("seed", [0, 1])
def test_resnet18_random_chains(resnet18, seed):
    x = torch.randn(3, 3, 32, 32)
    small = assert_matches(make_chain(resnet18, x, seed=seed), resnet18, x)
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 10)  # any batch size


def test_resnet50_small_input():
    torch.manual_seed(0)
    model = randomize(torchvision.models.resnet50(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    assert_matches(make_chain(model, x, seed=3, p_keep=0.4), model, x)


def test_vgg11_bn():
    torch.manual_seed(0)
    model = randomize(torchvision.models.vgg11_bn(num_classes=10))
    model.avgpool = nn.AdaptiveAvgPool2d(2)  # a small classifier for a fast test
    model.classifier = nn.Sequential(nn.Linear(512 * 4, 256), nn.ReLU(True), nn.Dropout(), nn.Linear(256, 10))
    x = torch.randn(2, 3, 32, 32)
    chain = make_chain(model, x, seed=1, p_dead=0.0, p_gate=0.8)
    small = assert_matches(chain, model, x)
    # the flatten of the pruned features shrinks the first Linear; the 1x1 -> 2x2 pooling is
    # folded into it (4x fewer weights) unless the weights must stay exact copies
    kept = len(small.nchains_layers["features.25"]["out"])
    assert small.classifier_0.in_features == kept
    exact = assert_matches(chain, model, x, keep_scores=True)
    assert exact.classifier_0.in_features == 4 * kept


class PoolHeadNet(nn.Module):
    """A VGG-style head at a small input: a 4x4 map pooled to 7x7 (uneven adaptive bins), flatten,
    two Linears; ``functional`` writes the pool as ``F.adaptive_avg_pool2d``; ``reuse`` also adds
    a second head on the pooled map (the pool has a second user: not folded)."""

    def __init__(self, functional: bool = False, reuse: bool = False, out: int = 7):
        super().__init__()
        self.functional, self.reuse, self.out = functional, reuse, out
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(out)
        self.fc1 = nn.Linear(24 * out * out, 32)
        self.fc2 = nn.Linear(32, 6)
        self.fc3 = nn.Linear(24 * out * out, 6)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        p = F.adaptive_avg_pool2d(x, self.out) if self.functional else self.pool(x)
        y = self.fc2(F.relu(self.fc1(torch.flatten(p, 1))))
        return y + self.fc3(torch.flatten(torch.sigmoid(p), 1)) if self.reuse else y


def _adaptive_pools(small: nn.Module) -> int:
    return sum(1 for n in small.graph.nodes
               if n.target is F.adaptive_avg_pool2d or (n.op == "call_module" and isinstance(
                   small.get_submodule(n.target), nn.AdaptiveAvgPool2d)))


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("multiple", [1, 8])
def test_enlarging_adaptive_pool_folds_into_the_linear(functional, multiple):
    torch.manual_seed(0)
    model = randomize(PoolHeadNet(functional=functional))
    x = torch.randn(3, 3, 8, 8)  # conv2 gives 4x4, pooled to 7x7
    chain = make_chain(model, x, seed=2, p_dead=0.0, p_gate=1.0, kept={"conv2": [1, 4, 5, 9, 17, 20, 23]})
    small = assert_matches(chain, model, x, channel_multiple=multiple)
    assert _adaptive_pools(small) == 0
    width = 7 + (-7 % multiple)
    assert small.fc1.in_features == width * 16  # was width * 49
    # the unfolded Linear on the pooled map (exact copies), both run in float64: they differ
    # only by the float32 rounding of their weights
    ref = compact(chain, model, channel_multiple=multiple, keep_scores=True)
    assert _adaptive_pools(ref) == 1 and ref.fc1.in_features == width * 49
    with torch.no_grad():
        a, b = small.double()(x.double()), ref.double()(x.double())
    assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())


@pytest.mark.parametrize("kw", [dict(out=2), dict(reuse=True)])
def test_adaptive_pool_not_folded_when_it_shrinks_the_map_or_has_other_users(kw):
    torch.manual_seed(0)
    model = randomize(PoolHeadNet(**kw))
    x = torch.randn(2, 3, 8, 8)
    chain = make_chain(model, x, seed=1, p_dead=0.0, p_gate=1.0)
    small = assert_matches(chain, model, x)
    assert _adaptive_pools(small) == 1


@pytest.mark.parametrize("seed", range(4))
def test_mixed_architecture(seed):
    model = mixed_net()
    x = torch.randn(3, 3, 16, 16)
    assert_matches(make_chain(model, x, seed=seed, p_gate=1.0, p_dead=0.05), model, x)
    assert_matches(make_chain(model, x, seed=seed + 100, p_gate=0.5), model, x, keep_scores=True)


@pytest.mark.parametrize("build", [mixed_net, lambda: randomize(torchvision.models.resnet18(num_classes=10))],
                         ids=["mixed", "resnet18"])
def test_extracted_chain(build):
    model = build()
    x = torch.randn(4, 3, 16, 16)
    import nchains

    chain = nchains.extract(model, x, steps=30, finetune_steps=0, lr=0.05)
    assert_matches(chain, model, x)
    assert_matches(chain, model, torch.randn(3, 3, 16, 16))


# ---- structure ----------------------------------------------------------------------------------

def test_reduced_shapes_and_residual_index_add(resnet18):
    x = torch.randn(2, 3, 32, 32)
    chain = make_chain(resnet18, x, seed=4, p_dead=0.0, p_gate=1.0)
    small = assert_matches(chain, resnet18, x)
    model_convs = dict(resnet18.named_modules())
    for name, info in small.nchains_layers.items():
        if info["module"] is None or name not in chain.kept:
            continue
        conv = getattr(small, info["module"])
        assert info["out"] == chain.kept[name]
        assert conv.weight.shape[:2] == (len(info["out"]), len(info["in"]))
        assert conv.weight.shape[2:] == model_convs[name].weight.shape[2:]
    code = small.code
    # Each block's last conv keeps its own subset of the stream: added back with index_add.
    assert "index_add" in code
    assert "nchains" not in code


def test_dead_layer_does_not_run_and_constants_fold(resnet18):
    x = torch.randn(2, 3, 32, 32)
    # layer1.0.conv1 removed: conv2 sees only zeros, so its output is the constant score * BN shift,
    # which flows into the stream and, through zero padding, into the next convs' borders.
    chain = make_chain(resnet18, x, seed=5, p_dead=0.0, p_gate=1.0, kept={"layer1.0.conv1": []})
    small = assert_matches(chain, resnet18, x)
    assert small.nchains_layers["layer1.0.conv1"]["module"] is None
    assert small.nchains_layers["layer1.0.conv2"]["module"] is None
    assert chain.kept["layer1.0.conv2"]
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in convs(small).values()]
    small(x)
    for h in hooks:
        h.remove()
    live_layers = [n for n, i in small.nchains_layers.items() if i["module"] and n in chain.kept]
    assert len(calls) == len(convs(small)) == len(live_layers) == 18
    assert any("correction" in name for name, _ in small.named_buffers())


def test_nonzero_constant_through_standalone_bn():
    model = mixed_net()
    x = torch.randn(2, 3, 16, 16)
    # br_a removed: pre_bn turns its zero maps into constants, relu keeps them, post (padding 1)
    # sees constant channels whose contribution varies at the borders.
    chain = make_chain(model, x, seed=7, p_dead=0.0, p_gate=1.0, kept={"br_a": []})
    for keep_scores in (False, True):
        small = assert_matches(chain, model, x, keep_scores=keep_scores)
        assert "br_a" not in convs(small)
        assert hasattr(small, "post_correction")


def test_all_filters_removed_gives_constant_logits(resnet18):
    x = torch.randn(2, 3, 32, 32)
    chain = make_chain(resnet18, x, p_gate=1.0, kept={"conv1": []})
    small = assert_matches(chain, resnet18, x)
    assert not convs(small)
    out = small(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 10) and torch.equal(out[0], out[4])


def test_grouped_convs_keep_their_grouping():
    model = mixed_net()
    x = torch.randn(2, 3, 16, 16)
    kept = {"dw": [0, 3, 4, 9, 15], "grp": [0, 1, 7, 8, 9, 10, 11, 20], "stem.0": list(range(16)),
            "pw": list(range(24))}
    chain = make_chain(model, x, p_gate=1.0, p_dead=0.0, kept=kept)
    small = assert_matches(chain, model, x)
    assert small.dw.groups == 5 and small.dw.weight.shape == (5, 1, 3, 3)
    # groups of 6 filters: kept 2, 5, 0, 1 -> 3 groups padded to 5 filters each, padding dropped after
    assert small.grp.groups == 3 and small.grp.weight.shape == (15, 6, 3, 3)
    assert "grp_out" in dict(small.named_buffers())


# ---- exact copies -------------------------------------------------------------------------------

def test_keep_scores_weights_are_bit_exact_copies():
    model = mixed_net()
    x = torch.randn(2, 3, 16, 16)
    chain = make_chain(model, x, seed=2, p_gate=1.0, p_dead=0.0)
    small = assert_matches(chain, model, x, keep_scores=True)
    checked = 0
    for new, old, info in compacted(small, model):
        out = torch.as_tensor(info["out"])
        if isinstance(old, nn.Conv2d) and old.groups == 1:
            assert torch.equal(new.weight, old.weight[out][:, torch.as_tensor(info["in"])])
            if old.bias is not None:
                assert torch.equal(new.bias, old.bias[out])
            checked += 1
        elif isinstance(old, nn.Linear):
            assert torch.equal(new.weight, old.weight[out][:, torch.as_tensor(info["in"])])
    assert checked >= 4
    bn = small.pw_bn
    kept = torch.as_tensor(small.nchains_layers["pw"]["out"])
    assert torch.equal(bn.weight, model.pw_bn.weight[kept]) and torch.equal(bn.running_var, model.pw_bn.running_var[kept])


def test_default_mode_folds_bn():
    model = mixed_net()
    x = torch.randn(2, 3, 16, 16)
    small = assert_matches(make_chain(model, x, seed=1, p_gate=1.0), model, x)
    names = {n for n, m in small.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert names <= {"pre_bn"}  # only the standalone BN (not after a conv) stays a BN


# ---- errors -------------------------------------------------------------------------------------

def test_errors(resnet18):
    x = torch.randn(1, 3, 32, 32)
    chain = make_chain(resnet18, x)
    with pytest.raises(TypeError, match="chain"):
        compact({"kept": {}}, resnet18)
    with pytest.raises(TypeError, match="model"):
        compact(chain, "resnet18")
    with pytest.raises(TypeError, match="keep_scores"):
        compact(chain, resnet18, keep_scores="yes")
    other = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError, match="hash"):
        compact(chain, other)


# ---- channel_multiple: exactly-zero padding channels ----------------------------------------------

def assert_padded(small: nn.Module, multiple: int, input_channels: int) -> None:
    """Every ungrouped conv reads and writes whole blocks of ``multiple`` channels."""
    seen = 0
    for name, m in small.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            assert m.out_channels % multiple == 0, (name, m.out_channels)
            assert m.in_channels % multiple == 0 or m.in_channels == input_channels, (name, m.in_channels)
            seen += 1
    assert seen


def assert_same_as_unpadded(chain: Chain, model: nn.Module, inputs, **kw) -> nn.Module:
    plain = compact(chain, model, **kw)
    padded = compact(chain, model, channel_multiple=8, **kw)
    with torch.no_grad():
        for x in inputs:
            ref, got = plain(x), padded(x)
            assert got.shape == ref.shape
            assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    return padded


@pytest.fixture(scope="module")
def shipped_chain():
    import nchains
    from nchains.models import zoo

    try:
        model = zoo.default_model()
        images, _, _ = zoo.default_images(["sneaker", "ankle-boot"], per_class=4)
    except FileNotFoundError as exc:
        pytest.skip(f"shipped model not available: {exc}")
    chain = nchains.extract(model, images, steps=30, finetune_steps=0)
    return model, images, chain


@pytest.mark.parametrize("keep_scores", [False, True])
@pytest.mark.parametrize("scatter", ["index_add", "gather"])
def test_channel_multiple_shipped_model(shipped_chain, keep_scores, scatter):
    model, images, chain = shipped_chain
    x = torch.randn(5, *chain.input_shape)
    padded = assert_same_as_unpadded(chain, model, [images, x, x[:1]], keep_scores=keep_scores, scatter=scatter)
    assert_padded(padded, 8, chain.input_shape[0])
    assert_matches(chain, model, images, keep_scores=keep_scores, scatter=scatter, channel_multiple=8)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scatter", ["index_add", "gather"])
def test_channel_multiple_resnet18(resnet18, seed, scatter):
    x = torch.randn(3, 3, 32, 32)
    chain = make_chain(resnet18, x, seed=seed)
    padded = assert_same_as_unpadded(chain, resnet18, [x, torch.randn(1, 3, 32, 32)], scatter=scatter)
    assert_padded(padded, 8, 3)
    assert any(new.out_channels > len(info["out"])  # something was padded
               for new, old, info in compacted(padded, resnet18) if isinstance(new, nn.Conv2d))


@pytest.mark.parametrize("seed", range(3))
def test_channel_multiple_mixed_architecture(seed):
    """Grouped and depthwise convs (kept unpadded), concat, standalone BN, SiLU, flatten."""
    model = mixed_net()
    x = torch.randn(3, 3, 16, 16)
    for keep_scores in (False, True):
        chain = make_chain(model, x, seed=seed, p_gate=0.7, p_dead=0.05)
        assert_same_as_unpadded(chain, model, [x], keep_scores=keep_scores)
        assert_matches(chain, model, x, keep_scores=keep_scores, channel_multiple=8)


def test_channel_multiple_keep_scores_bit_exact(resnet18):
    """Padding adds zero filters and zero input columns; the real filters stay exact copies."""
    x = torch.randn(2, 3, 32, 32)
    chain = make_chain(resnet18, x, seed=2, p_gate=1.0, p_dead=0.0)
    small = assert_matches(chain, resnet18, x, keep_scores=True, channel_multiple=8)
    checked = 0
    for new, old, info in compacted(small, resnet18):
        out, ins = torch.as_tensor(info["out"]), torch.as_tensor(info["in"])
        n_out, n_in = len(out), len(ins)
        assert torch.equal(new.weight[:n_out, :n_in], old.weight[out][:, ins])
        assert not new.weight[n_out:].any() and not new.weight[:, n_in:].any()
        if getattr(new, "bias", None) is not None and old.bias is not None:
            assert torch.equal(new.bias[:n_out], old.bias[out]) and not new.bias[n_out:].any()
        checked += isinstance(old, nn.Conv2d) and new.out_channels > n_out
    assert checked >= 4
    bn = small.bn1
    kept = torch.as_tensor(small.nchains_layers["conv1"]["out"])
    assert torch.equal(bn.weight[:len(kept)], resnet18.bn1.weight[kept])
    assert torch.equal(bn.running_var[:len(kept)], resnet18.bn1.running_var[kept])


def test_channel_multiple_errors(resnet18):
    chain = make_chain(resnet18, torch.randn(1, 3, 32, 32))
    for bad in (0, -8, 2.0, True):
        with pytest.raises(ValueError, match="channel_multiple"):
            compact(chain, resnet18, channel_multiple=bad)


# ---- max_pool="separable": max pooling as strided slices and maxima -----------------------------

class PoolNet(nn.Module):
    """Max pools of the forms compact meets: a module after ReLU (ResNet's stem), a functional
    call with keyword arguments, non-square kernel and stride, after LeakyReLU; kernel equal to
    stride after SiLU (not monotone: not moved); after a ReLU whose output is also added back
    (the activation keeps its other user); ceil mode that adds a window (left native)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.pool1 = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.act2 = nn.LeakyReLU(0.1)
        self.conv3 = nn.Conv2d(16, 24, 3, padding=1)
        self.act3 = nn.SiLU()
        self.pool3 = nn.MaxPool2d(2)
        self.conv4 = nn.Conv2d(24, 24, 3, padding=1)
        self.pool4 = nn.MaxPool2d(3, 1, 1)
        self.pool5 = nn.MaxPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(24 * 2 * 3, classes)

    def forward(self, x):
        x = self.pool1(self.relu(self.bn1(self.conv1(x))))  # 20x20 -> 10x10
        x = F.max_pool2d(self.act2(self.conv2(x)), kernel_size=(2, 3), stride=(2, 1), padding=(1, 1))  # 6x10
        x = self.pool3(self.act3(self.conv3(x)))  # 3x5
        a = self.relu(self.conv4(x))
        x = self.pool4(a) + a
        return self.fc(torch.flatten(self.pool5(x), 1))  # ceil: 2x3


def _max_pools(small: nn.Module) -> int:
    return sum(1 for n in small.graph.nodes
               if n.target is F.max_pool2d or (n.op == "call_module"
                                              and isinstance(small.get_submodule(n.target), nn.MaxPool2d)))


@pytest.mark.parametrize("seed", range(3))
def test_separable_max_pool_is_exact(seed):
    torch.manual_seed(seed)
    model = randomize(PoolNet(), seed)
    x = torch.randn(4, 3, 20, 20)
    x[0, :, 3:6, 3:6] = -1e30  # windows whose maximum is a large negative value
    chain = make_chain(model, x, seed=seed, p_dead=0.0, p_gate=1.0)
    fast = assert_matches(chain, model, x)
    native = compact(chain, model, max_pool="native")
    assert _max_pools(native) == 5 and _max_pools(fast) == 1  # only the ceil-mode pool stays
    with torch.no_grad():
        assert torch.equal(fast(x), native(x))
    for multiple in (1, 8):  # with zero padding channels too
        assert_matches(chain, model, x, channel_multiple=multiple, max_pool="separable")


def test_separable_max_pool_applies_monotone_activations_after_pooling():
    """ReLU and LeakyReLU move after the pooling (they commute with max; 4x fewer elements for a
    2x2 pool); SiLU does not; a ReLU whose output has another user still runs for that user."""
    model = randomize(PoolNet())
    x = torch.randn(2, 3, 20, 20)
    chain = make_chain(model, x, p_keep=1.0, p_dead=0.0, p_gate=1.0)
    small = compact(chain, model)
    acts = {n.target: n for n in small.graph.nodes if n.op == "call_module"
            and isinstance(small.get_submodule(n.target), (nn.ReLU, nn.LeakyReLU, nn.SiLU))}
    inputs = {target: node.args[0] for target, node in acts.items()}
    moved = [t for t, a in inputs.items() if a.op == "call_function" and a.target is torch.maximum]
    kinds = sorted(type(small.get_submodule(t)).__name__ for t in moved)
    assert kinds == ["LeakyReLU", "ReLU", "ReLU"], kinds  # stem, conv2, conv4 (kept for its add)
    silu = [t for t in acts if isinstance(small.get_submodule(t), nn.SiLU)]
    assert len(silu) == 1 and inputs[silu[0]].op == "call_module"  # SiLU stays before the pool


def test_max_pool_argument_errors(resnet18):
    chain = make_chain(resnet18, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="max_pool must be 'separable' or 'native'"):
        compact(chain, resnet18, max_pool="fast")


@pytest.mark.parametrize("kept", [
    # shortcut filters 0..6 (7 -> 8 wide), conv2 filters 5..7 (3 -> 8); stream 0..7 (8)
    {"layer2.0.downsample.0": list(range(7)), "layer2.0.conv2": [5, 6, 7]},
    # both qualify and either layout moves: only the one made the base may change
    {"layer2.0.downsample.0": list(range(1, 8)), "layer2.0.conv2": [0]},
])
@pytest.mark.parametrize("scatter", ["index_add", "gather"])
def test_padded_join_lays_a_branch_conv_out_as_the_stream(resnet18, scatter, kept):
    """A residual join where neither operand holds the whole stream: in a padded graph, a
    branch conv already as wide as the padded stream takes its filters at the stream's
    positions (zero filters where the padding was), so it is the join's base: no zeros tensor
    and one scatter fewer, no extra filters. Same outputs as unpadded."""
    x = torch.randn(2, 3, 32, 32)
    chain = make_chain(resnet18, x, seed=2, p_dead=0.0, p_gate=1.0, kept=kept)
    padded = assert_same_as_unpadded(chain, resnet18, [x], scatter=scatter)
    calls = {}
    for name in kept:
        info = padded.nchains_layers[name]
        conv = getattr(padded, info["module"])
        assert conv.out_channels == 8 and info["out"] == kept[name]  # as wide as padding made it
        rows = torch.nonzero(conv.weight.flatten(1).abs().sum(1)).flatten().tolist()
        calls[name] = (next(n for n in padded.graph.nodes if n.op == "call_module" and n.target == info["module"]),
                       rows)
    expected = torch.index_add if scatter == "index_add" else operator.add
    joins = {u for call, _ in calls.values() for u in call.users}
    joins |= {u for j in list(joins) if j.target is torch.index_select for u in j.users}
    join = next(j for j in joins if j.target is expected and any(j.args[0] is c for c, _ in calls.values()))
    base = next(name for name, (c, _) in calls.items() if join.args[0] is c)
    # the base conv's filters sit at the stream's positions (the stream is channels 0..7), the
    # other conv's stay first, in its own layout
    assert calls[base][1] == kept[base]
    other = next(name for name in kept if name != base)
    assert calls[other][1] == list(range(len(kept[other])))
    unpadded = compact(chain, resnet18, scatter=scatter)
    assert not any(n.target == "new_zeros" for n in padded.graph.nodes if n.args and n.args[0] is join.args[0])
    n_ops = lambda g: sum(n.op in ("call_function", "call_method") for n in g.graph.nodes)  # noqa: E731
    assert n_ops(padded) < n_ops(unpadded)


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("multiple", [1, 8])
def test_channels_last_runs_nhwc_with_the_same_values(multiple):
    """Conv weights stored NHWC, the input made NHWC first thing, every conv output NHWC, and
    the values of the masked model."""
    torch.manual_seed(0)
    model = randomize(PoolNet())
    x = torch.randn(3, 3, 20, 20)
    chain = make_chain(model, x, seed=2, p_dead=0.0, p_gate=1.0)
    small = assert_matches(chain, model, x, memory_format="channels_last", channel_multiple=multiple)
    assert small.nchains_memory_format == "channels_last"
    assert all(_channels_last(m.weight) for m in convs(small).values())
    first = next(n for n in small.graph.nodes if n.op != "placeholder")
    assert first.target == "contiguous" and first.kwargs == {"memory_format": torch.channels_last}
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in convs(small).values()]
    with torch.no_grad():
        small(x)
    for h in hooks:
        h.remove()
    assert outputs and all(_channels_last(o) for o in outputs)
    plain = compact(chain, model, channel_multiple=multiple)
    assert plain.nchains_memory_format == "contiguous" and not any(_channels_last(m.weight)
                                                                   for m in convs(plain).values())


def test_auto_memory_format_avoids_channel_index_ops(resnet18):
    """``auto``: channels-last for a plain conv stack, contiguous where residual joins scatter
    channels (index_add and index_select are ~5x slower on NHWC tensors)."""
    x = torch.randn(2, 3, 32, 32)
    chain = make_chain(resnet18, x, seed=0)
    joins = compact(chain, resnet18, memory_format="auto")
    assert any(n.target is torch.index_add for n in joins.graph.nodes)
    assert joins.nchains_memory_format == "contiguous"
    model = randomize(PoolNet())
    plain = assert_matches(make_chain(model, torch.randn(2, 3, 20, 20), p_dead=0.0, p_gate=1.0), model,
                           torch.randn(2, 3, 20, 20), memory_format="auto")
    assert plain.nchains_memory_format == "channels_last"
    with pytest.raises(ValueError, match="memory_format must be 'contiguous', 'channels_last' or 'auto'"):
        compact(chain, resnet18, memory_format="nhwc")
