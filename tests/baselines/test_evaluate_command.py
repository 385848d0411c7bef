"""``nchains evaluate-paths`` end to end on the shipped model (2 images, short schedules):
results.json against computations from the written path files, and the PNGs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from nchains import cli
from nchains.critical_paths import CriticalPath
from nchains.models import zoo

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = "intgrad,mct,greedy,dgr1,input-mct"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ev") / "evaluation"
    argv = ["evaluate-paths", "--classes", "sneaker,trouser", "--per-class", "1", "--methods", METHODS,
            "--sparsity", "0.5,0.9", "--steps", "2", "--dgr-steps", "3", "--greedy-step", "0.05",
            "--sanity-images", "2", "--sanity-methods", "mct,gradient", "--lerf-absolute", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def _original_activations(model, image):
    """ReLU outputs per call, keyed like nchains' sites (module path, ``@k`` for later calls), via hooks."""
    acts, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ReLU):
            def hook(_m, _i, out, name=name):
                calls = sum(1 for k in acts if k == name or k.startswith(name + "@"))
                acts[name if calls == 0 else f"{name}@{calls}"] = out[0].detach().clone()
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(image)
    for h in handles:
        h.remove()
    return acts


def _load(out, name):
    return CriticalPath.load(os.path.join(out, name), zoo.default_model())


def test_files_are_what_results_json_lists(run):
    out, doc = run
    assert doc["format"] == "nchains-evaluate-paths" and doc["images"]["count"] == 2
    assert sorted(os.listdir(out)) == sorted(["results.json", *doc["files"]])
    paths = [f for f in doc["files"] if f.endswith(".npz")]
    assert len(paths) == 4 * 2 * 2  # path methods x sparsities x images
    for png in ("dead_neurons.png", "jaccard_0_5.png", "jaccard_0_9.png", "lerf.png", "sanity.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def test_dead_neuron_prevalence_from_the_path_files(run):
    out, doc = run
    model = zoo.default_model()
    for method, label in (("greedy", "GreedyPruning"), ("mct", "NeuronMCT"), ("dgr1", "DGR(init=1)")):
        fractions = []
        for i in range(2):
            path = _load(out, f"path_{method}_0_9_{i:04d}.npz")
            acts = _original_activations(model, path.image)
            assert set(acts) == set(path.mask)
            dead = sum(int(((acts[k] == 0) & m).sum()) for k, m in path.mask.items())
            fractions.append(dead / path.n_kept)
        assert doc["dead_neurons"][f"{label} 90%"]["fraction"] == pytest.approx(np.mean(fractions), abs=1e-12)
    assert doc["dead_neurons"]["NeuronMCT 90%"]["fraction"] == 0.0  # Remark 2
    assert doc["dead_neurons"]["GreedyPruning 90%"]["fraction"] > 0.0  # the paper's pathology


def test_jaccard_from_the_path_files(run):
    out, doc = run
    j = doc["jaccard"]["0.5"]
    names = j["names"]
    assert names == ["NeuronIntGrad", "NeuronMCT", "GreedyPruning", "DGR(init=1)"]
    values = []
    for i in range(2):
        a, b = _load(out, f"path_intgrad_0_5_{i:04d}.npz"), _load(out, f"path_greedy_0_5_{i:04d}.npz")
        fa = torch.cat([m.flatten() for m in a.mask.values()])
        fb = torch.cat([b.mask[k].flatten() for k in a.mask])
        values.append(int((fa & fb).sum()) / int((fa | fb).sum()))
    assert j["matrix"][0][2] == pytest.approx(np.mean(values), abs=1e-12)
    m = np.array(j["matrix"])
    assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1.0)
    assert set(j["per_layer"]) == set(doc["site_labels"])


def test_greedy_reports_the_sparsity_it_reached(run):
    out, doc = run
    reached = doc["reached"]["greedy"]["0.9"]
    for i, r in enumerate(reached):
        path = _load(out, f"path_greedy_0_9_{i:04d}.npz")
        assert path.sparsity == pytest.approx(r, abs=1e-12)
    assert all(r == pytest.approx(0.9, abs=1e-4) for r in doc["reached"]["mct"]["0.9"])


def test_lerf_and_sanity_entries(run):
    _, doc = run
    expected = {f"{n} {s}" for n in ("NeuronIntGrad", "NeuronMCT", "GreedyPruning", "DGR(init=1)")
                for s in ("50%", "90%")} | {"InputMCT", "Gradient", "Random"}
    assert set(doc["lerf"]) == expected
    for name, r in doc["lerf"].items():
        f, mean = np.array(r["fractions"]), np.array(r["change"]["mean"])
        assert r["change"]["auc"] == pytest.approx(float(np.trapezoid(mean, f)), rel=1e-9), name
        assert mean[0] == pytest.approx(0.0, abs=1e-6)  # nothing removed: no change
        assert len(r["change"]["auc_per_image"]) == 2
        assert r["absolute"] is True and r["order"] == "lerf"  # --lerf-absolute
    assert set(doc["sanity"]) == {"NeuronMCT 50%", "Gradient"}  # path methods at the first sparsity
    assert len(doc["sanity"]["Gradient"]["spearman"]) == len(doc["sanity"]["Gradient"]["layers"]) > 5


def test_table_jaccard_lines(run):
    from nchains.cli.evaluate_paths import table

    _, doc = run
    text = table(doc)
    mct = doc["jaccard"]["0.5"]["matrix"][0][1]
    assert f"Jaccard with NeuronIntGrad at sparsity 0.5: NeuronMCT {mct:.3f}, GreedyPruning" in text
    alone = dict(doc, jaccard={"0.5": {"names": ["GreedyPruning"], "matrix": [[1.0]]}})
    assert "Jaccard" not in table(alone)  # one path method: no overlap line, not an empty one
