"""Batch runs on Ray: one task per region, results appended as tasks finish, resumable.

:func:`run_batch` starts (or joins) Ray, skips the regions whose latest row in
``DIR/results.jsonl`` is ``ok``, submits one task per remaining region
(:func:`nchains.distributed.worker.run_region`, ``max_retries`` for workers that die), and as
each finishes writes its chain (``DIR/chains/<region>.json``, atomic) and export
(``DIR/exports/<region>/``, all or nothing) and then its row, so a row always points at
complete files. At the end it writes ``DIR/summary.json`` and the plots
(:mod:`nchains.distributed.results`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from nchains.distributed._ray import check_address, check_num_cpus, require_ray, start_ray, stop_ray
from nchains.distributed.regions import region_dir_name
from nchains.distributed.results import ResultsLog, write_summary

__all__ = ["run_batch", "region_key"]

BATCH_FILE = "batch.json"


def region_key(region: Dict[str, Any], config: Dict[str, Any], export: bool) -> str:
    """The key of a region's rows: a hash of the region, the extraction settings and ``export``."""
    text = json.dumps({"region": region, "config": config, "export": export}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check(regions, config, max_retries, threads) -> None:
    from nchains.neurochains.config import NeuroChainsConfig

    if not isinstance(regions, (list, tuple)) or not regions:
        raise ValueError(f"regions must be a non-empty list of regions, got {regions!r}")
    ids = [r.get("id") if isinstance(r, dict) else None for r in regions]
    if any(not isinstance(i, str) for i in ids):
        raise TypeError("regions must be dicts made by pair_regions or load_region_spec (each with an 'id')")
    names = [region_dir_name(i) for i in ids]
    if len(set(names)) != len(names):
        raise ValueError(f"regions must have different ids, got {sorted({i for i in ids if ids.count(i) > 1})} "
                         "more than once")
    if config is not None and not isinstance(config, NeuroChainsConfig):
        raise TypeError(f"config must be a NeuroChainsConfig or None, got {type(config).__name__}")
    for name, value, low in (("max_retries", max_retries, 0), ("threads", threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1000:
            raise ValueError(f"{name} must be an integer between {low} and 1000, got {value!r}")


def _write_outputs(out_dir: str, region: Dict[str, Any], result: Dict[str, Any]) -> Dict[str, Any]:
    """Writes a finished region's chain and export; returns its row with their paths (relative)."""
    from nchains._util.publish import StagedFolder
    from nchains.export.folder import replace_problem
    from nchains.neurochains.chain import Chain

    row = dict(result["row"])
    name = region_dir_name(region["id"])
    if result.get("chain") is not None:
        row["chain"] = os.path.join("chains", f"{name}.json")
        Chain.from_dict(result["chain"]).save(os.path.join(out_dir, row["chain"]))
    if result.get("export"):
        row["export"] = os.path.join("exports", name)
        with StagedFolder(os.path.join(out_dir, row["export"]), replace_problem, arg="export folder") as staged:
            for file_name, blob in result["export"].items():
                staged.write(file_name, blob)
            staged.publish()
    return row


def _failed_row(region: Dict[str, Any], key: str, exc: BaseException) -> Dict[str, Any]:
    from nchains.cli.main import one_line
    from nchains.distributed.worker import _row

    row = _row(region, key)
    cause = getattr(exc, "cause", None)  # a RayTaskError wraps what the task raised
    if isinstance(cause, BaseException):
        exc = cause
    row.update(error=f"{type(exc).__name__}: {one_line(exc)}", pid=None)
    return row


def _check_folder(out_dir: str, config: Dict[str, Any], export: bool) -> None:
    """Creates ``out_dir`` (or checks it is a batch folder of the same settings) and records them."""
    from nchains._util.io import write_atomic

    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} exists and is not a folder")
    settings = {"format": "nchains.batch", "config": config, "export": export}
    path = os.path.join(out_dir, BATCH_FILE)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        try:
            with open(path) as f:
                before = json.load(f)
        except (OSError, ValueError):
            raise ValueError(f"out_dir {out_dir!r} is a non-empty folder that is not a batch run (no readable "
                             f"{BATCH_FILE}); give a new or empty folder, or an earlier batch run's") from None
        if before != settings:
            raise ValueError(f"out_dir {out_dir!r} holds a batch run with other settings (extract options or "
                             "--export); give another folder to run with these")
        return
    try:
        write_atomic(path, json.dumps(settings, indent=1) + "\n")
    except OSError as exc:
        raise ValueError(f"out_dir {out_dir!r} cannot be written: {exc.strerror or exc}") from None


def run_batch(regions: Sequence[Dict[str, Any]], out_dir, config=None, *, export: bool = False,
              address: Optional[str] = None, num_cpus: Optional[int] = None, max_retries: int = 3,
              threads: int = 1, progress: bool = True, on_start: Optional[Callable] = None) -> Dict[str, Any]:
    """Extracts a chain per region on Ray and writes ``out_dir`` (see the module docstring).

    Args:
        regions (list of dict): from :func:`~nchains.distributed.regions.pair_regions` or
            :func:`~nchains.distributed.regions.load_region_spec`.
        out_dir (path): the batch folder: new, empty, or an earlier run with the same settings
            (resumed: regions whose latest row is ``ok`` are skipped).
        config (NeuroChainsConfig): extraction settings (each region's seed replaces ``seed``).
        export (bool): also export each chain under ``out_dir/exports/``.
        address (str): a running Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``);
            None starts a local Ray with ``num_cpus`` CPUs (or uses one already started).
        num_cpus (int): CPUs of the local Ray (default: all of the machine's).
        max_retries (int): times Ray reruns a task whose worker process died.
        threads (int): CPUs (Ray's ``num_cpus``) and torch threads per task.
        progress (bool): show a progress bar over the regions.
        on_start (callable): ``on_start(region)``, run in the worker before each task (tests).

    Returns:
        dict: the summary written to ``out_dir/summary.json`` plus ``skipped`` (regions already
        done) and ``ran`` (regions run now).
    """
    from tqdm.auto import tqdm

    from nchains.neurochains.config import NeuroChainsConfig

    _check(regions, config, max_retries, threads)
    check_address(address)
    check_num_cpus(num_cpus)
    require_ray("nchains batch")  # before anything is written
    out_dir = os.fspath(out_dir)
    cfg = (config or NeuroChainsConfig()).to_dict()
    _check_folder(out_dir, cfg, export)
    log = ResultsLog(out_dir)
    latest = log.latest()
    keyed = [(region_key(r, cfg, export), r) for r in regions]
    todo = [(k, r) for k, r in keyed if latest.get(k, {}).get("status") != "ok"]
    ray, started = start_ray(address, num_cpus, what="nchains batch")
    try:
        _run_tasks(ray, todo, out_dir, log, cfg, export, max_retries, threads, on_start,
                   tqdm(total=len(keyed), initial=len(keyed) - len(todo), desc="regions", unit="region",
                        disable=not progress, file=sys.stderr))
    finally:
        stop_ray(ray, started)
    wanted = {k for k, _ in keyed}
    summary = write_summary(out_dir, [r for r in log.rows() if r["key"] in wanted])
    return {**summary, "skipped": len(keyed) - len(todo), "ran": len(todo)}


def _run_tasks(ray, todo, out_dir, log, cfg, export, max_retries, threads, on_start, bar) -> None:
    from nchains.distributed.worker import run_region

    task = ray.remote(run_region).options(num_cpus=threads, max_retries=max_retries, retry_exceptions=False)
    pending = {task.remote(region, key, cfg, export, threads, on_start): (key, region) for key, region in todo}
    with bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            key, region = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - retries used up (worker died each time), or Ray failed
                row = _failed_row(region, key, exc)
            else:
                try:
                    row = _write_outputs(out_dir, region, result)
                except (OSError, ValueError) as exc:
                    row = _failed_row(region, key, exc)
            log.append(row)
            bar.update(1)
            bar.set_postfix_str(f"{region['id']}: {row['status']}")
