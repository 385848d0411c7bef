"""Bad arguments to ``nchains paths``: each is refused before any work (exit 2, one line, no
traceback, nothing written), naming the argument and what is accepted."""

from pathlib import Path

import pytest


@pytest.mark.parametrize("argv,needle", [
    (["--sparsity", "1.5"], "--sparsity must be numbers in [0, 1], got 1.5"),
    (["--sparsity", "-0.1"], "--sparsity must be numbers in [0, 1], got -0.1"),
    (["--sparsity", "nan"], "--sparsity must be numbers in [0, 1], got nan"),
    (["--sparsity", "0.9,abc"], "--sparsity must be numbers in [0, 1], got 'abc'"),
    (["--sparsity", ","], "--sparsity must be 1 to 32 comma-separated numbers"),
    (["--sparsity", "0.9,0.9"], "--sparsity must not repeat a value, got 0.9 twice"),
    (["--method", "ablation"], "argument --method: invalid choice: 'ablation'"),
    (["--target", "dog"], "--target must be 'pred' or a class index (an int >= 0), got 'dog'"),
    (["--target", "-1"], "--target must be 'pred' or a class index (an int >= 0), got -1"),
    (["--target", "10"], "target must be 'pred' or a class index in [0, 10), got 10"),
    (["--steps", "0"], "--steps must be an int in [1, 100000], got 0"),
    (["--steps", "x"], "argument --steps: invalid int value"),
    (["--default-index", "1000"], "--default-index must be in [0, 1000)"),
    (["--default-index", "-1"], "--default-index must be in [0, 1000)"),
    (["--default-index", "3", "--classes", "bag"], "--default-index applies to the shipped model"),
    (["--default-index", "3", "--image", "x.png"], "argument --image: not allowed with argument --default-index"),
    (["--image", "missing.png"], "--image 'missing.png' does not exist or is not a file"),
    (["--classes", "bag,sandal"], "paths explains one image; the options select 2"),
    (["--classes", "unicorn"], "unknown class 'unicorn'"),
    (["--per-class", "0"], "--per-class must be >= 1, got 0"),
    (["--size", "32"], "--size applies to --images DIR"),
    (["--model", "torchvision:resnet18"], "--image FILE (or --images DIR) is required"),
    (["--model", "foo"], "--model must be 'default', 'torchvision:NAME' or a"),
    (["--out", "/proc/nchains-test/out"], "cannot"),
])
def test_bad_argument_is_refused_before_work(refused, argv, needle):
    refused(["paths", "--out", "out", *argv], needle)


def test_out_that_is_a_file_or_a_foreign_folder_is_refused(refused, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(["paths", "--out", "file"], "exists and is not a directory")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused(["paths", "--out", "mine"], "no nchains paths.json in it")
    assert (mine / "notes.txt").read_text() == "keep"


def test_missing_out_is_refused(refused):
    refused(["paths"], "the following arguments are required: --out")


def test_undecodable_image_is_refused(refused, tmp_path):
    Path(tmp_path / "bad.png").write_bytes(b"not a png")
    refused(["paths", "--out", "out", "--image", "bad.png"], "cannot read image file")
