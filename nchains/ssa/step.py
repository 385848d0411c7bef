"""STEP 1 of step-wise sensitivity analysis: the relevance of a lower unit's channels to the
neurons of an upper unit, for a batch of images, in one batched vector-Jacobian product.

Adjacency rule (the unit DAG, :mod:`nchains.graph.dag`): the lower layers of a unit ``U`` are
its *producers* -- the conv and linear units whose output reaches ``U``'s input through no
other unit (activations, BatchNorm, pools, flatten, residual adds and channel concats are
walked through). One step is the partial derivative of ``U``'s responses with respect to the
producers' outputs **with every other unit's output held at its value**: the step graph
(:func:`step_graph`) replaces each producer's output by a detached leaf tensor, so autograd
traverses only the ops between the producers and ``U`` (``U``'s own conv, BN and activation
included) and never a path through another unit. Consequences:

- a pooling layer between two convs is skipped (STEP 1.3 of the paper): the relevance is
  taken directly with respect to the conv below the pool;
- on a residual add ``relu(a + b)`` both operands' units are lower layers of the consumer, each
  differentiated with the other held fixed; a block's input that arrives through the identity
  shortcut is the unit that produced it (the previous block's last conv, or its shortcut);
- a concat's branches are lower layers of the concat's consumers, each for its own channels.

Neurons and responses: an upper neuron of a linear unit is one output feature (the logit, for
the classifier: pre-softmax). An upper neuron of a conv unit is one channel of its output
(after BN and activation when the unit has them); its response is the channel's spatial mean
(``response="mean"``, default) or its spatial maximum (``"max"``; the gradient of a max goes to
its arg-max positions). The paper does not say which; the mean is what the spatial averaging
of the lower side mirrors. Relevance of a lower unit: the gradient w.r.t. a linear unit's
output as is (a vector); w.r.t. a conv unit's output averaged over its spatial positions, one
value per channel (STEP 1.1 and 1.2).

Efficiency: the step graph runs only the nodes up to ``U`` (dead code is removed), the model's
parameters enter it detached (nothing below the leaves is recorded for autograd), and the VJP
of all upper neurons at once is one ``torch.autograd.grad(..., is_grads_batched=True)`` call with
one-hot seeds (in neuron chunks bounded by :data:`GRAD_BUDGET_BYTES`).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import fx

from nchains.graph.analysis import ConvUnit, ModelGraph
from nchains.instrument.taps import Site, tap

__all__ = ["GRAD_BUDGET_BYTES", "RESPONSES", "response_of", "step_graph", "step_relevance"]

#: ``response`` options: how an upper conv channel's map becomes one number.
RESPONSES = ("mean", "max")
#: Upper bound on one batched gradient (neurons x images x lower unit size); more neurons are
#: split into several VJPs of the same graph.
GRAD_BUDGET_BYTES = 256 * 2**20


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """A producer's output as a leaf of autograd: what is below it is not differentiated."""
    return x.detach().requires_grad_(True)


def _site(graph: ModelGraph, name: str) -> Site:
    unit = graph.units[name]
    call = name.partition("@")[2]
    return Site(name, name, int(call) if call else 0, unit.label, tuple(unit.output_shape), unit.last)


def step_graph(graph: ModelGraph, upper: str, lowers: Sequence[str]) -> fx.GraphModule:
    """A copy of the traced model computing ``upper``'s output from leaf copies of ``lowers``.

    Args:
        graph (ModelGraph): from :func:`nchains.analyze`.
        upper (str): a unit name.
        lowers (sequence of str): units whose outputs become leaves (``graph.dag.producers(upper)``).

    Returns:
        fx.GraphModule mapping images Tensor[N, *input_shape] to ``(out, {lower: leaf})``:
        ``out`` is ``upper``'s output (Tensor[N, C, H, W] or Tensor[N, F]) as a function of the
        leaves, each leaf ``lower``'s output (detached, ``requires_grad``). Nodes after
        ``upper`` are not computed.
    """
    lowers = list(lowers)
    gm = tap(graph, [_site(graph, n) for n in (*lowers, upper)])
    g = gm.graph
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    values = dict(out.args[0][1])
    stop = {values[name] for name in lowers}
    segment, stack = set(), [values[upper]]
    while stack:  # the nodes between the producers and ``upper``
        node = stack.pop()
        if node not in segment and node not in stop:
            segment.add(node)
            stack.extend(node.all_input_nodes)
    # the segment is copied to read the leaves; the prefix keeps the originals, so nothing
    # below the leaves is recorded even where the segment and the prefix share a node
    leaves = {}
    for name in lowers:
        with g.inserting_before(out):
            leaves[name] = g.call_function(_leaf, (values[name],))
    env = {values[name]: leaves[name] for name in lowers}
    for node in [n for n in g.nodes if n in segment and n.op not in ("placeholder", "get_attr")]:
        with g.inserting_before(out):
            env[node] = g.node_copy(node, lambda a: env.get(a, a))
    g.erase_node(out)
    g.output((env[values[upper]], leaves))
    g.eliminate_dead_code()
    gm.recompile()
    return gm


def response_of(out: torch.Tensor, neurons: torch.Tensor, response: str) -> torch.Tensor:
    """Responses of chosen neurons of a unit's output.

    Args:
        out (Tensor[N, C, H, W] or Tensor[N, F]): the unit's output.
        neurons (Tensor[m], int64): channel (or feature) indices.
        response (str): ``"mean"`` or ``"max"`` over the spatial positions (conv outputs only).

    Returns:
        Tensor[N, m].
    """
    picked = out.index_select(1, neurons)
    if picked.dim() == 2:
        return picked
    if picked.dim() != 4:
        raise ValueError(f"unit outputs must be Tensor[N, C, H, W] or Tensor[N, F], got shape {tuple(out.shape)}")
    return picked.mean((2, 3)) if response == "mean" else picked.amax((2, 3))


def _reduce(grad: torch.Tensor) -> torch.Tensor:
    """Tensor[m, N, C, H, W] -> spatial mean Tensor[m, N, C]; Tensor[m, N, F] as is."""
    if grad.dim() == 5:
        return grad.mean((3, 4))
    if grad.dim() == 3:
        return grad
    raise ValueError(f"unit outputs must be Tensor[N, C, H, W] or Tensor[N, F], got gradient shape "
                     f"{tuple(grad.shape[1:])}")


def _detached_params(gm: fx.GraphModule) -> Dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in gm.named_parameters()}


def step_relevance(gm: fx.GraphModule, images: torch.Tensor, neurons: Sequence[int], response: str = "mean"
                   ) -> Dict[str, torch.Tensor]:
    """The relevance ``omega[n, i, k] = d response_n / d lower_k`` at every image (Eq. 4).

    Args:
        gm (fx.GraphModule): from :func:`step_graph`.
        images (Tensor[N, *input_shape]): on the model's device, in its dtype.
        neurons (sequence of int): upper neurons, m of them.
        response (str): see :func:`response_of`.

    Returns:
        dict lower -> Tensor[m, N, K] (K channels or features of the lower unit; conv gradients
        averaged over space), detached.
    """
    idx = torch.as_tensor(list(neurons), dtype=torch.long, device=images.device)
    with torch.enable_grad():
        out, leaves = torch.func.functional_call(gm, _detached_params(gm), (images,), strict=False)
        r = response_of(out, idx, response)  # [N, m]
        names, inputs = list(leaves), list(leaves.values())
        per_neuron = sum(t[0].numel() for t in inputs) * len(images) * out.element_size()
        step = max(1, min(len(idx), GRAD_BUDGET_BYTES // max(1, per_neuron)))
        eye = torch.eye(len(idx), dtype=r.dtype, device=r.device)
        parts: List[Tuple[torch.Tensor, ...]] = []
        for start in range(0, len(idx), step):
            seeds = eye[start:start + step, None, :].expand(-1, len(images), -1)  # [s, N, m]
            more = start + step < len(idx)
            grads = torch.autograd.grad(r, inputs, grad_outputs=seeds, is_grads_batched=True,
                                        retain_graph=more, allow_unused=True, materialize_grads=True)
            parts.append(tuple(_reduce(g).detach() for g in grads))
    return {name: torch.cat([p[j] for p in parts]) for j, name in enumerate(names)}
