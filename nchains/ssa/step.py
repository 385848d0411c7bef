"""STEP 1 of step-wise sensitivity analysis: the relevance of a lower unit's channels to the
neurons of an upper unit, for a batch of images, in one batched backward.

Adjacency rule (the unit DAG, :mod:`nchains.graph.dag`): the lower layers of a unit ``U`` are
its *producers* -- the conv and linear units whose output reaches ``U``'s input through no
other unit (activations, BatchNorm, pools, flatten, residual adds and channel concats are
walked through). One step is the partial derivative of ``U``'s responses with respect to the
producers' outputs **with every other unit's output held at its value**: the step graph
(:func:`step_graph`) takes the producers' outputs as inputs (leaves of autograd) and holds only
the ops between them and ``U`` (``U``'s own conv, BN and activation included), never a path
through another unit. Consequences:

- a pooling layer between two convs is skipped (STEP 1.3 of the paper): the relevance is
  taken directly with respect to the conv below the pool;
- on a residual add ``relu(a + b)`` both operands' units are lower layers of the consumer, each
  differentiated with the other held fixed (so both get the same relevance); a block's input
  that arrives through the identity shortcut is the unit that produced it (the previous block's
  last conv, or its shortcut);
- a concat's branches are lower layers of the concat's consumers, each for its own channels.

Neurons and responses: an upper neuron of a linear unit is one output feature (the logit, for
the classifier: pre-softmax). An upper neuron of a conv unit is one channel of its output
(after BN and activation when the unit has them); its response is the channel's spatial mean
(``response="mean"``, default) or its spatial maximum (``"max"``; the gradient of a max goes to
its arg-max positions). The paper does not say which; the mean is what the spatial averaging
of the lower side mirrors. Relevance of a lower unit: the gradient w.r.t. a linear unit's
output as is (a vector); w.r.t. a conv unit's output averaged over its spatial positions, one
value per channel (STEP 1.1 and 1.2).

Efficiency: the producers' outputs come from one forward of the model (:func:`prefix_graph`,
without autograd), the step graph runs only the segment between them and ``U``, and the VJP of
all upper neurons and images at once is one backward (:func:`step_relevance`; in neuron chunks
bounded by :data:`GRAD_BUDGET_BYTES`).

Narrowed steps: where the upper unit's own ops are exactly the analysed unit, each chosen
neuron computes only its own channel of it, forward and backward (:mod:`nchains.ssa.narrow`:
the rule, the method and the measurements); elsewhere the full computation above.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import fx

from nchains.graph.analysis import ModelGraph
from nchains.instrument.taps import Site, tap

__all__ = ["GRAD_BUDGET_BYTES", "RESPONSES", "prefix_graph", "response_of", "step_graph", "step_relevance"]

#: ``response`` options: how an upper conv channel's map becomes one number.
RESPONSES = ("mean", "max")
#: Upper bound on the stacked copies of one backward (neurons x images x the producers' size,
#: times :data:`_SEGMENT_FACTOR` for the segment's own tensors); more neurons take several.
GRAD_BUDGET_BYTES = 512 * 2**20
_SEGMENT_FACTOR = 4


def _site(graph: ModelGraph, name: str) -> Site:
    unit = graph.units[name]
    call = name.partition("@")[2]
    return Site(name, name, int(call) if call else 0, unit.label, tuple(unit.output_shape), unit.last)


def _tapped(graph: ModelGraph, names: Sequence[str]) -> Tuple[fx.GraphModule, fx.Node, Dict[str, fx.Node]]:
    """A functionalised copy of the traced model (:func:`~nchains.instrument.taps.tap`), its
    output node and the copy's node of each unit in ``names``."""
    gm = tap(graph, [_site(graph, n) for n in names])
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return gm, out, dict(out.args[0][1])


def prefix_graph(graph: ModelGraph, names: Sequence[str]) -> fx.GraphModule:
    """A copy of the traced model that stops once the units ``names`` are computed.

    Returns:
        fx.GraphModule mapping images Tensor[N, *input_shape] to ``{name: unit output}``.
    """
    gm, out, values = _tapped(graph, list(names))
    g = gm.graph
    g.erase_node(out)
    g.output({n: values[n] for n in names})
    g.eliminate_dead_code()
    gm.recompile()
    return gm


def _segment(gm: fx.GraphModule, values: Dict[str, fx.Node], lowers: Sequence[str], out: fx.Node,
             class_name: str) -> fx.GraphModule:
    """The nodes of ``gm`` between the producers ``lowers`` and ``out``, as a graph
    ``forward(images, *lower_outputs) -> out``."""
    stop = {values[name] for name in lowers}
    segment, stack = set(), [out]
    while stack:
        node = stack.pop()
        if node not in segment and node not in stop:
            segment.add(node)
            stack.extend(node.all_input_nodes)
    new = fx.Graph()
    env = {}
    for node in gm.graph.nodes:  # the model input keeps its place as the first argument
        if node.op == "placeholder":
            env[node] = new.placeholder(node.name)
    for name in lowers:
        env[values[name]] = new.placeholder(f"lower_{len(env)}")
    for node in gm.graph.nodes:
        if node in segment and node.op != "placeholder":
            env[node] = new.node_copy(node, lambda a: env[a])
    new.output(env[out])
    return fx.GraphModule(gm, new, class_name=class_name)


def step_graph(graph: ModelGraph, upper: str, lowers: Sequence[str]) -> fx.GraphModule:
    """The ops between the producers ``lowers`` and unit ``upper`` (``upper``'s own included),
    as a graph that reads the producers' outputs.

    Args:
        graph (ModelGraph): from :func:`nchains.analyze`.
        upper (str): a unit name.
        lowers (sequence of str): ``graph.dag.producers(upper)``.

    Returns:
        fx.GraphModule ``forward(images, *lower_outputs) -> upper output`` (Tensor[N, C, H, W]
        or Tensor[N, F]); ``images`` is read only where the model input reaches ``upper``
        without passing a unit. Any path through another unit is cut: it reaches ``upper``
        only through one of ``lowers`` (the DAG's rule), whose output is an input here. Its
        attribute ``narrow`` is a :class:`~nchains.ssa.narrow.NarrowTail` where ``upper``'s own
        ops are the narrowable tail of :mod:`nchains.ssa.narrow` (:func:`step_relevance` then computes only
        each neuron's own channel of ``upper``), else None.
    """
    from nchains.ssa.narrow import NarrowTail, narrow_tail

    lowers = list(lowers)
    gm, _, values = _tapped(graph, [*lowers, upper])
    step = _segment(gm, values, lowers, values[upper], "SSAStep")
    stop = [values[name] for name in lowers]
    tail = narrow_tail(graph, graph.units[upper], values[upper])
    step.narrow = None
    if tail is not None and tail[0].op != "placeholder":  # a unit reading the images has no producers
        direct = stop.index(tail[0]) if tail[0] in stop else None
        head = _segment(gm, values, lowers, tail[0], "SSAStepHead")
        step.narrow = NarrowTail(head, len(lowers), direct, *tail[1:])
    return step


def response_of(out: torch.Tensor, neurons: torch.Tensor, response: str) -> torch.Tensor:
    """Responses of a unit's neurons, one neuron per copy of the images.

    Args:
        out (Tensor[s * N, C, H, W] or Tensor[s * N, F]): the unit's output on ``s`` stacked
            copies of N images.
        neurons (Tensor[s], int64): the channel (or feature) copy ``j`` answers for.
        response (str): ``"mean"`` or ``"max"`` over the spatial positions (conv outputs only).

    Returns:
        Tensor[s, N]: ``response(out[j * N + i, neurons[j]])``.
    """
    if out.dim() not in (2, 4):
        raise ValueError(f"unit outputs must be Tensor[N, C, H, W] or Tensor[N, F], got shape {tuple(out.shape)}")
    s = len(neurons)
    picked = out.reshape(s, len(out) // s, *out.shape[1:])[torch.arange(s, device=out.device), :, neurons]
    if picked.dim() == 2:
        return picked
    return picked.mean((2, 3)) if response == "mean" else picked.amax((2, 3))


def _reduce(grad: torch.Tensor) -> torch.Tensor:
    """Tensor[m, N, C, H, W] -> spatial mean Tensor[m, N, C]; Tensor[m, N, F] as is."""
    if grad.dim() == 5:
        return grad.mean((3, 4))
    if grad.dim() == 3:
        return grad
    raise ValueError(f"unit outputs must be Tensor[N, C, H, W] or Tensor[N, F], got gradient shape "
                     f"{tuple(grad.shape[1:])}")


def _repeat(t: torch.Tensor, s: int) -> torch.Tensor:
    return t.detach().repeat(s, *([1] * (t.dim() - 1)))


def step_relevance(step: fx.GraphModule, images: torch.Tensor, lower_outputs: Dict[str, torch.Tensor],
                   neurons: Sequence[int], response: str = "mean", narrow: bool = True) -> Dict[str, torch.Tensor]:
    """The relevance ``omega[n, i, k] = d response_n / d lower_k`` at every image (Eq. 4).

    Full computation: all neurons and images in one backward: the segment runs on ``s``
    stacked copies of the batch, copy ``j`` answering for neuron ``j`` (its response is summed
    over the images: images and copies do not interact in an eval-mode CNN), so one
    ``torch.autograd.grad`` gives every ``(neuron, image)`` gradient. Measured on three steps of
    the shipped model (50 images, 2 CPU cores) this took 0.22-0.95 s where one-hot seeds with
    ``is_grads_batched=True`` (vmap over the backward of the whole segment, every channel of
    the upper unit) took 1.1-2.0 s and one backward per neuron 0.38-0.75 s (faster on one step,
    slower on two). Where the step has a :class:`~nchains.ssa.narrow.NarrowTail` (``step.narrow``,
    :mod:`nchains.ssa.narrow`'s rule) neuron ``j`` computes only channel ``neurons[j]`` of the upper unit,
    forward and backward, and only the head's backward is batched. ``s`` is bounded so that
    the copies stay under :data:`GRAD_BUDGET_BYTES` (several backwards otherwise).

    Args:
        step (fx.GraphModule): from :func:`step_graph` (its ``lowers`` in this dict's order).
        images (Tensor[N, *input_shape]): on the model's device, in its dtype.
        lower_outputs (dict name -> Tensor[N, ...]): the producers' outputs on ``images``
            (:func:`prefix_graph`).
        neurons (sequence of int): upper neurons, m of them.
        response (str): see :func:`response_of`.
        narrow (bool): use ``step.narrow`` where there is one (False: every copy computes
            every channel of the upper unit; the same relevance up to rounding).

    Returns:
        dict lower -> Tensor[m, N, K] (K channels or features of the lower unit; conv gradients
        averaged over space), detached.
    """
    idx = torch.as_tensor(list(neurons), dtype=torch.long, device=images.device)
    names, values = list(lower_outputs), list(lower_outputs.values())
    tail = getattr(step, "narrow", None) if narrow else None
    tail = tail if tail is not None and tail.usable else None
    n = len(images)
    per_copy = (sum(v.numel() for v in values) + images.numel()) * images.element_size() * _SEGMENT_FACTOR
    chunk = max(1, min(len(idx), GRAD_BUDGET_BYTES // max(1, per_copy)))
    parts: List[Tuple[torch.Tensor, ...]] = []
    with torch.enable_grad():
        for start in range(0, len(idx), chunk):
            sel = idx[start:start + chunk]
            if tail is not None:
                parts.append(tail.relevance(images, values, sel, response))
                continue
            copies = [_repeat(v, len(sel)).requires_grad_(True) for v in values]
            resp = response_of(step(_repeat(images, len(sel)), *copies), sel, response)
            grads = torch.autograd.grad(resp.sum(), copies, allow_unused=True, materialize_grads=True)
            parts.append(tuple(_reduce(g.reshape(len(sel), n, *g.shape[1:])) for g in grads))
    return {name: torch.cat([p[j] for p in parts]) for j, name in enumerate(names)}
