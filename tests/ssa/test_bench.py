"""tools/bench_ssa.py runs end to end at tiny sizes; its naive side computes the same graphs."""

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.mark.slow  # three models, two SSA implementations: ~1 min idle, ~2 min on loaded cores
def test_bench_ssa_quick():
    out = subprocess.run([sys.executable, str(TOOLS / "bench_ssa.py"), "--quick"], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.split()[-1:] == ["yes"] and "same dependency graphs" in line for line in lines), out.stdout
    assert any("ResNet-50" in line for line in lines) and any("speed-up" in line for line in lines)
