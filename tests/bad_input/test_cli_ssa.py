"""Bad arguments to ``nchains ssa``: each is refused (exit 2, one line, no traceback, nothing
written), numbers and the output folder before the model is loaded, with a message naming the
argument and what is accepted; and the Python API's argument checks."""

import json

import pytest
import torch
from test_cli_extract import _flat_folder

import nchains


@pytest.mark.parametrize("argv,needle", [
    (["--branching", "0"], "--branching must be between 1 and 1000000, got 0"),
    (["--branching", "-2"], "--branching must be between 1 and 1000000, got -2"),
    (["--branching", "2.5"], "argument --branching: invalid int value"),
    (["--chunk", "0"], "--chunk must be >= 1, got 0"),
    (["--per-class", "0"], "--per-class must be >= 1, got 0"),
    (["--per-class", "1000"], "--per-class must be between 1 and 100"),
    (["--response", "median"], "argument --response: invalid choice: 'median'"),
    (["--weighting", "tfidf"], "argument --weighting: invalid choice"),
    (["--engine", "neato"], "argument --engine: invalid choice"),
    (["--classes", "sneaker,unicorn"], "unknown class 'unicorn'"),
    (["--classes", "sneaker,bag,sneaker"], "--classes must not repeat a class, got sneaker"),
    (["--size", "32"], "--size applies to --images DIR"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--model", "torchvision:resnet18"], "--images DIR is required"),
    (["--out", "/proc/nchains-test/ssa"], "--out '/proc/nchains-test/ssa'"),
    (["--out", "."], "is the current folder"),
])
def test_bad_argument_is_refused(refused, argv, needle):
    refused(["ssa", "--per-class", "2", *argv], needle)


def test_output_that_is_a_file_or_a_foreign_folder(refused, tmp_path):
    (tmp_path / "taken").write_text("x")
    refused(["ssa", "--out", "taken"], "exists and is not a directory")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused(["ssa", "--out", "mine"], "(no nchains summary.json in it; it holds 'notes.txt')")
    (mine / "summary.json").write_text(json.dumps({"format": "something-else"}))
    refused(["ssa", "--out", "mine"], "(its summary.json is not an nchains ssa index; it holds 'notes.txt')")
    assert (mine / "notes.txt").read_text() == "keep me"


def test_engine_dot_without_graphviz(refused, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    refused(["ssa", "--engine", "dot"], "--engine dot needs graphviz's dot on PATH")


def test_flat_image_folder_has_no_classes(refused, tmp_path):
    _flat_folder(tmp_path)
    refused(["ssa", "--images", "imgs", "--quiet"], "is a flat folder; nchains ssa needs one sub-folder per class")


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"target": 3}, ValueError, "target must be in [0, 2], got 3"),
    ({"target": -1}, ValueError, "target must be in [0, 2], got -1"),
    ({"target": 1.0}, TypeError, "target must be an int"),
    ({"target": True}, TypeError, "target must be an int"),
    ({"branching": 0}, ValueError, "branching must be in [1, 1000000], got 0"),
    ({"chunk": 0}, ValueError, "chunk must be in"),
    ({"response": "median"}, ValueError, "response must be one of 'mean', 'max'"),
    ({"class_name": ""}, TypeError, "class_name must be a non-empty string"),
    ({"graph": "g"}, TypeError, "graph must be a ModelGraph"),
])
def test_python_api_checks(kwargs, error, needle):
    args = {"target": 1, **kwargs}
    with pytest.raises(error) as info:
        nchains.ssa(_Tiny().eval(), torch.randn(3, 1, 6, 6), **args)
    assert needle in str(info.value)


def test_python_api_checks_images():
    model = _Tiny().eval()
    bad = torch.randn(3, 1, 6, 6)
    bad[1, 0, 2, 2] = float("nan")
    for images, needle in ((bad, "non-finite"), (torch.zeros(3, 6, 6), "[N, C, H, W]"),
                           (torch.zeros(2, 1, 6, 6, dtype=torch.long), "floating-point"), ("x", "Tensor")):
        with pytest.raises((ValueError, TypeError)) as info:
            nchains.ssa(model, images, target=0)
        assert needle in str(info.value)
    with pytest.raises(ValueError, match=r"model must be in eval mode \(call model.eval\(\)\); '_Tiny'"):
        nchains.ssa(_Tiny().train(), torch.randn(2, 1, 6, 6), target=0)
    other = nchains.analyze(_Tiny(), torch.zeros(1, 1, 6, 6))
    with pytest.raises(ValueError, match="not analysed from this model"):
        nchains.ssa(model, torch.randn(2, 1, 6, 6), target=0, graph=other)
