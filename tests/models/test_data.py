"""Tests of nchains.data.load_image_folder on PNG files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nchains.models.images import IMAGENET_MEAN, IMAGENET_STD, load_image_folder

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def _png(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def _rgb(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def test_flat_folder_imagenet_matches_manual_computation(tmp_path):
    a = _png(tmp_path / "a.png", _rgb(0, 256, 256))
    b = _png(tmp_path / "b.png", _rgb(1, 256, 300))
    (tmp_path / "readme.txt").write_text("not an image")
    _png(tmp_path / ".hidden.png", _rgb(2, 8, 8))

    x, labels, classes, files = load_image_folder(tmp_path)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert labels is None and classes is None
    assert [f.name for f in files] == ["a.png", "b.png"]
    # 256 x 256 needs no resize: centre crop starts at (256 - 224) / 2 = 16.
    torch.testing.assert_close(x[0], (_chw(a[16:240, 16:240]) - MEAN) / STD)
    # 256 x 300: shorter side already 256, crop offsets 16 and (300 - 224) / 2 = 38.
    torch.testing.assert_close(x[1], (_chw(b[16:240, 38:262]) - MEAN) / STD)


def test_imagenet_resize_agrees_with_pil_pipeline(tmp_path):
    import torchvision.transforms as T

    img = _png(tmp_path / "big.png", _rgb(3, 300, 400))
    x, _, _, _ = load_image_folder(tmp_path)
    reference = T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )(Image.fromarray(img))
    assert x.shape == (1, 3, 224, 224)
    # Tensor and PIL antialiased resizes differ by at most a grey level or so.
    assert (x[0] - reference).abs().mean() < 0.01
    assert (x[0] - reference).abs().max() < 0.05


def test_class_subfolders_give_sorted_labels(tmp_path):
    pixels = {}
    for cls, names in {"dog": ["2.png", "1.png"], "cat": ["z.png"], "emu": ["a.png"]}.items():
        for i, name in enumerate(names):
            pixels[(cls, name)] = _png(tmp_path / cls / name, _rgb(len(pixels), 20, 20))
    (tmp_path / "empty").mkdir()  # no images: not a class
    (tmp_path / "dog" / "notes.md").write_text("ignored")

    x, labels, classes, files = load_image_folder(tmp_path, size=20, preprocessing="none")
    assert classes == ["cat", "dog", "emu"]
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 1, 2]
    assert [(f.parent.name, f.name) for f in files] == [
        ("cat", "z.png"), ("dog", "1.png"), ("dog", "2.png"), ("emu", "a.png")]
    for i, f in enumerate(files):
        torch.testing.assert_close(x[i], _chw(pixels[(f.parent.name, f.name)]))


def test_grayscale_and_resize_without_normalisation(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    _png(tmp_path / "g.png", gray)
    x, _, _, _ = load_image_folder(tmp_path, size=8, preprocessing="none", grayscale=True)
    assert x.shape == (1, 1, 8, 8)
    torch.testing.assert_close(x[0, 0], torch.from_numpy(gray).float() / 255)

    x, _, _, _ = load_image_folder(tmp_path, size=4, preprocessing="none", grayscale=True)
    assert x.shape == (1, 1, 4, 4) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    x, _, _, _ = load_image_folder(tmp_path, size=4, preprocessing="none")
    assert x.shape == (1, 3, 4, 4)  # greyscale file, RGB output: 3 equal channels
    torch.testing.assert_close(x[:, 0], x[:, 2])


def test_grayscale_imagenet_uses_luminance_statistics(tmp_path):
    gray = np.full((256, 256), 200, dtype=np.uint8)
    _png(tmp_path / "g.png", gray)
    x, _, _, _ = load_image_folder(tmp_path, grayscale=True)
    w = torch.tensor([0.299, 0.587, 0.114])
    mean, std = float(w @ torch.tensor(IMAGENET_MEAN)), float(w @ torch.tensor(IMAGENET_STD))
    assert x.shape == (1, 1, 224, 224)
    torch.testing.assert_close(x, torch.full_like(x, (200 / 255 - mean) / std))


def test_bad_paths_raise_value_error_naming_path(tmp_path):
    with pytest.raises(ValueError, match="path .*does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"not really a png")
    with pytest.raises(ValueError, match="path .*not a directory"):
        load_image_folder(tmp_path / "file.png")
    with pytest.raises(ValueError, match="path: cannot read image file .*file.png"):
        load_image_folder(tmp_path)

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="path .*no images"):
        load_image_folder(empty)

    mixed = tmp_path / "mixed"
    _png(mixed / "a.png", _rgb(0, 4, 4))
    _png(mixed / "cls" / "b.png", _rgb(1, 4, 4))
    with pytest.raises(ValueError, match="mixes"):
        load_image_folder(mixed)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"size": 0}, ValueError, "size"),
        ({"size": 2.5}, TypeError, "size"),
        ({"preprocessing": "torch"}, ValueError, "preprocessing"),
        ({"grayscale": 1}, TypeError, "grayscale"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, exc, word):
    _png(tmp_path / "a.png", _rgb(0, 4, 4))
    with pytest.raises(exc, match=word):
        load_image_folder(tmp_path, **kwargs)
