"""Shared checks of the bad-input suite: every case is one call of the CLI (in process) or of
the Python API that must be refused cleanly.

A refused CLI call exits with code 2 (or the code a case names), prints exactly one line to
stderr, starting ``nchains: error:`` and containing the case's needle, prints no traceback and
leaves the working folder exactly as it was (no output, no temp or staging file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Set

import pytest

from nchains import cli


def tree(root: Path) -> Set[str]:
    """Every file and folder under ``root`` (hidden ones included), relative to it."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


class Refusal:
    """What a refused call printed."""

    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err
        self.lines = err.strip().splitlines()


@pytest.fixture
def refused(capsys, tmp_path, monkeypatch):
    """``refused(argv, needle, code=2, watch=None)`` runs ``nchains *argv`` in ``tmp_path`` and
    asserts a clean refusal; ``watch`` are extra folders that must be left unchanged too."""
    monkeypatch.chdir(tmp_path)

    def run(argv: Iterable[str], needle: Optional[str], code: int = 2, watch: Iterable[Path] = ()) -> Refusal:
        folders = [tmp_path, *map(Path, watch)]
        before = {str(f): tree(f) for f in folders}
        capsys.readouterr()
        try:
            got = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own errors
            got = exc.code
        out, err = capsys.readouterr()
        r = Refusal(got, out, err)
        assert got == code, f"exit code {got}, expected {code}; stderr: {err}"
        assert "Traceback" not in err and "Traceback" not in out, err
        assert len(r.lines) == 1, f"expected one line on stderr, got {len(r.lines)}: {err}"
        assert r.lines[0].startswith("nchains: error:"), err
        if needle is not None:
            assert needle in r.lines[0], f"{needle!r} not in {r.lines[0]!r}"
        for f in folders:
            assert tree(f) == before[str(f)], f"files left behind in {f}: {sorted(tree(f) ^ before[str(f)])}"
        return r

    return run
