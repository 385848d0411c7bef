"""Segments of the traced model: the sub-graph from chosen sites to the model output.

A method that perturbs one site's activation (integrated gradients scales it, ablation zeroes a
channel) only has to re-run what lies *downstream* of the site. :func:`segment` cuts that
suffix out of the traced model as an fx GraphModule whose inputs are

- the values at the chosen *input* nodes (the sites), and
- the *frontier*: the values of nodes that are not downstream of the inputs but that
  downstream nodes read, e.g. a residual skip computed before the site, or the model input
  read by a later layer.

The frontier is computed once from the images (:meth:`Segment.prefix`, one forward of the
prefix, or :func:`values_at` for many segments in one forward); :meth:`Segment.run` then takes
any batch of rows built from those images, ``index[r]`` naming the image row ``r`` belongs to,
so S scaled copies of a site's activation run through the suffix in one batched call.

In-place ops are made out-of-place exactly as :func:`nchains.instrument.taps.tap` does (the
same helper), so a site's value is what the rest of the forward consumes.

Example:
    >>> graph = nchains.analyze(model, images[:1])
    >>> site = sites(graph)[5]
    >>> seg = segment(graph, [site])
    >>> (a,), frontier = seg.prefix(images)               # a: Tensor[N, C, H, W]
    >>> index = torch.arange(len(images)).repeat(3)       # rows: 3 copies of each image
    >>> out = seg.run([torch.cat([0.5 * a, a, 2 * a])], frontier, index)   # Tensor[3N, K]
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import fx, nn

from nchains.graph.analysis import ModelGraph
from nchains.instrument.taps import Site, _check_sites, _functionalize

__all__ = ["Segment", "segment", "segments", "values_at"]

Node = fx.Node


def _functional_copy(graph: ModelGraph) -> Tuple[fx.Graph, Dict[Node, Node], Dict[str, object]]:
    """An out-of-place copy of the traced graph: (graph, original node -> copy node, modules)."""
    new, env = fx.Graph(), {}
    new.output(new.graph_copy(graph.graph_module.graph, env))
    owned = _functionalize(new, graph.graph_module)
    return new, env, owned


def _downstream(graph: fx.Graph, starts: Set[Node]) -> Set[Node]:
    """``starts`` and every node that reads one of them, transitively (graph order is topological)."""
    down = set(starts)
    for node in graph.nodes:
        if node not in down and any(a in down for a in node.all_input_nodes):
            down.add(node)
    return down


def values_at(graph: ModelGraph, nodes: Sequence[Node]) -> fx.GraphModule:
    """A GraphModule mapping the model input to the list of the values of ``nodes``.

    Only what those values need is computed (dead code removed); in-place ops are out-of-place,
    so each value is the one the node had, never overwritten later in the forward.

    Args:
        graph (ModelGraph): from :func:`nchains.analyze`.
        nodes (sequence of fx.Node): nodes of ``graph.graph_module.graph``.

    Returns:
        fx.GraphModule: ``Tensor[N, *input_shape]`` -> list (same order as ``nodes``).
    """
    new, env, owned = _functional_copy(graph)
    new.erase_node(next(n for n in new.nodes if n.op == "output"))
    new.output([env[n] for n in nodes])
    return _pruned(fx.GraphModule(owned, new, class_name=f"Prefix{type(graph.graph_module).__name__}"))


def _pruned(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` without the nodes its output does not need (fx's purity check needs the module)."""
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class Segment(nn.Module):
    """The suffix of a traced model from its input sites to its output (see :func:`segment`).

    Attributes:
        inputs (tuple of Site): the sites whose values are fed, in the order :meth:`run` takes them.
        frontier_nodes (tuple of fx.Node): nodes of ``graph.graph_module.graph`` whose values
            the suffix also reads, in graph order.
        batched (tuple of bool): per frontier node, whether its value depends on the images
            (has their batch dimension) and is therefore indexed by row in :meth:`run`;
            parameters-only constants are passed as they are.
        module (fx.GraphModule): ``(*input values, *frontier values) -> output``.
    """

    def __init__(self, graph: ModelGraph, inputs: Sequence[Site], frontier_nodes: Sequence[Node],
                 batched: Sequence[bool], module: fx.GraphModule):
        super().__init__()
        self.graph = graph
        self.inputs = tuple(inputs)
        self.frontier_nodes = tuple(frontier_nodes)
        self.batched = tuple(batched)
        self.module = module

    def __repr__(self) -> str:
        return (f"Segment(inputs={[s.key for s in self.inputs]}, frontier={[n.name for n in self.frontier_nodes]})")

    def prefix(self, images: torch.Tensor) -> Tuple[List[torch.Tensor], List[object]]:
        """One forward of the prefix: (the input sites' values, the frontier values) at ``images``.

        Args:
            images (Tensor[N, *input_shape]): the model's inputs.

        Returns:
            (list of Tensor[N, *site shape], list of frontier values) for :meth:`run`.
        """
        nodes = [s.node for s in self.inputs] + list(self.frontier_nodes)
        values = values_at(self.graph, nodes)(images)
        return list(values[:len(self.inputs)]), list(values[len(self.inputs):])

    def row_elements(self) -> int:
        """Elements the suffix computes per row (per image), from the analysis' shapes: what one
        row of :meth:`run` costs in memory, to size its batches."""
        batch = max(1, int(self.graph.input_shape[0]))
        total = 0
        for node in self.module.graph.nodes:
            meta = node.meta.get("tensor_meta")
            if node.op not in ("placeholder", "output", "get_attr") and hasattr(meta, "shape"):
                total += math.prod(meta.shape) // batch
        return max(1, total)

    def rows(self, frontier: Sequence[object], index: Optional[torch.Tensor]) -> List[object]:
        """The frontier values for a batch of rows: row ``r`` gets image ``index[r]``'s values
        (``index`` None: the frontier as computed, one row per image)."""
        if index is None:
            return list(frontier)
        out = []
        for node, v, b in zip(self.frontier_nodes, frontier, self.batched):
            if b and not isinstance(v, torch.Tensor):
                # e.g. x.size(0) taken before the site: it would describe N images, not the rows
                raise ValueError(f"the suffix reads {node.name!r}, a value computed from the images before the "
                                 f"site that is not a tensor ({type(v).__name__}); it cannot be re-indexed to "
                                 "other rows: run with index=None (one row per image)")
            out.append(v.index_select(0, index) if b else v)
        return out

    def forward(self, inputs: Sequence[torch.Tensor], frontier: Sequence[object],
                index: Optional[torch.Tensor] = None):
        """The model output computed from the input sites' values.

        Args:
            inputs (sequence of Tensor[R, *site shape]): a value per input site; row ``r`` is a
                (possibly modified) activation of image ``index[r]``.
            frontier (sequence): the frontier values of the N images (:meth:`prefix`).
            index (LongTensor[R] or None): the image of each row, in ``[0, N)``; None when the
                rows are the N images themselves.

        Returns:
            What the model (or the chosen outputs) returns, with R rows.
        """
        if len(inputs) != len(self.inputs) or len(frontier) != len(self.frontier_nodes):
            raise ValueError(f"Segment takes {len(self.inputs)} input values and {len(self.frontier_nodes)} "
                             f"frontier values, got {len(inputs)} and {len(frontier)}")
        return self.module(*inputs, *self.rows(frontier, index))

    run = forward


def _suffix_graph(new: fx.Graph, starts: List[Node], outputs: Optional[Dict[str, Node]]
                  ) -> Tuple[fx.Graph, List[Node]]:
    """The suffix graph of ``new`` (placeholders: ``starts`` then the frontier) and the frontier.

    Walks up from the output: a start stops the walk (it is fed), a node not downstream of the
    starts is frontier (its value is fed), parameters are read as they are; only what the output
    needs is copied, so no dead-code pass (and no second compile) is needed."""
    out_node = next(n for n in new.nodes if n.op == "output")
    down = _downstream(new, set(starts))
    needed_out = out_node.args[0] if outputs is None else outputs
    keep: Set[Node] = set()
    fed: Set[Node] = set(starts)
    stack: List[Node] = []
    fx.node.map_arg(needed_out, stack.append)
    while stack:
        node = stack.pop()
        if node in keep or node in fed:
            continue
        if node.op == "get_attr" or node in down:
            keep.add(node)
            stack.extend(node.all_input_nodes)
        else:
            fed.add(node)
    frontier = [n for n in new.nodes if n in fed and n not in starts]
    suffix, env = fx.Graph(), {}
    for i, n in enumerate(starts):
        env[n] = suffix.placeholder(f"site_{i}")
    for i, n in enumerate(frontier):
        env[n] = suffix.placeholder(f"frontier_{i}")
    for node in new.nodes:
        if node in keep:
            env[node] = suffix.node_copy(node, env.__getitem__)
    suffix.output(fx.node.map_arg(needed_out, env.__getitem__))
    return suffix, frontier


def segment(graph: ModelGraph, inputs: Sequence[Site], outputs: Optional[Sequence[Site]] = None) -> Segment:
    """The sub-graph of the traced model from ``inputs`` to the model output (or to ``outputs``).

    A node downstream of several inputs reads each input's fed value; a node that only feeds
    the inputs is not run. Parameters and buffers are the model's own (shared, not copied).

    Args:
        graph (ModelGraph): from :func:`nchains.analyze`.
        inputs (sequence of Site): sites of ``graph`` (:func:`nchains.instrument.taps.sites`).
        outputs (sequence of Site or None): return these sites' values (a dict key -> Tensor)
            instead of the model's output.

    Returns:
        Segment.

    Raises:
        TypeError, ValueError: on a site that is not a Site of ``graph``, repeated keys, no
            inputs, or an output that is not downstream of any input.
    """
    return segments(graph, [inputs], outputs)[0]


def segments(graph: ModelGraph, inputs: Sequence[Sequence[Site]], outputs: Optional[Sequence[Site]] = None
             ) -> List[Segment]:
    """:func:`segment` for each list of input sites in ``inputs``, from one out-of-place copy of
    the traced graph (one segment per site of a network costs one copy, not one per site)."""
    if not isinstance(graph, ModelGraph):
        raise TypeError(f"graph must be a ModelGraph from nchains.analyze, got {type(graph).__name__}")
    checked = [_check_sites(graph, ins) for ins in inputs]
    if not checked or not all(checked):
        raise ValueError("inputs must name at least one site, got none")
    outs = None if outputs is None else _check_sites(graph, outputs)
    new, env, owned = _functional_copy(graph)
    back = {v: k for k, v in env.items()}
    from_images = _downstream(new, set(new.find_nodes(op="placeholder")))
    out = []
    for ins in checked:
        starts = [env[s.node] for s in ins]
        out_nodes = None
        if outs is not None:
            down = _downstream(new, set(starts))
            for s in outs:
                if env[s.node] not in down:
                    raise ValueError(f"outputs: site {s.key!r} is not downstream of the inputs "
                                     f"{[x.key for x in ins]}; it does not depend on them")
            out_nodes = {s.key: env[s.node] for s in outs}
        suffix, frontier = _suffix_graph(new, starts, out_nodes)
        module = fx.GraphModule(owned, suffix, class_name=f"Segment{type(graph.graph_module).__name__}")
        out.append(Segment(graph, ins, [back[n] for n in frontier], [n in from_images for n in frontier], module))
    return out
