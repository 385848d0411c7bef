"""``nchains.report``: a chain's visual report, one self-contained HTML page written all or
nothing (:class:`~nchains._util.publish.StagedFolder`).

The page (see :mod:`.sections`): the chain graph (inline SVG), the chain's images with the
original's and the chain's predictions, per-layer SMOE maps of one image per class, each kept
filter's activation maximisation and top-activating images, the inference chain per class,
the chain's metrics and the analyses' plots and numbers (``analyses.json`` beside the page).
``report.json`` lists the folder's files: an existing folder is replaced only when it is empty
or an earlier report holding only those files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from nchains._util.publish import StagedFolder, check_writable, earlier_output_problem
from nchains._util.tensors import check_images
from nchains.report import actmax as am
from nchains.report.chain_graph import chain_graph
from nchains.report.chain_svg import chain_svg
from nchains.report.html import page
from nchains.report.sections import (analyses_section, filters_section, graph_section, images_section, paths_section,
                                     pick_per_class, smoe_section)
from nchains.report.smoe import smoe_maps
from nchains.report.unit_outputs import computed_layers

__all__ = ["DEFAULT_ANALYSES", "MANIFEST", "replace_problem", "report"]

#: What the report runs by default: every analysis but the fidelity sweep (a new extraction per
#: lambda: minutes). On the shipped Quick-start chain they take about 25 s of CPU together.
DEFAULT_ANALYSES = "faithfulness,quotient,stability,robustness,magnitude"
#: The report folder's index: ``{"format": "nchains-report", "version": 1, "files": [...]}``,
#: ``files`` naming the other files the report wrote.
MANIFEST = "report.json"
REPORT_FORMAT = "nchains-report"


def replace_problem(folder: str) -> Optional[str]:
    """None when ``folder`` may be replaced by a report (empty, or an earlier report holding only
    the files its ``report.json`` lists), else why."""
    return earlier_output_problem(folder, MANIFEST, lambda m: m["files"] if m.get("format") == REPORT_FORMAT else None,
                                  "report")


def _chain_and_model(chain, model):
    from nchains.models.spec import load_model
    from nchains.neurochains.chain import Chain

    if isinstance(chain, (str, os.PathLike)):
        chain = Chain.load(chain)
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must be an nchains.Chain or the path of a chain JSON file, got {type(chain).__name__}")
    if model is None:
        if not chain.model_spec:
            raise ValueError("model is required: the chain does not record its model (model_spec is null)")
        model = load_model(chain.model_spec)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None (the chain's own model), got {type(model).__name__}")
    chain.check_model(model)
    return chain, model.eval()


def _chain_images(chain) -> torch.Tensor:
    """The chain's own images, rebuilt from ``chain.images_source`` and checked by hash."""
    from nchains._util.io import hash_tensor
    from nchains.models.image_source import images_from_source

    if chain.images_source is None:
        raise ValueError("images is required: the chain does not record how its images were chosen")
    images, what = images_from_source(chain.images_source)
    if hash_tensor(images) != chain.images_hash:
        raise ValueError(f"images is required: the chain's images_source gives {what} whose hash differs from "
                         "the chain's images_hash (has the data changed?)")
    return images


class _Stages:
    """``stage(text)`` logs ``text`` with the seconds since the previous stage."""

    def __init__(self, log: Optional[Callable[[str], None]]):
        self.log, self.clock = log, time.perf_counter()

    def __call__(self, text: str) -> None:
        now = time.perf_counter()
        if self.log is not None:
            self.log(f"{text} ({now - self.clock:.1f} s)")
        self.clock = now


def _publish(out_dir, html: str, results: Optional[Dict[str, Any]]) -> None:
    """``index.html`` (and ``analyses.json``) and ``report.json`` listing them in place of
    ``out_dir``, all or nothing."""
    files = {"index.html": html.encode("utf-8")}
    if results is not None:
        files["analyses.json"] = (json.dumps(results, indent=1) + "\n").encode("utf-8")
    manifest = {"format": REPORT_FORMAT, "version": 1, "files": list(files)}
    with StagedFolder(out_dir, replace_problem, kind="report") as staged:
        for name, data in files.items():
            staged.write(name, data)
        staged.write(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
        staged.publish()


def _check_options(out_dir, steps, top_k, edges_per_filter, max_images, analyses) -> None:
    if out_dir is None:
        raise ValueError("out_dir is required: the folder to write index.html into")
    if not _no_analyses(analyses):
        from nchains.neurochains.analyses.run import parse_which

        parse_which(analyses)  # a bad name fails now, not after the activation maximisation
    for name, value, low in (("actmax_steps", steps, 0), ("top_k", top_k, 1), ("max_images", max_images, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10**5:
            raise ValueError(f"{name} must be an int in [{low}, 100000], got {value!r}")
    if edges_per_filter is not None and (isinstance(edges_per_filter, bool) or not isinstance(edges_per_filter, int)
                                         or edges_per_filter < 1):
        raise ValueError(f"edges_per_filter must be an int >= 1 or None (all), got {edges_per_filter!r}")


def _no_analyses(which) -> bool:
    return which is None or (isinstance(which, str) and which.strip() in ("", "none"))


def _analyses(chain, model, images, which, graph, masked, progress):
    """``(results or None, {name: png bytes}, note)`` of the analyses named by ``which``."""
    from nchains.neurochains.analyses import figures, run_analyses
    from nchains.neurochains.analyses.plots import png_bytes

    if _no_analyses(which):
        return None, {}, "Analyses not run (analyses=None)."
    t0 = time.perf_counter()
    results = run_analyses(chain, model, images, which=which, progress=progress, graph=graph, masked=masked)
    pngs = {name: png_bytes(fig) for name, fig in figures(results).items()}
    ran = ", ".join(results["which"])
    return results, pngs, f"The chain's metrics (from its extraction), then the analyses run on its images ({ran}; " \
                          f"{time.perf_counter() - t0:.0f} s): nchains.neurochains.analyses.run_analyses."


def report(chain, model: Optional[nn.Module] = None, out_dir=None, *, images: Optional[torch.Tensor] = None,
           analyses=DEFAULT_ANALYSES, actmax_steps: int = am.DEFAULT_STEPS, top_k: int = 3,
           edges_per_filter: Optional[int] = 3, max_images: int = 60, seed: int = 0,
           progress: Optional[bool] = None, log: Optional[Callable[[str], None]] = None) -> str:
    """Writes ``out_dir/index.html``, the chain's self-contained visual report.

    Args:
        chain (Chain or path): the chain (or its JSON file).
        model (nn.Module): its original model (default: rebuilt from ``chain.model_spec``).
        out_dir (path): the folder: new, empty or an earlier report holding only the files
            its ``report.json`` lists (replaced as a whole, atomically); checked writable before
            any work. It gets ``index.html``, ``analyses.json`` (when analyses ran) and
            ``report.json``.
        images (Tensor[N, *chain.input_shape]): the chain's images (default: rebuilt from
            ``chain.images_source``, hash-checked).
        analyses: names among :data:`nchains.neurochains.analyses.ANALYSES` (comma-separated
            or a sequence), ``"all"``, or None/"none" for none (default :data:`DEFAULT_ANALYSES`).
        actmax_steps (int): activation-maximisation steps (:mod:`.actmax`; 0: the noise).
        top_k (int): top-activating images shown per filter.
        edges_per_filter (int or None): strongest incoming edges drawn per filter (None: all).
        max_images (int): the most images the page shows (all are analysed).
        seed (int): seed of the activation maximisation's noise and jitter.
        progress (bool or None): progress bars on stderr (None: when stderr is a terminal).
        log (callable): ``log(text)`` receives one line per stage with its time (default: nothing).

    Returns:
        str: the path of ``index.html``.

    Example:
        >>> nchains.report(chain, model, "report/")     # then open report/index.html
    """
    import sys

    from nchains.graph.analysis import graph_for

    _check_options(out_dir, actmax_steps, top_k, edges_per_filter, max_images, analyses)
    check_writable(out_dir, replace_problem, kind="report")
    chain, model = _chain_and_model(chain, model)
    images = _chain_images(chain) if images is None else images
    images = check_images(images, chain.input_shape)
    progress = sys.stderr.isatty() if progress is None else bool(progress)
    stage = _Stages(log)
    ref = next(model.parameters())
    x = images.detach().to(device=ref.device, dtype=ref.dtype)
    graph = graph_for(model, chain.input_shape, None)
    masked = chain.apply(model, graph)
    with torch.no_grad():
        p_logits, q_logits = model(x).cpu(), masked(x).cpu()
    layers = computed_layers(chain)
    svg = chain_svg(chain_graph(chain, graph), edges_per_filter=edges_per_filter, class_names=chain.class_names,
                    title=f"chain graph: {chain.metrics.get('filters_kept')} filters")
    stage("chain graph")
    picks = pick_per_class(chain, p_logits)
    maps = smoe_maps(chain, masked, x[[i for i, _ in picks]], layers) if picks and layers else {}
    stage("SMOE maps")
    params = dict(steps=actmax_steps, lr=am.DEFAULT_LR, l2=am.DEFAULT_L2, jitter=max(1, chain.input_shape[1] // 28),
                  blur_every=am.DEFAULT_BLUR_EVERY, blur_sigma=am.DEFAULT_BLUR_SIGMA, top_k=top_k)
    filters = _filters(chain, masked, x, layers, actmax_steps, top_k, seed, progress)
    stage("activation maximisation")
    results, pngs, note = _analyses(chain, model, images, analyses, graph, masked, progress)
    stage("analyses")
    shown = min(len(images), max_images)
    sections = [("graph", "Chain graph", graph_section(svg, chain, edges_per_filter)),
                ("images", "Images", images_section(chain, images[:shown], p_logits[:shown], q_logits[:shown])),
                ("smoe", "SMOE maps", smoe_section(chain, images, picks, maps, layers) if maps else ""),
                ("filters", "Kept filters", filters_section(chain, layers, filters, images, params)),
                ("chains", "Inference chains", paths_section(chain)),
                ("analyses", "Metrics and analyses", analyses_section(chain, results, pngs, note))]
    names = ", ".join(chain.class_name(c) for c in chain.classes)
    html = page(f"Inference chain: {names}", chain.describe().splitlines()[0] + f" — {len(images)} images",
                [s for s in sections if s[2]],
                footer=f"nchains report; model {chain.model_hash[:12]}…, images {chain.images_hash[:12]}…")
    _publish(out_dir, html, results)
    stage("page written")
    return os.path.join(os.fspath(out_dir), "index.html")


def _filters(chain, masked, x, layers: Sequence[str], steps: int, top_k: int, seed: int, progress: bool
             ) -> Dict[str, Any]:
    """``{layer: (ActMax, means Tensor[N, K], top Tensor[K, k])}`` for every computed layer: one
    activation maximisation for all kept filters of all layers (batched; on tiny inputs the
    per-op overhead, not the arithmetic, is what a step costs)."""
    means = am.mean_activations(chain, masked, x, layers)
    targets = [(layer, f) for layer in layers for f in chain.kept[layer]]
    act = am.activation_maximisation(masked, targets, chain.input_shape, steps=steps, bounds=am.channel_bounds(x),
                                     seed=seed, progress=progress) if targets else None
    out, at = {}, 0
    for layer in layers:
        k = len(chain.kept[layer])
        part = am.ActMax(*(t[at:at + k] for t in act))
        out[layer] = (part, means[layer], am.top_activating(means[layer], top_k))
        at += k
    return out
