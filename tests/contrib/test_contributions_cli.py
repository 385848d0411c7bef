"""``nchains contributions``: the .npz holds what nchains.contributions computes; --json its top channels."""

import json

import numpy as np
import pytest
import torch

from nchains import cli
from nchains.contrib import contributions
from nchains.models import zoo

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--classes", "bag,sneaker", "--per-class", "1"]


def _images():
    x, _, _ = zoo.default_images(["bag", "sneaker"], per_class=1)
    return x


def test_taylor_npz_and_json(tmp_path, capsys):
    out = tmp_path / "sub" / "c.npz"
    assert cli.main(["contributions", *ARGS, "--out", str(out), "--json", "--top", "3"]) == 0
    info = json.loads(capsys.readouterr().out)
    c = contributions(zoo.default_model(), _images())
    data = np.load(out)
    assert set(data.files) == {*c, "target", "logits"}
    for key, value in c.items():
        np.testing.assert_allclose(data[key], value.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(data["target"], c.target.numpy())
    assert [s["key"] for s in info["sites"]] == list(c)
    site = info["sites"][-1]
    mean = torch.as_tensor(data[site["key"]]).double().mean(0)
    assert [t["index"] for t in site["top"]] == mean.argsort(descending=True)[:3].tolist()
    assert site["top"][0]["label"] == f"{site['label']}_{site['top'][0]['index']}"
    assert info["target_names"] == [zoo.default_class_names()[t] for t in info["target"]]


def test_intgrad_writes_deltas_and_neurons(tmp_path, capsys):
    out = tmp_path / "ig.npz"
    argv = ["contributions", *ARGS, "--out", str(out), "--method", "intgrad", "--steps", "4",
            "--layers", "layer4.1.relu", "--unit", "neuron", "--target", "3", "--quiet"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == ""
    c = contributions(zoo.default_model(), _images(), method="intgrad", steps=4, layers=["layer4.1.relu"],
                      unit="neuron", target=3)
    data = np.load(out)
    assert set(data.files) == {"layer4.1.relu", "layer4.1.relu@1", "delta__layer4.1.relu",
                               "delta__layer4.1.relu@1", "target", "logits"}
    np.testing.assert_allclose(data["layer4.1.relu@1"], c["layer4.1.relu@1"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data["delta__layer4.1.relu"], c.delta["layer4.1.relu"].numpy(), rtol=1e-5, atol=1e-6)
    assert data["target"].tolist() == [3, 3]
