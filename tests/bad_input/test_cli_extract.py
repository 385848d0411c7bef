"""Bad arguments to ``nchains extract``: each is refused before any work (exit 2, one line, no
traceback, nothing written), with a message naming the argument and what is accepted."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _flat_folder(root: Path, n: int = 2, name: str = "imgs") -> Path:
    folder = root / name
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("argv,needle", [
    # numbers out of range
    (["--per-class", "0"], "--per-class must be >= 1, got 0"),
    (["--per-class", "-5"], "--per-class must be >= 1, got -5"),
    (["--per-class", "1000"], "--per-class must be between 1 and 100"),
    (["--per-class", "abc"], "argument --per-class: invalid int value"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--confident", "2"], "--confident must be a probability in (0, 1], got 2.0"),
    (["--confident", "nan"], "--confident must be a probability in (0, 1], got nan"),
    (["--confident", "0"], "--confident must be a probability in (0, 1]"),
    (["--confident", "-0.5"], "--confident must be a probability in (0, 1]"),
    (["--confident", "inf"], "--confident must be a probability in (0, 1], got inf"),
    (["--steps", "-1"], "steps"),
    (["--steps", "abc"], "argument --steps: invalid int value"),
    (["--tau", "-1"], "tau"),
    # classes
    (["--classes", "sneaker,unicorn"], "unknown class 'unicorn'"),
    (["--classes", ","], "--classes must be a comma-separated list of class names"),
    (["--classes", ""], "--classes must be a comma-separated list of class names"),
    (["--classes", "sneaker,bag,sneaker"], "--classes must not repeat a class, got sneaker"),
    # options that do not apply to the shipped images
    (["--size", "32"], "--size applies to --images DIR"),
    (["--preprocessing", "none"], "--preprocessing applies to --images DIR"),
    (["--preprocessing", "bogus"], "argument --preprocessing: invalid choice: 'bogus'"),
    # the model
    (["--num-classes", "5"], "--num-classes 5 needs --model torchvision:NAME"),
    (["--model", "torchvision:resnet18", "--num-classes", "-3", "--images", "."],
     "--num-classes must be an integer between 1 and 1000000, got -3"),
    (["--model", "torchvision:resnet18", "--num-classes", "0", "--images", "."],
     "--num-classes must be an integer between 1 and 1000000, got 0"),
    (["--model", "foo"], "--model must be 'default', 'torchvision:NAME' or a"),
    (["--model", "torchvision:nope"], "not a torchvision classification model"),
    (["--model", "missing.pt2"], "--model 'missing.pt2' does not exist or is not a file"),
    (["--weights", "w.pt"], "--weights needs --model torchvision:NAME"),
    (["--model", "torchvision:resnet18"], "--images DIR is required"),
    (["--model", "torchvision:resnet18", "--weights", "missing.pt"], "--weights 'missing.pt' does not exist"),
    # the output
    (["--out", "."], "is a directory; give a file name such as chain.json"),
    (["--out", "/proc/nchains-test/chain.json"], "cannot be written"),
])
def test_bad_argument_is_refused_before_work(refused, argv, needle):
    refused(["extract", *argv], needle)


def test_bogus_command(refused):
    refused(["bogus"], "invalid choice")


@pytest.mark.parametrize("size", ["0", "-1", "100000"])
def test_bad_size_with_images(refused, tmp_path, size):
    folder = _flat_folder(tmp_path)
    refused(["extract", "--images", folder, "--size", size], f"--size must be between 1 and 4096 pixels, got {size}")


def test_confident_does_not_apply_to_a_folder(refused, tmp_path):
    folder = _flat_folder(tmp_path)
    refused(["extract", "--images", folder, "--confident", "0.5"], "--confident applies to the shipped images only")


def test_out_under_a_file(refused, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    r = refused(["extract", "--out", "file/sub/chain.json"], "cannot be written")
    assert "is a file, not a folder" in r.lines[0]


def test_out_is_checked_before_the_model_and_images(refused, tmp_path):
    # a valid folder, a torchvision model to load and a corrupt image in the folder: the output
    # check comes first, so a long run never ends with an unwritable --out
    folder = _flat_folder(tmp_path)
    (folder / "broken.png").write_bytes(b"junk")
    (tmp_path / "file").write_text("x")
    refused(["extract", "--model", "torchvision:resnet18", "--images", folder, "--out", "file/chain.json"],
            "--out 'file/chain.json' cannot be")


def test_debug_shows_the_traceback_instead(tmp_path, monkeypatch):
    from nchains import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--per-class must be >= 1"):
        cli.main(["--debug", "extract", "--per-class", "0"])
