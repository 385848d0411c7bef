"""All analyses of a chain in one call (:func:`run_analyses`, JSON-serialisable results) and
their figures (:func:`figures`, :func:`plot_analyses`: one PNG per analysis)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from nchains.neurochains.analyses._common import DEFAULT_BATCH, build_context, fidelity_numbers
from nchains.neurochains.analyses.faithfulness import faithfulness, plot_faithfulness
from nchains.neurochains.analyses.fidelity import fidelity_vs_size, plot_fidelity
from nchains.neurochains.analyses.magnitude import magnitude_baseline, plot_magnitude
from nchains.neurochains.analyses.quotient import plot_quotient, quotient
from nchains.neurochains.analyses.robustness import DEFAULT_EPS, DEFAULT_STEPS, plot_robustness, robustness
from nchains.neurochains.analyses.stability import DEFAULT_KS, plot_stability, stability

__all__ = ["ANALYSES", "DEFAULT_ANALYSES", "FORMAT", "figures", "parse_which", "plot_analyses", "run_analyses"]

FORMAT = "nchains.analyses"
VERSION = 1
#: Every analysis, in the order they run and are shown.
ANALYSES = ("fidelity", "faithfulness", "quotient", "stability", "robustness", "magnitude")
#: What ``which="all"`` runs: all but the fidelity sweep, which extracts a chain per ``lam``
#: (minutes) and runs only when asked for by name or given ``sweep``.
DEFAULT_ANALYSES = ANALYSES[1:]
_PLOTS: Dict[str, Callable] = {"fidelity": plot_fidelity, "faithfulness": plot_faithfulness,
                               "quotient": plot_quotient, "stability": plot_stability,
                               "robustness": plot_robustness, "magnitude": plot_magnitude}


def parse_which(which, sweep_given: bool = False) -> Tuple[str, ...]:
    """The analyses ``which`` names, in :data:`ANALYSES` order.

    Args:
        which: ``"all"``, a comma-separated string (``"faithfulness,quotient"``) or a sequence
            of names among :data:`ANALYSES`.
        sweep_given (bool): ``"all"`` includes ``fidelity`` when a sweep was given.

    Raises:
        ValueError: an unknown or repeated name, or nothing named.
    """
    if isinstance(which, str):
        names = [w.strip() for w in which.split(",") if w.strip()]
    elif isinstance(which, Sequence):
        names = list(which)
    else:
        raise TypeError(f"which must be 'all', a comma-separated string or a sequence of names, got "
                        f"{type(which).__name__}")
    if names == ["all"]:
        return ANALYSES if sweep_given else DEFAULT_ANALYSES
    unknown = [n for n in names if n not in ANALYSES]
    if unknown or not names:
        raise ValueError(f"which must be 'all' or names among {', '.join(ANALYSES)}; got {which!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"which must not repeat an analysis, got {', '.join(repeated)} more than once")
    return tuple(n for n in ANALYSES if n in names)


def _skippable(name: str, explicit: bool, fn: Callable[[], Dict[str, Any]], skipped: Dict[str, str]):
    """Stability without a held-out pool: an error when asked for by name, a note under 'all'."""
    try:
        return fn()
    except ValueError as exc:
        if explicit or name != "stability" or "held-out pool" not in str(exc):
            raise
        skipped[name] = str(exc)
        return None


def run_analyses(chain, model, images: torch.Tensor, *, which="all", progress: bool = False,
                 labels: Optional[torch.Tensor] = None, pool=None, ks: Sequence[int] = DEFAULT_KS,
                 sweep: Optional[Sequence[float]] = None, sweep_steps: Optional[int] = None,
                 sweep_finetune_steps: Optional[int] = None, eps: float = DEFAULT_EPS, pgd_steps: int = DEFAULT_STEPS,
                 step_size: Optional[float] = None, bounds=None, finetune_baseline: bool = True, seed: int = 0,
                 batch_size: int = DEFAULT_BATCH, masked=None, graph=None) -> Dict[str, Any]:
    """Runs the chosen analyses of ``chain`` on its images; the result is plain JSON data.

    Args:
        chain (Chain): the chain.
        model (nn.Module): its original model (any device and float dtype).
        images (Tensor[N, *chain.input_shape]): the chain's images (preprocessed).
        which: ``"all"`` (:data:`DEFAULT_ANALYSES`, plus ``fidelity`` when ``sweep`` is given) or
            names among :data:`ANALYSES` (see :func:`parse_which`).
        progress (bool): progress bars on stderr.
        labels (Tensor[N] of int): ground truth for ``robustness`` (default: the original's classes).
        pool: ``stability``'s held-out images (:func:`~.stability.held_out_pool`); when the full
            set is asked for (``"all"``, :data:`DEFAULT_ANALYSES` or :data:`ANALYSES`), a model
            without one skips stability (noted in ``skipped``); named alone, it is an error.
        ks: ``stability``'s neighbours per image.
        sweep, sweep_steps, sweep_finetune_steps: ``fidelity``'s ``lams``, ``steps``,
            ``finetune_steps`` (:func:`~.fidelity.fidelity_vs_size`).
        eps, pgd_steps, step_size, bounds, seed: ``robustness``'s attacks.
        finetune_baseline (bool): fine-tune the magnitude baseline's scores.
        batch_size (int): rows per batched forward.
        masked, graph: ``chain.apply(model)`` and the model's analysis, to reuse.

    Returns:
        dict: ``format`` ("nchains.analyses"), ``version``, ``chain`` (size and fidelity of the
        chain on its images), ``which``, ``skipped`` (name -> why), and one entry per analysis
        run, as returned by :func:`~.fidelity.fidelity_vs_size`, :func:`~.faithfulness.faithfulness`,
        :func:`~.quotient.quotient`, :func:`~.stability.stability`, :func:`~.robustness.robustness`
        and :func:`~.magnitude.magnitude_baseline`.

    Example:
        >>> results = run_analyses(chain, model, images, which="faithfulness,quotient")
        >>> results["faithfulness"]["spearman"]
    """
    names = parse_which(which, sweep_given=sweep is not None)
    explicit = names not in (ANALYSES, DEFAULT_ANALYSES)  # the full set skips what this model cannot do
    ctx = build_context(chain, model, images, masked=masked, graph=graph, batch_size=batch_size)
    m = ctx.chain.metrics
    out: Dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "which": list(names), "skipped": {},
        "chain": {"filters_kept": m.get("filters_kept"), "filters_total": m.get("filters_total"),
                  "layers_kept": m.get("layers_kept"), "layers_total": m.get("layers_total"),
                  "images": len(ctx.images), "classes": list(ctx.chain.classes),
                  **fidelity_numbers(ctx.p_logits, ctx.q_logits)},
    }
    runs = {
        "fidelity": lambda: fidelity_vs_size(ctx, lams=sweep, steps=sweep_steps, finetune_steps=sweep_finetune_steps,
                                             progress=progress),
        "faithfulness": lambda: faithfulness(ctx, progress=progress),
        "quotient": lambda: quotient(ctx),
        "stability": lambda: stability(ctx, pool=pool, ks=ks),
        "robustness": lambda: robustness(ctx, labels=labels, eps=eps, steps=pgd_steps, step_size=step_size,
                                         bounds=bounds, seed=seed, progress=progress),
        "magnitude": lambda: magnitude_baseline(ctx, finetune=finetune_baseline, progress=progress),
    }
    for name in names:
        result = _skippable(name, explicit, runs[name], out["skipped"])
        if result is not None:
            out[name] = result
    json.dumps(out, allow_nan=False)  # a NaN or a tensor left in would be a bug here, not in a reader
    return out


def figures(results: Dict[str, Any]) -> Dict[str, Any]:
    """One matplotlib Figure per analysis present in ``results`` (of :func:`run_analyses`)."""
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise ValueError(f"results must be the dict of run_analyses (format {FORMAT!r})")
    return {name: _PLOTS[name](results[name]) for name in ANALYSES if name in results}


def plot_analyses(results: Dict[str, Any], out_dir) -> Dict[str, str]:
    """Writes ``<out_dir>/<analysis>.png`` for every analysis in ``results`` (each file atomically;
    ``out_dir`` is created when missing).

    Args:
        results (dict): :func:`run_analyses`'s output.
        out_dir (path): the folder.

    Returns:
        dict: analysis name -> path of its PNG.
    """
    from nchains._util.io import write_atomic
    from nchains.neurochains.analyses.plots import png_bytes

    paths = {}
    for name, fig in figures(results).items():
        path = os.path.join(os.fspath(out_dir), f"{name}.png")
        write_atomic(path, png_bytes(fig))
        paths[name] = path
    return paths
