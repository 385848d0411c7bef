"""``nchains batch`` on a local Ray with 2 CPUs (one Ray session for the module): four regions
with very short schedules, resume, a worker killed mid-task, a failing region."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import signal
import statistics

import pytest

ray = pytest.importorskip("ray")

from nchains import cli  # noqa: E402
from nchains.distributed.batch import run_batch  # noqa: E402
from nchains.distributed.regions import pair_regions  # noqa: E402
from nchains.neurochains.chain import Chain  # noqa: E402
from nchains.neurochains.config import NeuroChainsConfig  # noqa: E402

_PRINT = builtins.print  # Ray's driver swaps in its own print once worker output reaches it
SHORT = ["--steps", "4", "--finetune-steps", "2", "--no-early-stop"]
SHORT_CONFIG = NeuroChainsConfig(steps=4, finetune_steps=2, stop_delta=None)


@pytest.fixture(scope="module")
def local_ray():
    from nchains.distributed._ray import start_ray, stop_ray

    _, started = start_ray(num_cpus=2)  # what `nchains batch` starts; run_batch then reuses it
    assert started
    yield
    stop_ray(ray, started)
    assert builtins.print is _PRINT, "Ray's replacement of print outlived the session"


def _rows(folder):
    with open(os.path.join(folder, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def four(local_ray, tmp_path_factory):
    """A 4-region batch (2 pairs x 2 seeds, 2 images per class) run through the CLI."""
    out = str(tmp_path_factory.mktemp("batch") / "run")
    argv = ["batch", "--pairs", "2", "--seeds", "2", "--per-class", "2", "--out", out, "--quiet", *SHORT]
    assert cli.main(argv) == 0
    return out, argv


def test_four_regions_rows_chains_and_summary(four):
    out, _ = four
    rows = _rows(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    assert {(tuple(r["classes"]), r["seed"]) for r in rows} == {
        (tuple(reg["classes"]), reg["seed"]) for reg in pair_regions(2, 2)}
    for r in rows:
        chain = Chain.load(os.path.join(out, r["chain"]))
        assert r["filters_kept"] == sum(len(v) for v in chain.kept.values())
        assert r["filters_total"] == sum(chain.layer_sizes.values()) and r["kl"] == chain.metrics["kl"]
        assert chain.seed == r["seed"] and chain.images_source["classes"] == r["classes"]
        assert chain.images_source["per_class"] == 2 and len(chain.history) > 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["ok"] == 4 and summary["failed"] == 0
    assert summary["medians"]["prob_drop"] == pytest.approx(statistics.median(r["prob_drop"] for r in rows))
    assert summary["medians"]["kept_fraction"] == pytest.approx(
        statistics.median(r["filters_kept"] / r["filters_total"] for r in rows))
    for name in summary["plots"]:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(summary["plots"]) == 3


def test_rerun_skips_done_regions(four, capsys):
    out, argv = four
    before = _rows(out)
    capsys.readouterr()
    assert cli.main([a for a in argv if a != "--quiet"] + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == 4 and summary["ran"] == 0
    assert _rows(out) == before  # not one row added or changed


def test_killed_worker_is_retried_and_counted_once(local_ray, tmp_path):
    marker = tmp_path / "killed-once"

    def kill_first_attempt(region):  # runs in the Ray worker
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    regions = pair_regions(1, 1, per_class=2)
    summary = run_batch(regions, tmp_path / "run", SHORT_CONFIG, max_retries=2, progress=False,
                        on_start=kill_first_attempt)
    rows = _rows(tmp_path / "run")
    assert marker.exists(), "the first attempt never ran"
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    assert rows[0]["pid"] != int(marker.read_text())  # a new worker process finished it
    assert summary["ok"] == 1 and summary["ran"] == 1
    assert builtins.print is _PRINT  # run_batch leaves the process's print as it found it


def test_failing_region_is_recorded_and_the_batch_goes_on(local_ray, tmp_path):
    ok = pair_regions(1, 1, per_class=2)
    # 100 images per class with probability >= 0.9999: the shipped sample has 100 per class, so it fails
    bad = pair_regions(2, 1, per_class=100, confident=0.9999)[1:]
    summary = run_batch(ok + bad, tmp_path / "run", SHORT_CONFIG, progress=False)
    rows = {r["region"]: r for r in _rows(tmp_path / "run")}
    assert rows[ok[0]["id"]]["status"] == "ok"
    failed = rows[bad[0]["id"]]
    assert failed["status"] == "failed" and failed["chain"] is None
    assert failed["error"].startswith("ValueError: per_class=100 but only") and "\n" not in failed["error"]
    assert summary["failed"] == 1 and summary["failed_regions"] == {bad[0]["id"]: failed["error"]}
    # a rerun runs only the failed region again (and it fails again: one more row for it)
    again = run_batch(ok + bad, tmp_path / "run", SHORT_CONFIG, progress=False)
    assert again["skipped"] == 1 and again["ran"] == 1 and len(_rows(tmp_path / "run")) == 3
    assert builtins.print is _PRINT and pickle.dumps(print) == pickle.dumps(_PRINT)


@pytest.mark.slow  # one verified export of three formats: about a minute on 2 loaded cores
def test_export_of_each_region_is_verified_and_complete(local_ray, tmp_path):
    from nchains.export.artifacts import inspect_artifact

    summary = run_batch(pair_regions(1, 1, per_class=2), tmp_path / "run", SHORT_CONFIG, export=True, progress=False)
    (row,) = _rows(tmp_path / "run")
    assert summary["ok"] == 1 and row["status"] == "ok" and row["export"] == os.path.join("exports", row["region"])
    report = inspect_artifact(tmp_path / "run" / row["export"])
    assert report["ok"] and {c["format"] for c in report["checks"]} == {"torchscript", "onnx", "pt2"}
    chain = Chain.load(tmp_path / "run" / row["chain"])
    assert report["metadata"]["chain"]["images_hash"] == chain.images_hash
