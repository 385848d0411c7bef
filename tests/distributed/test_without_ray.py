"""nchains imports, and its other commands parse, in a process where ``import ray`` fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import sys
sys.modules["ray"] = None  # every `import ray` raises ImportError, as without Ray installed
import nchains
from nchains import distributed  # noqa: F401
import importlib
cli_main = importlib.import_module("nchains.cli.main")  # the module (nchains.cli.main is also the function)
assert callable(nchains.run_batch) and callable(nchains.serve_export)
parser = cli_main.build_parser()
for command in ("extract", "export", "inspect", "batch", "serve"):
    assert command in parser.format_help(), command
code = cli_main.main(["batch", "--pairs", "1", "--out", sys.argv[1]])
assert sys.modules["ray"] is None
sys.exit(code)
"""


def test_nchains_works_without_ray(tmp_path):
    run = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == ("nchains: error: nchains batch needs Ray: pip install nchains[ray] "
                                  "(import failed: import of ray halted; None in sys.modules)")
    assert not (tmp_path / "run").exists()
