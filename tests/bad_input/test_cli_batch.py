"""Bad arguments and region specs to ``nchains batch``: each is refused before Ray starts (exit
2, one line, no traceback, nothing written), naming the argument or the spec field."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BASE = ["batch", "--out", "run"]


@pytest.mark.parametrize("argv,needle", [
    (["--pairs", "0"], "pairs must be an integer between 1 and 45, got 0"),
    (["--pairs", "46"], "pairs must be an integer between 1 and 45, got 46"),
    (["--pairs", "x"], "argument --pairs: invalid int value"),
    (["--pairs", "2", "--seeds", "0"], "seeds must be an integer between 1 and 10000, got 0"),
    (["--pairs", "2", "--per-class", "0"], "per-class must be an integer between 1 and 100, got 0"),
    (["--pairs", "2", "--confident", "1.5"], "--confident must be a probability in (0, 1], got 1.5"),
    (["--pairs", "2", "--confident", "nan"], "--confident must be a probability in (0, 1], got nan"),
    (["--pairs", "1", "--classes-from", "sneaker,unicorn"], "unknown class 'unicorn'"),
    (["--pairs", "1", "--classes-from", "sneaker"], "at least two different classes"),
    (["--pairs", "1", "--classes-from", "bag,bag"], "--classes-from must not repeat a class"),
    (["--pairs", "4", "--classes-from", "bag,sandal,coat"], "pairs must be an integer between 1 and 3, got 4"),
    (["--pairs", "1", "--num-cpus", "0"], "--num-cpus must be an integer between 1 and 4096, got 0"),
    (["--pairs", "1", "--threads", "0"], "--threads must be between 1 and 1000, got 0"),
    (["--pairs", "1", "--max-retries", "-1"], "--max-retries must be between 0 and 1000, got -1"),
    (["--pairs", "1", "--address", "nowhere"], "--address must be 'auto' or [ray://]HOST:PORT"),
    (["--pairs", "1", "--address", "host:99999"], "--address must be 'auto' or [ray://]HOST:PORT"),
    (["--pairs", "1", "--address", "auto", "--num-cpus", "2"], "--num-cpus applies to a local Ray"),
    (["--pairs", "1", "--steps", "-1"], "steps"),
    (["--pairs", "1", "--lam", "nan"], "lam"),
    (["--pairs", "1", "--spec", "regions.yaml"], "not allowed with argument"),
    ([], "one of the arguments --pairs --spec is required"),
])
def test_bad_arguments(refused, argv, needle):
    refused(BASE + argv, needle)


def test_out_is_a_file(refused, tmp_path):
    (tmp_path / "run").write_text("x")
    refused(BASE + ["--pairs", "1"], "--out 'run' exists and is not a folder")


def test_out_is_a_foreign_folder(refused, tmp_path):
    pytest.importorskip("ray")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("x")
    refused(BASE + ["--pairs", "1"], "is a non-empty folder that is not a batch run")


def test_without_ray(refused, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    refused(BASE + ["--pairs", "1"], "nchains batch needs Ray: pip install nchains[ray]")


def _spec(root: Path, text: str) -> Path:
    path = root / "regions.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,needle", [
    ("regions: [", "is not valid YAML"),
    ("- classes: [bag, coat]", "must be a mapping with the one key 'regions'"),
    ("regions: []", "regions must be a non-empty list"),
    ("regions: [7]", "regions[0] must be a mapping with at least 'classes'"),
    ("regions:\n  - classes: [bag, coat]\n    colour: red", "regions[0]: unknown field(s) ['colour']"),
    ("regions:\n  - classes: bag", "regions[0].classes must be a list of different class names"),
    ("regions:\n  - classes: [bag, bag]", "regions[0].classes must be a list of different class names"),
    ("regions:\n  - classes: [bag, unicorn]", "regions[0].classes: unknown class 'unicorn'"),
    ("regions:\n  - classes: [bag, coat]\n  - classes: [bag, coat]\n    per_class: 0",
     "regions[1].per_class must be an integer between 1 and 100000, got 0"),
    ("regions:\n  - classes: [bag, coat]\n    seeds: 0", "regions[0].seeds must be an integer between 1 and 10000"),
    ("regions:\n  - classes: [bag, coat]\n    seed: -1", "regions[0].seed must be an integer between 0"),
    ("regions:\n  - classes: [bag, coat]\n    seed: 1\n    seeds: 2", "regions[0]: give seed (one run) or seeds"),
    ("regions:\n  - classes: [bag, coat]\n    confident: 2", "regions[0].confident must be a probability in (0, 1]"),
    ("regions:\n  - classes: [bag, coat]\n    size: 32", "regions[0].size applies to an images folder"),
    ("regions:\n  - classes: [bag, coat]\n    images: nowhere", "regions[0].images 'nowhere' is not a folder"),
    ("regions:\n  - classes: [cat, dog]\n    model: torchvision:resnet18", "regions[0].images is required"),
    ("regions:\n  - classes: [cat, dog]\n    model: torchvision:nonet", "regions[0]: model torchvision:nonet is not"),
    ("regions:\n  - classes: [bag, coat]\n    weights: w.pt", "regions[0]: weights needs model torchvision:NAME"),
    ("regions:\n  - classes: [bag, coat]\n  - classes: [bag, coat]", "two regions have the id 'bag+coat@seed0'"),
    ("regions:\n  - classes: [bag, coat]\n    name: ''", "regions[0].name must be a non-empty string"),
])
def test_bad_specs(refused, tmp_path, text, needle):
    _spec(tmp_path, text)
    refused(BASE + ["--spec", "regions.yaml"], needle)


def test_missing_spec(refused):
    refused(BASE + ["--spec", "none.yaml"], "spec 'none.yaml' cannot be read")


def test_pairs_options_with_a_spec(refused, tmp_path):
    _spec(tmp_path, "regions:\n  - classes: [bag, coat]\n")
    refused(BASE + ["--spec", "regions.yaml", "--seeds", "3"], "--seeds goes with --pairs")
