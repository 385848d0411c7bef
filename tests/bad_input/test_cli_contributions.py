"""Bad arguments to ``nchains contributions``: each is refused cleanly (exit 2, one line, no
traceback, nothing written), naming the argument and what is accepted."""

import pytest


@pytest.mark.parametrize("argv,needle", [
    (["--method", "gradcam"], "argument --method: invalid choice: 'gradcam'"),
    (["--unit", "pixel"], "argument --unit: invalid choice: 'pixel'"),
    (["--method", "ablation", "--unit", "neuron"], "--unit neuron does not apply to --method ablation"),
    (["--target", "dog"], "--target must be 'pred' or a class index (an int >= 0), got 'dog'"),
    (["--target", "-1"], "--target must be 'pred' or a class index (an int >= 0), got -1"),
    (["--target", "10"], "target must be a class index in [0, 10) (the model has 10 outputs), got 10"),
    (["--steps", "0"], "--steps must be an int in [1, 100000], got 0"),
    (["--steps", "100001"], "--steps must be an int in [1, 100000], got 100001"),
    (["--steps", "1.5"], "argument --steps: invalid int value"),
    (["--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
    (["--top", "0"], "--top must be an int >= 1, got 0"),
    (["--layers", ","], "--layers must be 'activations', 'units' or comma-separated module paths"),
    (["--layers", "layer9.0"], "layers: 'layer9.0' is not a module of the model; valid module paths include"),
    (["--out", "contrib.txt"], "--out must name a .npz file, got 'contrib.txt'"),
    (["--out", "/proc/nchains-test/c.npz"], "cannot"),
    (["--per-class", "0"], "--per-class must be >= 1, got 0"),
    (["--classes", "unicorn"], "unknown class 'unicorn'"),
    (["--size", "32"], "--size applies to --images DIR"),
    (["--model", "torchvision:resnet18"], "--images DIR is required with a --model other than the default"),
    (["--model", "foo"], "--model must be 'default', 'torchvision:NAME' or a"),
    (["--images", "missing"], "--images 'missing' does not exist"),
])
def test_bad_argument_is_refused(refused, argv, needle):
    refused(["contributions", "--out", "c.npz", "--per-class", "1", "--classes", "bag", *argv], needle)


def test_out_that_is_a_folder_is_refused(refused, tmp_path):
    (tmp_path / "c.npz").mkdir()
    refused(["contributions", "--out", "c.npz"], "is a directory")
