"""``nchains batch --address``: a batch run on a separately started Ray cluster (a head node
started here with ray.cluster_utils, as `ray start --head` would, and shut down by the test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a head node start and a driver process: about a minute on 2 loaded cores
def test_batch_on_an_existing_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        run = subprocess.run([sys.executable, "-m", "nchains.cli", "batch", "--pairs", "1", "--per-class", "2",
                              "--steps", "4", "--address", cluster.address, "--out", str(tmp_path / "run"), "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        cluster.shutdown()
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["ok"] == 1 and summary["ran"] == 1
    with open(tmp_path / "run" / "results.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1 and rows[0]["status"] == "ok" and (tmp_path / "run" / rows[0]["chain"]).is_file()
