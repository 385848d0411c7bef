"""tools/bench_serve.py runs end to end at a tiny size and every request it sends is answered."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("requests")

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.mark.slow  # an extraction, two exports and two Serve starts: 1-3 minutes on 2 loaded cores
def test_bench_serve_prints_a_row_per_model(capsys):
    sys.path.insert(0, str(TOOLS))
    try:
        import bench_serve
    finally:
        sys.path.remove(str(TOOLS))
    assert bench_serve.main(["--requests", "20", "--concurrency", "2", "--steps", "5", "--num-cpus", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out if line.split() and line.split()[0] in ("original", "chain")}
    assert set(rows) == {"original", "chain"}
    for cells in rows.values():
        assert cells[-1] == "0"  # no request failed
        assert float(cells[-2]) > 0 and float(cells[-3]) >= float(cells[-4]) > 0  # req/s; p99 >= p50
    assert float(rows["chain"][1]) <= float(rows["original"][1])  # the chain computes no more MACs
