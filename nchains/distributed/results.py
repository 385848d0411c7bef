"""``DIR/results.jsonl`` of a batch run, and its summary (``summary.json`` and PNG plots).

Rows are appended by the driver only, one ``os.write`` of one complete line on a file opened
with ``O_APPEND``, then ``fsync``: a killed run leaves every finished row whole, and at most a
partial last line, which the next run drops (rewriting the file atomically) before appending.
A row's ``key`` identifies its region and settings; a rerun skips the keys whose latest row is
``ok`` and runs the failed and missing ones again (the latest row of a key is the one that
counts).
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from typing import Any, Dict, List, Optional

from nchains._util.io import write_atomic

__all__ = ["ResultsLog", "summarize", "write_summary", "PLOTS"]

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
#: The plots of a batch summary.
PLOTS = ("sparsity.png", "fidelity.png", "kept_vs_prob_drop.png")


class ResultsLog:
    """The rows of ``folder/results.jsonl``.

    Args:
        folder (str): the batch folder (created when missing).
    """

    def __init__(self, folder: str):
        self.path = os.path.join(folder, RESULTS)
        self.dropped = 0  # partial lines removed by this run (a previous run was killed mid-write)

    def rows(self) -> List[Dict[str, Any]]:
        """Every complete row, in file order; a partial or unreadable line is dropped from the file."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        rows, good = [], []
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("key"), str):
                rows.append(row)
                good.append(line)
            else:
                self.dropped += 1
        if self.dropped or (data and not data.endswith(b"\n")):
            write_atomic(self.path, b"".join(g + b"\n" for g in good))
        return rows

    def latest(self) -> Dict[str, Dict[str, Any]]:
        """key -> the latest row of that key."""
        return {r["key"]: r for r in self.rows()}

    def append(self, row: Dict[str, Any]) -> None:
        """Appends one row (one write of one line, then fsync)."""
        line = (json.dumps(row, allow_nan=False, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            written = os.write(fd, line)
            if written != len(line):  # a full disk: never leave a half row that looks whole
                raise OSError(f"short write to {self.path!r} ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)


def _median(values: List[float]) -> Optional[float]:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(values) if values else None


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Counts and medians of the latest row per region (``kept_fraction`` = filters kept / total)."""
    latest = list({r["key"]: r for r in rows}.values())
    ok = [r for r in latest if r.get("status") == "ok"]
    fraction = [r["filters_kept"] / r["filters_total"] for r in ok if r.get("filters_total")]
    medians = {m: _median([r.get(m) for r in ok]) for m in
               ("filters_kept", "filters_total", "layers_kept", "layers_total", "kl", "agreement", "prob_drop",
                "seconds")}
    medians["kept_fraction"] = _median(fraction)
    return {"regions": len(latest), "ok": len(ok), "failed": len(latest) - len(ok), "medians": medians,
            "failed_regions": {r["region"]: r.get("error") for r in latest if r.get("status") != "ok"},
            "plots": list(PLOTS) if ok else []}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _plots(ok: List[Dict[str, Any]]) -> Dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global figure state in the process

    kept = [r["filters_kept"] for r in ok]
    drop = [r["prob_drop"] for r in ok]
    pct = [100.0 * r["filters_kept"] / r["filters_total"] for r in ok]
    out = {}
    fig = Figure(figsize=(5, 3.5), layout="tight")
    ax = fig.add_subplot()
    ax.hist(pct, bins=min(30, max(5, len(pct))))
    ax.set(xlabel="filters kept (% of the model's)", ylabel="regions", title=f"Sparsity of {len(ok)} chains")
    out[PLOTS[0]] = _png(fig)
    fig = Figure(figsize=(8, 3.5), layout="tight")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.hist(drop, bins=min(30, max(5, len(drop))))
    left.set(xlabel="decrease of the predicted class's probability", ylabel="regions", title="Fidelity: prob drop")
    right.hist([r["agreement"] for r in ok], bins=min(30, max(5, len(ok))), range=(0, 1))
    right.set(xlabel="top-1 agreement with the original", title="Fidelity: agreement")
    out[PLOTS[1]] = _png(fig)
    fig = Figure(figsize=(5, 3.5), layout="tight")  # the paper's Fig. 2 (left): size vs fidelity
    ax = fig.add_subplot()
    ax.scatter(kept, drop, s=12, alpha=0.7)
    ax.set(xlabel="number of filters after pruning", ylabel="decrease of probability", title="Size and fidelity")
    out[PLOTS[2]] = _png(fig)
    return out


def write_summary(folder: str, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Writes ``summary.json`` and, when a region succeeded, the plots (atomically); returns the summary."""
    summary = summarize(rows)
    ok = [r for r in {r["key"]: r for r in rows}.values() if r.get("status") == "ok"]
    if ok:
        for name, blob in _plots(ok).items():
            write_atomic(os.path.join(folder, name), blob)
    write_atomic(os.path.join(folder, SUMMARY), json.dumps(summary, indent=1) + "\n")
    return summary
