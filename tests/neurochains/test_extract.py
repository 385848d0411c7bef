"""NeuroChains extraction: on the shipped model, small trained models and every family."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import nchains
from nchains import NeuroChainsConfig
from nchains.models import zoo
from nchains.neurochains.extraction import model_family

from _models import DigitsNet, digits_region, trained_digits_net


@pytest.fixture(scope="module")
def shipped():
    model = zoo.default_model()
    images, labels, _ = zoo.default_images(["sneaker", "ankle-boot"], per_class=10)
    chain = nchains.extract(model, images, class_names=zoo.default_class_names())
    return model, images, chain


def test_shipped_model_chain_is_small_and_faithful(shipped):
    model, images, chain = shipped
    m = chain.metrics
    assert m["filters_total"] == sum(mod.out_channels for mod in model.modules() if isinstance(mod, nn.Conv2d))
    assert m["filters_kept"] < 0.3 * m["filters_total"]
    assert m["agreement"] >= 0.95
    assert m["kl"] < 0.1
    assert m["layers_kept"] <= m["layers_total"]


def _metrics_of(out, original):
    """(KL, agreement, prob drop) of logits ``out`` against the original model's logits."""
    logp = F.log_softmax(original, 1)
    kl = F.kl_div(F.log_softmax(out, 1), logp, log_target=True, reduction="batchmean").item()
    pred = original.argmax(1)
    agreement = (out.argmax(1) == pred).float().mean().item()
    drop = (logp.exp() - F.softmax(out, 1)).gather(1, pred[:, None]).mean().item()
    return kl, agreement, drop


def _hooked_chain(model, chain, kept_maps=None):
    """The chain built on the ORIGINAL model with forward hooks, independently of ScoredModel:
    each filter's map after its BatchNorm (the conv when there is none; a scored Linear's
    output) is multiplied by the chain's score (0 for a removed filter), removed blocks return
    their input and a removed layer region returns its conv's input.

    ``kept_maps``, when given, receives ``layer -> z`` (Tensor[N, C, H, W]): the scaled map
    before the unit's activation, on the autograd graph. Returns the hook handles."""
    graph = nchains.analyze(model, torch.zeros(1, *chain.input_shape))
    assert not any("@" in name for name in chain.layer_sizes)  # module hooks fire per module
    handles = []
    for name, size in chain.layer_sizes.items():
        s = torch.zeros(size)
        s[chain.kept[name]] = torch.tensor(chain.scores[name])
        unit = graph.layers.get(name)
        path = (unit.bn or unit.conv) if unit is not None else graph.linears[name].first.target

        def scale(m, i, out, s=s, name=name):
            z = out * s.view(1, -1, *[1] * (out.dim() - 2))
            if kept_maps is not None:
                kept_maps[name] = z
            return z.clone()  # an in-place activation that follows must not overwrite z
        handles.append(model.get_submodule(path).register_forward_hook(scale))
    for region, gate in chain.gates.items():
        if gate == 1:
            continue
        if chain.regions[region]["kind"] == "block":
            handles.append(model.get_submodule(region).register_forward_hook(lambda m, i, out: i[0]))
            continue
        unit, box = graph.layers[region], {}
        assert unit.last.op == "call_module", region
        handles.append(model.get_submodule(unit.conv).register_forward_pre_hook(
            lambda m, i, box=box: box.update(x=i[0])))
        handles.append(model.get_submodule(unit.last.target).register_forward_hook(
            lambda m, i, out, box=box: box["x"]))
    return handles


def _hooked_logits(model, chain, images, kept_maps=None):
    handles = _hooked_chain(model, chain, kept_maps)
    try:
        return model(images)
    finally:
        for h in handles:
            h.remove()


def _check_apply_against_hooks(model, chain, images, rel=1e-3):
    """chain.apply(model) computes the hooked chain, and the chain's metrics are its metrics."""
    with torch.no_grad():
        ref = _hooked_logits(model, chain, images)
        out = chain.apply(model)(images)
        original = model(images)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    kl, agreement, drop = _metrics_of(ref, original)
    assert kl == pytest.approx(chain.metrics["kl"], rel=rel, abs=1e-5)
    assert agreement == chain.metrics["agreement"]
    assert drop == pytest.approx(chain.metrics["prob_drop"], rel=rel, abs=1e-5)
    return ref, original


def test_apply_equals_the_chain_built_with_hooks_and_its_metrics(shipped):
    model, images, chain = shipped
    assert 0 < chain.metrics["filters_kept"] < chain.metrics["filters_total"]
    ref, original = _check_apply_against_hooks(model, chain, images)
    assert not torch.allclose(ref, original, atol=1e-3)  # the chain is not the original model


def test_removed_filters_output_exact_zero_maps(shipped):
    model, images, chain = shipped
    masked = chain.apply(model)
    seen = {}
    hooks = [masked.unit(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
             for name, idx in chain.kept.items() if idx]
    with torch.no_grad():
        masked(images)
    for h in hooks:
        h.remove()
    checked = 0
    for name, out in seen.items():
        removed = sorted(set(range(chain.layer_sizes[name])) - set(chain.kept[name]))
        if removed:
            assert torch.count_nonzero(out[:, removed]) == 0, name
            checked += 1
        assert torch.count_nonzero(out[:, chain.kept[name]]) > 0, name
    assert checked > 0


def test_filters_in_removed_regions_count_as_removed(shipped):
    _, _, chain = shipped
    for region, gate in chain.gates.items():
        if gate == 0:
            for layer in chain.regions[region]["layers"]:
                assert chain.kept[layer] == []
    assert chain.metrics["filters_kept"] == sum(len(v) for v in chain.kept.values())


def test_strongest_filter_is_the_argmax_of_an_independent_taylor_contribution(shipped):
    """Per class and kept layer: the recorded filter maximises sum |a * d y_c / d a| over the
    class's images among the kept filters, and the recorded value is that sum. Computed on the
    original model with hooks (:func:`_hooked_chain`); for a ReLU unit a * da = z * dz
    elementwise (a = relu(z)), so the scaled pre-activation map z serves as a."""
    model, images, chain = shipped
    graph = nchains.analyze(model, images[:1])
    assert all(u.act in (None, "relu") for u in graph.layers.values())
    kept_layers = [name for name in chain.layer_sizes if chain.kept[name]]
    strongest = chain.strongest_filters
    assert sorted(strongest, key=int) == [str(c) for c in chain.classes] and len(chain.classes) == 2
    with torch.no_grad():
        pred = model(images).argmax(1)
    checked = 0
    for c, path in strongest.items():
        maps = {}
        x = images.clone().requires_grad_(True)
        logits = _hooked_logits(model, chain, x, maps)
        sel = pred == int(c)
        grads = torch.autograd.grad(logits[sel, int(c)].sum(), [maps[n] for n in kept_layers])
        assert [layer for layer, _, _ in path] == kept_layers, c
        for (layer, idx, contrib), grad in zip(path, grads):
            ref = (maps[layer] * grad).abs()[sel].sum((0, 2, 3)).detach()
            kept = torch.tensor(chain.kept[layer])
            best = int(kept[ref[kept].argmax()])
            assert idx in chain.kept[layer], (c, layer)
            if idx != best:  # only a tie within float32 noise may pick another filter
                assert float(ref[idx]) == pytest.approx(float(ref[best]), rel=1e-4), (c, layer, idx, best)
            assert contrib == pytest.approx(float(ref[idx]), rel=1e-4, abs=1e-7), (c, layer)
            checked += int(len(kept) > 1 and float(ref[kept].min()) < 0.5 * float(ref[kept].max()))
    assert checked >= 5  # layers where the argmax is a real choice


def test_same_seed_same_chain_and_seed_is_recorded():
    net = trained_digits_net()
    images, _ = digits_region()
    a = nchains.extract(net, images, steps=40, finetune_steps=10, seed=3)
    b = nchains.extract(net, images, steps=40, finetune_steps=10, seed=3)
    assert a.kept == b.kept and a.scores == b.scores and a.gates == b.gates
    assert a.seed == 3 and a.config["seed"] == 3
    assert a.images_hash == b.images_hash and a.model_hash == b.model_hash


def test_trained_digits_chain_preserves_predictions():
    net = trained_digits_net()
    images, labels = digits_region()
    # A 240-filter network: each filter matters more than in ResNet-50, so a smaller L1
    # weight than the paper's ImageNet value keeps the KL low.
    chain = nchains.extract(net, images, lam=0.002, lam_gate=0.2, steps=200)
    assert chain.metrics["agreement"] >= 0.9
    assert chain.metrics["filters_kept"] < 0.8 * chain.metrics["filters_total"]


def test_config_defaults_are_the_papers():
    cfg = NeuroChainsConfig()
    assert (cfg.temperature, cfg.lr, cfg.steps, cfg.tau, cfg.finetune_lr, cfg.finetune_steps, cfg.finetune_kl,
            cfg.stop_delta) == (0.2, 0.005, 300, 0.1, 0.01, 50, 0.1, 0.02)
    assert (cfg.resolved("vgg").lam, cfg.resolved("vgg").lam_gate) == (0.007, 2.0)
    assert (cfg.resolved("resnet").lam, cfg.resolved("resnet").lam_gate) == (0.0065, 0.9)
    assert cfg.replace(lam=0.5).resolved("vgg").lam == 0.5
    assert model_family(nchains.analyze(torchvision.models.vgg11(num_classes=10), torch.zeros(1, 3, 32, 32))) \
        == "vgg"
    assert model_family(nchains.analyze(DigitsNet(), torch.zeros(1, 1, 8, 8))) == "resnet"


@pytest.mark.parametrize("call,exc,match", [
    (lambda m, x: nchains.extract(m, x[0]), ValueError, r"images must have shape \[N, C, H, W\]"),
    (lambda m, x: nchains.extract(m, x.numpy()), TypeError, "images must be a Tensor"),
    (lambda m, x: nchains.extract(m, (x * 10).long()), ValueError, "floating-point"),
    (lambda m, x: nchains.extract("model", x), TypeError, "model must be a torch.nn.Module"),
    (lambda m, x: nchains.extract(m, x, lamda=0.1), ValueError, r"unknown NeuroChainsConfig field\(s\) \['lamda'\]"),
    (lambda m, x: nchains.extract(m, x, steps=-1), ValueError, "steps must be an int >= 0"),
    (lambda m, x: nchains.extract(m, x, tau=-0.1), ValueError, "tau must be a number >= 0"),
    (lambda m, x: nchains.extract(m, x, config={"lam": 1}), TypeError, "config must be a NeuroChainsConfig"),
    (lambda m, x: nchains.extract(m, x, class_names=["a"], steps=1), ValueError, "class_names must have 10"),
])
def test_bad_inputs(call, exc, match):
    images, _ = digits_region(per_class=2)
    with pytest.raises(exc, match=match):
        call(DigitsNet().eval(), images)


class _UserCNN(nn.Module):
    """Grouped and depthwise convs, ReLU6/SiLU/GELU, pools, a residual add, a concat, a hidden Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.SiLU())
        self.pw = nn.Conv2d(16, 16, 1, groups=4)
        self.left = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.GELU())
        self.right = nn.Conv2d(16, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(),
                                  nn.Linear(12, 5))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(self.pool(x))


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


FAMILIES = {
    "vgg11": lambda: torchvision.models.vgg11(num_classes=10),
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=10),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(num_classes=10),
    "wide_resnet50_2": lambda: torchvision.models.wide_resnet50_2(num_classes=10),
    "user_cnn": _UserCNN,
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_architecture_family_extracts_and_applies(family):
    torch.manual_seed(0)
    model = _randomise_bn(FAMILIES[family]())
    images = torch.randn(2, 3, 32, 32)
    chain = nchains.extract(model, images, steps=3, finetune_steps=2, stop_delta=None,
                            score_linear=family == "user_cnn")
    assert chain.metrics["steps_run"] == 3
    assert chain.metrics["filters_total"] == sum(chain.layer_sizes.values())
    _check_apply_against_hooks(model, chain, images)
    if family == "user_cnn":
        assert "head.2" in chain.layer_sizes and "head.4" not in chain.layer_sizes  # classifier never scored
