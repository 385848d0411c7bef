"""Tests of nchains.analysis: units, linears, adds, concats, regions, labels, errors.

torchvision models are built on the meta device (no weights to initialise, shapes only):
analysis only needs shapes, so every family is checked in a few seconds.
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nchains.graph import labels as _labels
from nchains.graph.analysis import ModelGraph, analyze

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "wide_resnet50_2"]
VGGS = ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _meta(name: str):
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    return model, analyze(model, torch.empty(1, 3, 32, 32, device="meta"))


@pytest.fixture(scope="module")
def resnet50():
    return _meta("resnet50")


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ---- torchvision families ------------------------------------------------------------


@pytest.mark.parametrize("name", RESNETS + VGGS)
def test_torchvision_units_regions_and_labels(name):
    model, g = _meta(name)
    assert isinstance(g, ModelGraph)
    convs = _convs(model)
    assert set(g.layers) == set(convs)
    assert g.filters_total == sum(c.out_channels for c in convs.values())
    for n, u in g.layers.items():
        c = convs[n]
        assert (u.conv, u.in_channels, u.groups) == (n, c.in_channels, c.groups)
        assert (u.out_channels, u.output_shape[1]) == (c.out_channels, c.out_channels)
        assert u.stride == c.stride and u.padding == c.padding
    if name.startswith("vgg"):
        expected = {n for n, c in convs.items() if c.in_channels == c.out_channels}
        assert all(u.act == "relu" for u in g.layers.values())
        assert all((u.bn is not None) == name.endswith("_bn") for u in g.layers.values())
        assert {r.kind for r in g.regions.values()} == {"layer"}
        assert g.classifier == "classifier.6"
        assert [g.label_of[n] for n in g.linears] == ["FC1", "FC2", "FC3"]
    else:
        blocks = [(n, b) for n, b in model.named_modules()
                  if n.count(".") == 1 and n.startswith("layer")]
        expected = {n for n, b in blocks if b.downsample is None}
        last = "conv3" if hasattr(model.layer1[0], "conv3") else "conv2"
        for n, u in g.layers.items():
            # the act of a block's last conv and shortcut comes after the add
            assert u.bn is not None
            assert (u.act is None) == n.endswith(("downsample.0", last)), n
        assert {r.kind for r in g.regions.values()} == {"block"}
        for r in g.regions.values():
            assert set(r.units) == {n for n in convs if n.startswith(r.name + ".")}
            assert r.label == f"L{r.name[5]}B{int(r.name.split('.')[1]) + 1}"
        assert g.classifier == "fc" and len(g.adds) == len(blocks)
    assert set(g.regions) == expected
    labels = [g.label_of[n] for n in [*g.layers, *g.linears, *g.regions]]
    assert len(set(labels)) == len(set([*g.layers, *g.linears, *g.regions]))
    for n in g.layers:
        assert g.layer_of_label[g.label_of[n]] == n
        assert g.filter_of_label(g.filter_label(n, 3)) == (n, 3)


def test_resnet50_labels(resnet50):
    _, g = resnet50
    assert g.label_of["conv1"] == "Conv1"
    assert g.label_of["layer4.0.conv2"] == "L4B1C2"
    assert g.label_of["layer1.0.downsample.0"] == "L1B1SC"
    assert g.label_of["layer3.5.conv3"] == "L3B6C3"
    assert g.label_of["layer1.1"] == "L1B2" and g.regions["layer1.1"].label == "L1B2"
    assert g.label_of["fc"] == "FC"
    assert g.filter_label("layer4.0.conv2", 48) == "L4B1C2_48"
    assert g.filter_of_label("L4B1C2_48") == ("layer4.0.conv2", 48)
    assert g.layer_of_label["L1B1SC"] == "layer1.0.downsample.0"
    with pytest.raises(ValueError, match="index"):
        g.filter_label("layer4.0.conv2", 512)
    with pytest.raises(ValueError, match="layer"):
        g.filter_label("layer9.conv", 0)
    with pytest.raises(ValueError, match="names no layer"):
        g.filter_of_label("L9B1C1_3")


def test_resnet50_regions_are_blocks_without_downsample(resnet50):
    model, g = resnet50
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(g.regions) == 12 and len(blocks) == 16
    assert "layer1.0" not in g.regions and "layer1.1" in g.regions
    r = g.regions["layer2.3"]
    assert r.kind == "block" and r.shape == (1, 512, 4, 4)
    assert r.input.name == "layer2_2_relu_2" and r.output.name == "layer2_3_relu_2"
    assert all(g.layers[u].region == "layer2.3" for u in r.units)
    assert g.layers["layer2.0.conv2"].region is None  # in a downsampling block: no layer gate
    seen = set()
    for region in g.regions.values():  # gates never nest
        assert not seen & set(region.nodes)
        seen |= set(region.nodes)


def test_resnet50_units_adds_and_filters(resnet50):
    model, g = resnet50
    assert g.filters_total == 26560 == sum(c.out_channels for c in _convs(model).values())
    u = g.layers["layer1.0.conv3"]
    assert (u.bn, u.act, u.kernel_size) == ("layer1.0.bn3", None, (1, 1))
    assert [n.name for n in u.nodes] == ["layer1_0_conv3", "layer1_0_bn3"]
    assert [c.op for c in u.consumers] == ["call_function"]  # the residual add
    stem = g.layers["conv1"]
    assert (stem.bn, stem.act) == ("bn1", "relu")
    assert (stem.input_shape, stem.output_shape) == ((1, 3, 32, 32), (1, 64, 16, 16))
    add = g.adds[0]
    assert add.producers == ("layer1.0.conv3", "layer1.0.downsample.0")
    assert g.adds[1].producers == ("layer1.1.conv3", None)
    assert g.source_units(g.adds[1].node) == (
        "layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3")
    assert g.input_shape == (1, 3, 32, 32) and g.classifier == "fc"
    assert g.linears["fc"].is_classifier


def test_vgg19_labels_and_layer_regions():
    model, g = _meta("vgg19")
    assert g.label_of["features.34"] == "L34" and g.label_of["features.0"] == "L0"
    assert g.filter_label("features.34", 490) == "L34_490"
    assert g.filter_of_label("L25_506") == ("features.25", 506)
    assert g.filters_total == 5504
    shape_preserving = [n for n, c in _convs(model).items() if c.in_channels == c.out_channels]
    assert list(g.regions) == shape_preserving and len(shape_preserving) == 12
    r = g.regions["features.34"]
    assert r.units == ("features.34",) and r.label == "L34"
    assert r.input is g.layers["features.34"].input and r.output is g.layers["features.34"].last
    assert g.linears["classifier.3"].act == "relu" and not g.linears["classifier.3"].is_classifier


# ---- user-defined CNNs ---------------------------------------------------------------


class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu6(self.bn1(self.dw(x)))
        return torch.relu(self.bn2(self.pw(y)) + x)


class Branches(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, 8, 1)
        self.b = nn.Conv2d(c, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x), inplace=True), F.gelu(self.bn(self.b(x)))], dim=1)


class UserCNN(nn.Module):
    """Grouped/depthwise convs, BN, ReLU/ReLU6/SiLU/GELU (modules and functional, in-place
    or not), max/avg/adaptive pooling, residual add, channel concat, flatten, Linear."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.stem_bn = nn.BatchNorm2d(16)
        self.same = nn.Conv2d(16, 16, 3, padding="same")
        self.silu = nn.SiLU()
        self.res = Residual(16)
        self.branches = Branches(16)
        self.pool = nn.MaxPool2d(2)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(32, 24)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.silu(self.same(x))
        x = self.res(x)
        x = self.pool(self.branches(x))
        x = F.avg_pool2d(torch.relu_(self.grouped(x)), 1)
        x = torch.flatten(self.gap(x), 1)
        return self.head(self.drop(F.relu(self.hidden(x))))


def test_user_cnn_units():
    g = analyze(UserCNN(), torch.randn(2, 3, 32, 32))
    got = {n: (u.bn, u.act, u.groups) for n, u in g.layers.items()}
    assert got == {"stem": ("stem_bn", "relu", 1), "same": (None, "silu", 1),
                   "res.dw": ("res.bn1", "relu6", 16), "res.pw": ("res.bn2", None, 1),
                   "branches.a": (None, "relu", 1), "branches.b": ("branches.bn", "gelu", 2),
                   "grouped": (None, "relu", 4)}
    assert g.layers["same"].padding == (1, 1)  # padding="same" made explicit
    assert g.layers["grouped"].output_shape == (2, 32, 8, 8)
    assert g.filters_total == 16 * 4 + 8 + 8 + 32
    assert {n: (lin.act, lin.is_classifier) for n, lin in g.linears.items()} == {
        "hidden": ("relu", False), "head": (None, True)}
    assert g.classifier == "head" and g.label_of["head"] == "head"


def test_user_cnn_adds_concats_regions():
    g = analyze(UserCNN(), torch.randn(2, 3, 32, 32))
    assert len(g.adds) == 1 and g.adds[0].producers == ("res.pw", "same")
    (cat,) = g.concats
    assert cat.channels == (8, 8) and cat.producers == ("branches.a", "branches.b")
    assert g.source_units(cat.node) == ("branches.a", "branches.b")
    assert {n: (r.kind, r.units) for n, r in g.regions.items()} == {
        "same": ("layer", ("same",)), "res": ("block", ("res.dw", "res.pw")),
        "branches": ("block", ("branches.a", "branches.b"))}
    assert g.regions["res"].input is g.layers["same"].last


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = ConvBNAct(8, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(self.inner(x)) + x


def test_innermost_region_wins_and_repeated_calls_are_units():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.outer = Outer()
            self.shared = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.outer(self.stem(x))
            x = self.shared(self.shared(x))
            return self.fc(x.mean((2, 3)))

    g = analyze(Net(), torch.randn(1, 3, 16, 16))
    assert {n: r.kind for n, r in g.regions.items()} == {
        "outer.inner": "block", "shared": "layer", "shared@1": "layer"}
    assert "outer.conv" not in g.regions  # inside a residual module
    assert list(g.layers) == ["stem", "outer.inner.conv", "outer.conv", "shared", "shared@1"]
    assert g.layers["shared@1"].input is g.layers["shared"].last


def test_labels_collisions_keep_paths():
    root = nn.Module()
    root.a = nn.Sequential(nn.Conv2d(1, 1, 1))
    root.b = nn.Sequential(nn.Identity(), nn.Conv2d(1, 1, 1))
    labels = _labels.make_labels(root, [("a.0", "conv"), ("b.0", "conv"), ("b.1", "conv")])
    assert labels == {"a.0": "a.0", "b.0": "b.0", "b.1": "L1"}
    assert _labels.split_filter_label("my_layer_7") == ("my_layer", 7)
    with pytest.raises(ValueError, match="filter label"):
        _labels.split_filter_label("L4B1C2")


# ---- errors --------------------------------------------------------------------------


class _Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.gamma


def _net(middle: nn.Module, fn=None):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.body = middle
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.body(self.conv(x)) if fn is None else fn(self.conv(x))
            return self.fc(x.mean((2, 3)))
    return Net()


class _Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("middle, match", [
    (_Scale(4), r"module 'body'.*parameter 'body.gamma'"),
    (nn.GroupNorm(2, 4), r"'body' \(GroupNorm, 8 parameters\)"),
    (nn.BatchNorm2d(4, track_running_stats=False), r"BatchNorm2d 'body' has no running stats"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), r"'body'.*padding_mode='reflect'"),
    (nn.ChannelShuffle(2), r"'body' \(ChannelShuffle\)"),
])
def test_unsupported_modules_raise(middle, match):
    with pytest.raises(ValueError, match=match):
        analyze(_net(middle), torch.randn(1, 3, 8, 8))


def test_untraceable_and_unsupported_functions_raise():
    with pytest.raises(ValueError, match=r"could not be traced by torch.fx.*at module 'body'"):
        analyze(_net(_Branchy()), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="tensor indexing"):
        analyze(_net(None, lambda x: torch.cat([x[:, :2], x[:, 2:]], 1)), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="torch.cat along dim 2"):
        analyze(_net(None, lambda x: torch.cat([x, x], 2)), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"call_function 'transpose'"):
        analyze(_net(None, lambda x: torch.transpose(x, 2, 3)), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"could not run through the model at module 'conv'"):
        analyze(_net(nn.Identity()), torch.randn(1, 5, 8, 8))
    with pytest.raises(TypeError, match="model"):
        analyze(lambda x: x, torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="example_input"):
        analyze(_net(nn.Identity()), [1, 2])
