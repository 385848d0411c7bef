"""Bad image folders and bad ``--weights`` files: refused with one line that says what is wrong
(never torch's advice to load with ``weights_only=False``), before any extraction."""

import collections
import fractions
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

_TV = ["--model", "torchvision:resnet18"]


def _png(path: Path, value: int = 100, size=(28, 28)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)


@pytest.fixture
def images(tmp_path):
    """A valid flat folder of two small images."""
    for i in range(2):
        _png(tmp_path / "imgs" / f"{i}.png", 50 * i)
    return tmp_path / "imgs"


# ---- image folders ---------------------------------------------------------------------------

def test_missing_folder(refused):
    refused(["extract", "--images", "nowhere"], "--images 'nowhere' does not exist")


def test_empty_folder(refused, tmp_path):
    (tmp_path / "empty").mkdir()
    refused(["extract", "--images", "empty"], "contains no images")


def test_folder_of_empty_class_folders(refused, tmp_path):
    (tmp_path / "d" / "cats").mkdir(parents=True)
    (tmp_path / "d" / "dogs" / "notes.txt").parent.mkdir()
    (tmp_path / "d" / "dogs" / "notes.txt").write_text("no images here")
    refused(["extract", "--images", "d"], "contains no images")


def test_images_is_a_file(refused, tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    refused(["extract", "--images", "x.png"], "--images 'x.png' is not a folder")


@pytest.mark.parametrize("content", [b"", b"not a png at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_image(refused, tmp_path, images, content):
    (images / "broken.png").write_bytes(content)
    r = refused(["extract", "--images", images], "cannot read image file")
    assert "broken.png" in r.lines[0]


def test_truncated_image(refused, tmp_path, images):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(images / "t.png")
    data = (images / "t.png").read_bytes()
    (images / "t.png").write_bytes(data[: len(data) // 2])
    refused(["extract", "--images", images], "t.png")


def test_decompression_bomb(refused, tmp_path, images, monkeypatch):
    # PIL refuses images over 2 * MAX_IMAGE_PIXELS with DecompressionBombError (not an OSError):
    # a small limit makes a 64x64 image a "bomb" without writing a huge file
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _png(images / "bomb.png", size=(64, 64))
    r = refused(["extract", "--images", images], "too large to decode safely")
    assert "bomb.png" in r.lines[0]


def test_mixed_images_and_class_folders(refused, tmp_path, images):
    _png(images / "cats" / "0.png")
    refused(["extract", "--images", images], "mixes image files")


def test_classes_with_a_flat_folder(refused, images):
    refused(["extract", "--images", images, "--classes", "cats"], "--classes needs --images DIR with one sub-folder")


def test_unknown_and_repeated_sub_folder_classes(refused, tmp_path):
    for c in ("cats", "dogs"):
        _png(tmp_path / "d" / c / "0.png")
    refused(["extract", "--images", "d", "--classes", "cats,owls"], "--classes ['owls'] not found among the sub")
    refused(["extract", "--images", "d", "--classes", "cats,cats"], "--classes must not repeat a class")


# ---- weights files ---------------------------------------------------------------------------

def _weights(refused, path, needle, images):
    r = refused(["extract", *_TV, "--weights", path, "--images", images], needle)
    assert "weights_only" not in r.lines[0] and "\x1b" not in r.lines[0], r.lines[0]
    return r


def test_random_bytes(refused, tmp_path, images):
    (tmp_path / "w.pt").write_bytes(np.random.default_rng(0).bytes(4000))
    _weights(refused, "w.pt", "w.pt' cannot be loaded safely: it is not a PyTorch checkpoint (Unsupported operand", images)


def test_blocked_global_is_named(refused, tmp_path, images):
    torch.save({"fc.weight": torch.zeros(2, 2), "note": fractions.Fraction(1, 3)}, tmp_path / "w.pt")
    r = _weights(refused, "w.pt", "it needs the Python object fractions.Fraction", images)
    assert "never unpickles" in r.lines[0]


def test_code_in_a_pickle_never_runs(refused, tmp_path, images):
    (tmp_path / "w.pt").write_bytes(pickle.dumps(os.system, protocol=2))
    _weights(refused, "w.pt", "it needs the Python object posix.system", images)


def test_empty_weights(refused, tmp_path, images):
    (tmp_path / "w.pt").write_bytes(b"")
    _weights(refused, "w.pt", "is empty or truncated", images)


def test_corrupt_zip_weights(refused, tmp_path, images):
    (tmp_path / "w.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    r = _weights(refused, "w.pt", "is not a readable checkpoint", images)
    assert "internal miniz error" not in r.lines[0]


def test_corrupt_safetensors(refused, tmp_path, images):
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    _weights(refused, "w.safetensors", "is not a readable checkpoint", images)


def test_not_a_state_dict(refused, tmp_path, images):
    torch.save([torch.zeros(3)], tmp_path / "w.pt")
    _weights(refused, "w.pt", "holds a list, not a state_dict", images)


def test_other_architecture_names_keys_and_counts(refused, tmp_path, images):
    torch.save(torchvision.models.resnet34(num_classes=4).state_dict(), tmp_path / "w.pt")
    own = torchvision.models.resnet18(num_classes=4).state_dict()
    other = torch.load(tmp_path / "w.pt", weights_only=True)
    unexpected = [k for k in other if k not in own]
    r = _weights(refused, "w.pt", "--weights does not fit torchvision:resnet18:", images)
    assert f"{len(unexpected)} unexpected keys ({unexpected[0]}" in r.lines[0]
    assert "missing" not in r.lines[0]  # resnet34 has every key of resnet18


def test_size_mismatch_is_named(refused, tmp_path, images):
    state = torchvision.models.resnet18(num_classes=4).state_dict()
    torch.save(state, tmp_path / "w.pt")
    r = refused(["extract", *_TV, "--weights", "w.pt", "--images", images, "--num-classes", "7"],
                "2 size mismatches (fc.weight (file [4, 512], model [7, 512]), fc.bias (file [4], model [7]))")
    assert "missing" not in r.lines[0] and "unexpected" not in r.lines[0]


def test_missing_keys_are_counted(refused, tmp_path, images):
    state = collections.OrderedDict(torchvision.models.resnet18(num_classes=4).state_dict())
    dropped = [k for k in state if k.startswith("layer4.")]
    for k in dropped:
        del state[k]
    torch.save(state, tmp_path / "w.pt")
    total = len(torchvision.models.resnet18(num_classes=4).state_dict())
    _weights(refused, "w.pt", f"{len(dropped)} of the model's {total} keys missing ({dropped[0]}", images)


# ---- export of a chain with bad options --------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["export", "missing.json", "--out", "o"], "path 'missing.json' does not exist"),
    (["export", "c.json", "--out", "o", "--formats", "zip"], "--formats: formats: unknown format 'zip'"),
    (["export", "c.json", "--out", "o", "--size", "0", "--images", "."], "--size must be between 1 and 4096"),
    (["export", "c.json", "--out", "o", "--size", "32"], "--size/--preprocessing apply to --images DIR"),
    (["export", "c.json", "--out", "file/o"], "--out 'file/o' cannot be created: "),
    (["export", "c.json", "--out", "file"], "--out 'file' exists and is not a folder"),
])
def test_export_bad_options(refused, tmp_path, argv, needle):
    (tmp_path / "file").write_text("x")
    (tmp_path / "c.json").write_text("{}")
    refused(argv, needle)
