"""Self-checks: a scored or compact model is compared with what it must reproduce before use.

- :func:`check_scored`: a fresh :class:`~nchains.instrument.scored_model.ScoredModel` (scores 1,
  gates opened to exactly ``G = 1``) against the original model (its traced graph);
- :func:`check_compact`: a compact model against the masked model it was built from (the
  chain's scores and gates), which itself passed :func:`check_scored`.

Both run one forward of each side on a small input (by default two seeded random images of
the analysed size, in the model's dtype and device), compare every unit's output in graph
order and raise a ``ValueError`` naming the first diverging unit and the largest difference.
The tolerance is relative to the compared values' magnitude and set by the dtype.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from nchains.graph.analysis import ModelGraph

#: Allowed max |difference| relative to the compared values' max magnitude, per dtype: far
#: above the rounding of folding BatchNorm (float64, then cast) through a deep network, far
#: below what a wrong padding, weight or region gives (differences of the values' order).
RTOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def example_input(graph: ModelGraph, dtype: torch.dtype, device: torch.device,
                  batch: int = 2) -> torch.Tensor:
    """Seeded random ``Tensor[batch, *graph.input_shape[1:]]`` (the check's default input)."""
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randn(batch, *graph.input_shape[1:], generator=gen, dtype=dtype, device=device)


def tolerance(values: torch.Tensor, other: torch.Tensor) -> float:
    """The largest |difference| accepted between ``values`` and ``other`` (same shape)."""
    scale = max(float(values.abs().max()), float(other.abs().max())) if values.numel() else 0.0
    rtol = RTOL.get(values.dtype, 1e-3)
    return rtol * scale + rtol * 1e-3


class _Recorder(fx.Interpreter):
    """Runs a graph module, keeping a copy of the values of the nodes named in ``keep``
    (copies: later in-place ops of the original model must not change them)."""

    def __init__(self, gm: fx.GraphModule, keep: Sequence[str]):
        super().__init__(gm)
        self.keep, self.values = set(keep), {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.keep and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach().clone()
        return out


def first_divergence(pairs: List[Tuple[str, Callable[[], Tuple[torch.Tensor, torch.Tensor]]]]
                     ) -> Optional[Tuple[str, float, float]]:
    """``(what, max |difference|, tolerance)`` of the first pair out of tolerance, else None;
    ``pairs`` are ``(what, () -> (got, expected))`` in graph order."""
    for what, get in pairs:
        got, want = get()
        if got.shape != want.shape:
            return what, float("inf"), 0.0
        diff = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
        tol = tolerance(got, want)
        if not diff <= tol:  # (NaN included)
            return what, diff, tol
    return None


def _outputs(got, want) -> List[Tuple[str, Callable]]:
    """Pairs for the model outputs (a tensor, or the tensors of a tuple/dict output)."""
    got_leaves, want_leaves = tree_leaves(got), tree_leaves(want)
    if len(got_leaves) != len(want_leaves):
        return [("model output", lambda: (torch.zeros(len(got_leaves)), torch.zeros(len(want_leaves))))]
    return [(f"model output {i}" if len(got_leaves) > 1 else "model output", lambda a=a, b=b: (a, b))
            for i, (a, b) in enumerate(zip(got_leaves, want_leaves))
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)]


def _run(recorder: "_Recorder", x: torch.Tensor):
    """``(output, None)``, or ``(None, message)`` when the model fails to run (e.g. a wrong
    padding makes shapes disagree downstream): the values recorded so far still localise it."""
    try:
        return recorder.run(x), None
    except Exception as exc:  # noqa: BLE001 - reported as the check's own error below
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _report(model: str, reference: str, found: Optional[Tuple[str, float, float]], error: Optional[str]) -> None:
    """The check's one-line ValueError, if the check failed."""
    if found is None and error is None:
        return
    head = f"self-check failed: the {model} does not reproduce the {reference}"
    if found is not None:
        what, diff, tol = found
        diff_text = "shapes differ" if diff == float("inf") else f"max |difference| {diff:.3g} (tolerance {tol:.3g})"
        head += f"; first diverging {what}: {diff_text}"
    if error is not None:
        head += f"; it fails to run: {error}"
    raise ValueError(head + ". This is a bug or an unsupported construct of the model: please report it "
                            "with the model")


def check_scored(sm: nn.Module, graph: ModelGraph, x: Optional[torch.Tensor] = None) -> None:
    """ValueError unless the freshly built scored model ``sm`` (scores 1) with every gate
    opened to ``G = 1`` computes what the original model computes, unit by unit.

    Its gate logits are set to ``200 T`` for the check (``sigmoid(200) == 1`` exactly in float32
    and float64) and restored after; nothing else is changed.

    Args:
        sm (ScoredModel): in soft mode, as built.
        graph (ModelGraph): the analysis it was built from (its graph module runs the original).
        x (Tensor[N, C, H, W] or None): input; default :func:`example_input`.
    """
    scores = sm.flat_scores
    x = example_input(graph, scores.dtype, scores.device) if x is None else x
    tagged = [n for n in sm.net.graph.nodes if n.meta.get("nchains_of")]
    order = {n.name: i for i, n in enumerate(graph.graph_module.graph.nodes)}
    tagged.sort(key=lambda n: order[n.meta["nchains_of"]])
    logits = sm.flat_gate_logits
    saved = logits.detach().clone()
    try:
        with torch.no_grad():
            logits.fill_(200.0 * sm.temperature)
            got = _Recorder(sm.net, [n.name for n in tagged])
            got_out, error = _run(got, x)
            want = _Recorder(graph.graph_module, [n.meta["nchains_of"] for n in tagged])
            want_out = want.run(x)
    finally:
        with torch.no_grad():
            logits.copy_(saved)
    label_of = graph.label_of

    def what(n: fx.Node) -> str:
        unit, gate = n.meta.get("nchains_unit"), n.meta.get("nchains_gate")
        name = unit if unit is not None else gate
        kind = "unit" if unit is not None else "gated region"
        return f"{kind} {label_of.get(name, name)} ({name!r})"

    pairs = [(what(n), lambda n=n: (got.values[n.name], want.values[n.meta["nchains_of"]]))
             for n in tagged if n.name in got.values]
    if error is None:
        pairs += _outputs(got_out, want_out)
    _report("scored model (scores 1, gates open)", "original model", first_divergence(pairs), error)


def check_compact(compact: fx.GraphModule, masked: nn.Module, graph: ModelGraph,
                  x: Optional[torch.Tensor] = None) -> None:
    """ValueError unless the compact model computes what the masked model computes, unit by
    unit: each unit's computed channels (``compact.nchains_taps``: unit -> (node name, original
    channels in the order the node holds them)) against the masked unit's output there.

    Args:
        compact (fx.GraphModule): the result of :func:`nchains.compact.compact`.
        masked (ScoredModel): the same chain as a hard scored model (``Chain.apply``).
        graph (ModelGraph): the analysis both were built from.
        x (Tensor[N, C, H, W] or None): input; default :func:`example_input`.
    """
    ref = next(masked.parameters(), None)
    ref = ref if ref is not None else next(masked.buffers())
    x = example_input(graph, ref.dtype, ref.device) if x is None else x
    taps: Dict[str, Tuple[str, List[int]]] = dict(getattr(compact, "nchains_taps", {}))
    names = [n for n in taps if n in masked._score_slices]
    seen: Dict[str, torch.Tensor] = {}
    handles = [masked.unit(n).register_forward_hook(
        lambda _m, _a, out, n=n: seen.__setitem__(n, out.detach().clone())) for n in names]
    try:
        with torch.no_grad():
            want_out = masked(x)
            got = _Recorder(compact, [taps[n][0] for n in names])
            got_out, error = _run(got, x)
    finally:
        for h in handles:
            h.remove()
    label_of = graph.label_of
    pairs = []
    for n in names:
        node, live = taps[n]
        if n in seen and node in got.values:
            pairs.append((f"unit {label_of.get(n, n)} ({n!r})",
                          lambda n=n, node=node, live=live: (got.values[node][:, :len(live)],
                                                             seen[n][:, torch.as_tensor(live, dtype=torch.long)])))
    if error is None:
        pairs += _outputs(got_out, want_out)
    _report("compact model", "masked model (chain.apply)", first_divergence(pairs), error)
