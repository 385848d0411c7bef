"""Tests of nchains.zoo: the shipped Fashion-MNIST model, sample and idx reader."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from nchains.models import zoo

DATASET = Path(zoo.FASHION_MNIST_ROOT)
needs_dataset = pytest.mark.skipif(
    not (DATASET / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST idx files not installed (Debian package dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return zoo.default_model()


@pytest.fixture(scope="module")
def sample_probs(model) -> torch.Tensor:
    images, _, _ = zoo.fashion_sample()
    with torch.no_grad():
        return torch.softmax(model(zoo.normalize_fashion(images).unsqueeze(1)), dim=1)


# --------------------------------------------------------------------------- architecture


def test_fashion_resnet_uses_torchvision_names_and_blocks():
    net = zoo.fashion_resnet()
    names = dict(net.named_modules())
    for name in ["conv1", "bn1", "relu", "layer1", "layer4", "avgpool", "fc",
                 "layer1.0.conv1", "layer1.1.conv2", "layer2.0.downsample.0",
                 "layer2.0.downsample.1", "layer4.1.bn2"]:
        assert name in names, name
    assert "maxpool" not in names
    assert names["layer1.0"].downsample is None and names["layer2.1"].downsample is None
    for stage, width in zip(range(1, 5), (16, 32, 64, 128)):
        layer = getattr(net, f"layer{stage}")
        assert isinstance(layer, nn.Sequential) and len(layer) == 2
        assert all(isinstance(b, BasicBlock) for b in layer)
        assert layer[1].conv2.out_channels == width
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == 1 and net.fc.out_features == 10


def test_fashion_resnet_forward_shapes_and_traces():
    net = zoo.fashion_resnet(num_classes=7).eval()
    x = torch.randn(3, 1, 28, 28)
    assert net(x).shape == (3, 7)
    traced = torch.fx.symbolic_trace(net)
    torch.testing.assert_close(traced(x), net(x))


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_fashion_resnet_rejects_bad_num_classes(bad, exc):
    with pytest.raises(exc, match="num_classes"):
        zoo.fashion_resnet(bad)


# --------------------------------------------------------------------------- shipped model


def test_default_model_is_fresh_float32_eval_module(model):
    other = zoo.default_model()
    assert other is not model and not other.training
    assert all(p.dtype == torch.float32 for p in other.parameters())
    with torch.no_grad():
        other.fc.weight.zero_()
    assert zoo.default_model().fc.weight.abs().sum() > 0  # callers cannot corrupt the cache


def test_default_model_accuracy_on_shipped_sample(sample_probs):
    images, labels, indices = zoo.fashion_sample()
    assert images.shape == (1000, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 100))
    assert len(torch.unique(indices)) == 1000
    assert 0 <= int(indices.min()) and int(indices.max()) < 10000
    assert sample_probs.shape == (1000, 10)
    accuracy = (sample_probs.argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9, accuracy


def test_default_model_info_matches_module():
    info = zoo.default_model_info()
    assert info["classes"] == zoo.default_class_names() == list(zoo.FASHION_CLASSES)
    assert info["class_names"] == list(zoo.FASHION_CLASS_NAMES)
    assert (info["mean"], info["std"]) == (zoo.FASHION_MEAN, zoo.FASHION_STD)
    assert info["test_accuracy"] >= 0.9 and isinstance(info["seed"], int)
    assert "train_default.py" in info["command"]
    json.dumps(info)


@needs_dataset
def test_shipped_sample_matches_the_test_split():
    test_x, test_y = zoo.load_fashion_mnist("test")
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    images, labels, indices = zoo.fashion_sample()
    assert torch.equal(test_x[indices], images)
    assert torch.equal(test_y[indices], labels)


# --------------------------------------------------------------------------- default_images


def test_default_images_shapes_labels_and_normalisation():
    x, y, idx = zoo.default_images(["sandal", 8, "Ankle boot"], per_class=4, seed=3, confident=None)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [5] * 4 + [8] * 4 + [9] * 4
    images, labels, indices = zoo.fashion_sample()
    rows = [int(torch.nonzero(indices == i)) for i in idx]
    manual = (images[rows].float().unsqueeze(1) / 255 - zoo.FASHION_MEAN) / zoo.FASHION_STD
    torch.testing.assert_close(x, manual)
    assert torch.equal(labels[rows], y)


def test_default_images_accepts_tensors_and_iterables():
    _, y, _ = zoo.default_images(torch.tensor([5, 8]), per_class=2, confident=None)
    assert y.tolist() == [5, 5, 8, 8]
    _, y, _ = zoo.default_images(torch.tensor(3), per_class=1, confident=None)
    assert y.tolist() == [3]
    _, y, _ = zoo.default_images((c for c in ("bag", "coat")), per_class=1, confident=None)
    assert y.tolist() == [8, 4]


def test_default_images_deterministic_per_seed():
    a = zoo.default_images(per_class=5, seed=0, confident=None)
    b = zoo.default_images(per_class=5, seed=0, confident=None)
    c = zoo.default_images(per_class=5, seed=1, confident=None)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(a[1], c[1])  # same classes...
    assert not torch.equal(a[2], c[2])  # ...different images
    for k in range(10):  # and differently for every class, not only some
        assert set(a[2][a[1] == k].tolist()) != set(c[2][c[1] == k].tolist())


def test_default_images_picks_do_not_depend_on_other_classes_and_nest():
    _, y_all, idx_all = zoo.default_images(per_class=6, seed=7, confident=None)
    _, _, idx_one = zoo.default_images("coat", per_class=6, seed=7, confident=None)
    assert torch.equal(idx_one, idx_all[y_all == 4])
    _, _, idx_small = zoo.default_images("coat", per_class=3, seed=7, confident=None)
    assert torch.equal(idx_small, idx_one[:3])


def test_confident_filter_keeps_only_confident_images(model, sample_probs):
    x, y, _ = zoo.default_images(per_class=10, seed=0, confident=0.95)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    assert (p[torch.arange(len(y)), y] >= 0.95).all()
    # The filter must matter: the sample holds images below the threshold.
    _, labels, _ = zoo.fashion_sample()
    true_prob = sample_probs[torch.arange(len(labels)), labels]
    assert (true_prob < 0.95).any()
    shirt = 6
    n_confident = int((true_prob[labels == shirt] >= 0.95).sum())
    assert n_confident < 100
    zoo.default_images("shirt", per_class=n_confident, confident=0.95)
    with pytest.raises(ValueError, match="per_class"):
        zoo.default_images("shirt", per_class=n_confident + 1, confident=0.95)


class _Uniform(nn.Module):
    """Predicts every class with probability 0.1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.zeros(len(x), 10) + self.w


def test_confident_filter_uses_the_given_model_and_restores_its_mode():
    m = _Uniform().train()
    x, _, _ = zoo.default_images("bag", per_class=3, confident=0.1, model=m)
    assert x.shape == (3, 1, 28, 28) and m.training
    with pytest.raises(ValueError, match="per_class"):
        zoo.default_images("bag", per_class=3, confident=0.2, model=m)


def test_unknown_class_lists_accepted_names():
    with pytest.raises(ValueError, match="classes") as e:
        zoo.default_images(["bag", "hat"])
    assert "hat" in str(e.value) and "ankle-boot" in str(e.value) and "t-shirt" in str(e.value)
    with pytest.raises(ValueError, match="classes"):
        zoo.default_images(10)
    with pytest.raises(ValueError, match="classes"):
        zoo.default_images([True])


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"per_class": 101, "confident": None}, ValueError, "per_class"),
        ({"per_class": 0}, ValueError, "per_class"),
        ({"per_class": 2.0}, TypeError, "per_class"),
        ({"seed": -1}, ValueError, "seed"),
        ({"confident": 1.5}, ValueError, "confident"),
        ({"confident": "high"}, TypeError, "confident"),
        ({"classes": []}, ValueError, "classes"),
        ({"classes": ["bag", 8]}, ValueError, "classes"),
        ({"classes": 3.5}, TypeError, "classes"),
    ],
)
def test_default_images_rejects_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        zoo.default_images(**kwargs)


# --------------------------------------------------------------------------- idx files


def _write_idx(path: Path, array: np.ndarray, type_byte: int, compress: bool) -> None:
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    _write_idx(tmp_path / "img", images, 0x08, compress)
    out = zoo.read_idx(tmp_path / "img")
    assert out.dtype == np.uint8 and np.array_equal(out, images)
    ints = np.array([-5, 0, 70000], dtype=np.int32)
    _write_idx(tmp_path / "ints", ints, 0x0C, compress)
    out = zoo.read_idx(str(tmp_path / "ints"))
    assert out.dtype == np.int32 and out.tolist() == [-5, 0, 70000]


def test_read_idx_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        zoo.read_idx(tmp_path / "missing")
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(ValueError, match="magic"):
        zoo.read_idx(tmp_path / "junk")
    arr = np.zeros((2, 3), dtype=np.uint8)
    _write_idx(tmp_path / "short", arr, 0x08, False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="short"):
        zoo.read_idx(tmp_path / "short")


def test_load_fashion_mnist_from_a_custom_root(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 9], dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, 0x08, True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 0x08, False)  # plain file too
    x, y = zoo.load_fashion_mnist("train", root=tmp_path)
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images))
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()


def test_load_fashion_mnist_errors_name_path_and_package(tmp_path):
    with pytest.raises(ValueError) as e:
        zoo.load_fashion_mnist("test", root=tmp_path)
    assert str(tmp_path) in str(e.value) and "dataset-fashion-mnist" in str(e.value)
    with pytest.raises(ValueError, match="split"):
        zoo.load_fashion_mnist("validation", root=tmp_path)


def test_normalize_fashion():
    x = torch.tensor([[0, 255], [73, 128]], dtype=torch.uint8)
    expected = (x.double() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(zoo.normalize_fashion(x), expected.float())
    with pytest.raises(TypeError, match="images"):
        zoo.normalize_fashion(x.float())
    with pytest.raises(TypeError, match="images"):
        zoo.normalize_fashion(np.zeros((2, 2), dtype=np.uint8))
