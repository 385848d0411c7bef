"""Region lists and the results log without Ray: pairs, YAML specs, the resumable JSONL (a
partial last line), the summary's medians and a task's process-state restore."""

from __future__ import annotations

import itertools
import json
import random
import statistics

import numpy as np
import pytest
import torch

from nchains.distributed.batch import region_key
from nchains.distributed.regions import load_region_spec, pair_regions, region_dir_name
from nchains.distributed.results import ResultsLog, summarize
from nchains.distributed.worker import process_state


def test_pairs_are_a_fixed_prefix_of_all_pairs():
    from nchains.models import zoo

    every = list(itertools.combinations(zoo.default_class_names(), 2))
    random.Random(0).shuffle(every)
    eight = pair_regions(8)
    assert [tuple(r["classes"]) for r in eight] == every[:8]
    assert pair_regions(3) == eight[:3]
    two_seeds = pair_regions(2, seeds=2, per_class=4, confident=None)
    assert [(r["classes"], r["seed"]) for r in two_seeds] == [
        (list(p), s) for p in every[:2] for s in range(2)]
    assert all(r["images"] == {"kind": "default", "classes": r["classes"], "per_class": 4, "seed": r["seed"],
                               "confident": None} for r in two_seeds)
    assert len({r["id"] for r in pair_regions(45, seeds=2)}) == 90


def test_spec_entries(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "dog").mkdir()
    (tmp_path / "regions.yaml").write_text(
        "regions:\n"
        "  - classes: [sneaker, ankle-boot]\n    seeds: 2\n    per_class: 3\n"
        "  - name: pets\n    model: torchvision:resnet18\n    images: data\n    classes: [cat, dog]\n"
        "    preprocessing: none\n    seed: 7\n")
    regions = load_region_spec(str(tmp_path / "regions.yaml"))
    assert [r["id"] for r in regions] == ["sneaker+ankle-boot@seed0", "sneaker+ankle-boot@seed1", "pets@seed7"]
    assert regions[1]["images"]["seed"] == 1 and regions[1]["images"]["per_class"] == 3
    pets = regions[2]
    assert pets["model"] == {"kind": "torchvision", "name": "resnet18", "weights": None}
    assert pets["images"] == {"kind": "folder", "path": str(tmp_path / "data"), "size": None,
                              "preprocessing": "none", "classes": ["cat", "dog"], "per_class": 10}


def test_keys_and_dir_names():
    a, b = pair_regions(2)
    cfg = {"steps": 4}
    assert region_key(a, cfg, False) == region_key(json.loads(json.dumps(a)), cfg, False)
    assert len({region_key(a, cfg, False), region_key(b, cfg, False), region_key(a, {"steps": 5}, False),
                region_key(a, cfg, True)}) == 4
    assert region_dir_name("a/b c@seed0") == "a_b_c@seed0" and region_dir_name("..") == "region"


def test_results_log_drops_a_partial_last_line(tmp_path):
    log = ResultsLog(str(tmp_path))
    rows = [{"key": f"k{i}", "status": "ok", "v": i} for i in range(3)]
    for r in rows:
        log.append(r)
    with open(log.path, "ab") as f:
        f.write(b'{"key": "k3", "sta')  # a run killed in the middle of a write
    again = ResultsLog(str(tmp_path))
    assert again.rows() == rows and again.dropped == 1
    with open(log.path, "rb") as f:
        assert f.read() == b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    again.append({"key": "k3", "status": "failed"})
    assert [r["key"] for r in ResultsLog(str(tmp_path)).rows()] == ["k0", "k1", "k2", "k3"]


def test_summary_counts_the_latest_row_per_key():
    rows = [{"key": "a", "region": "A", "status": "failed", "error": "x"},
            {"key": "a", "region": "A", "status": "ok", "filters_kept": 10, "filters_total": 100, "prob_drop": 0.1,
             "kl": 0.2, "agreement": 1.0, "layers_kept": 3, "layers_total": 5, "seconds": 1.0},
            {"key": "b", "region": "B", "status": "ok", "filters_kept": 30, "filters_total": 100, "prob_drop": 0.3,
             "kl": 0.1, "agreement": 0.5, "layers_kept": 4, "layers_total": 5, "seconds": 2.0},
            {"key": "c", "region": "C", "status": "failed", "error": "ValueError: no"}]
    s = summarize(rows)
    assert (s["regions"], s["ok"], s["failed"]) == (3, 2, 1)
    assert s["failed_regions"] == {"C": "ValueError: no"}
    assert s["medians"]["prob_drop"] == pytest.approx(statistics.median([0.1, 0.3]))
    assert s["medians"]["kept_fraction"] == pytest.approx(0.2)


def test_process_state_is_restored():
    torch.manual_seed(4)
    seeded = torch.rand(2)  # what a task with seed 4 draws first

    def seed_all():
        torch.manual_seed(123)
        np.random.seed(5)
        random.seed(9)

    seed_all()
    expected = (torch.rand(2), np.random.rand(), random.random())
    threads = torch.get_num_threads()
    seed_all()
    with process_state(seed=4, threads=1):
        assert torch.get_num_threads() == 1
        assert torch.equal(torch.rand(2), seeded)
        np.random.rand(3), random.random()  # the task uses every generator
    assert torch.get_num_threads() == threads
    got = (torch.rand(2), np.random.rand(), random.random())  # as if the task never ran
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
