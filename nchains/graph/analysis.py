"""Graph analysis of a CNN: filter units, linears, residual adds, concats, gateable regions.

One mechanism for every architecture: the model is traced with :mod:`torch.fx` (standard
layers are leaves) and run once on an example input with
:class:`~torch.fx.passes.shape_prop.ShapeProp`. Module calls are read from
``node.meta["nn_module_stack"]``, so everything is keyed per call, not per module.

This module traces, propagates shapes and assembles the :class:`ModelGraph`; the supported
operations are in :mod:`nchains.graph.classify`, filter units in :mod:`nchains.graph.units`,
gateable regions in :mod:`nchains.graph.regions` and the unit DAG in :mod:`nchains.graph.dag`
(their public names are re-exported here).

Example:
    >>> import torchvision
    >>> from nchains.graph.analysis import analyze
    >>> g = analyze(torchvision.models.resnet50(), torch.randn(1, 3, 64, 64))
    >>> g.label_of["layer4.0.conv2"], len(g.regions), g.filters_total
    ('L4B1C2', 12, 26560)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from nchains.graph import labels as _labels
from nchains.graph.aliases import redirect_mutated_readers
from nchains.graph.dag import UnitDAG, build_dag, walk_up
from nchains.graph.classify import _CHANNEL_PRESERVING, _operands, _where, classify, is_leaf, is_tensor, shape_of
from nchains.graph.regions import Region, _regions
from nchains.graph.units import ConvUnit, LinearUnit, _classifier, _conv_unit, _linear_unit

__all__ = ["ChannelConcat", "ConvUnit", "LinearUnit", "ModelGraph", "Region", "ResidualAdd", "UnitDAG",
           "analyze", "graph_for", "classify", "is_tensor", "shape_of"]

Node = fx.Node


@dataclass(eq=False)
class ResidualAdd:
    """A tensor + tensor add of equal shapes; ``producers[i]`` is the unit whose output is
    ``inputs[i]`` (None when the operand is not directly a unit output)."""

    node: Node
    inputs: Tuple[Node, Node]
    producers: Tuple[Optional[str], Optional[str]]
    shape: Tuple[int, ...]


@dataclass(eq=False)
class ChannelConcat:
    """A ``torch.cat`` along dim 1; ``channels[i]`` is the width of ``inputs[i]``."""

    node: Node
    inputs: Tuple[Node, ...]
    producers: Tuple[Optional[str], ...]
    channels: Tuple[int, ...]
    shape: Tuple[int, ...]


@dataclass(eq=False)
class ModelGraph:
    """Result of :func:`analyze`. Names are module paths (``@<k>`` suffix for the k-th
    repeated call of one module); labels are the papers' names (see :mod:`nchains._labels`).

    Attributes:
        graph_module (fx.GraphModule): traced model (shares modules with the model), with
            ``node.meta["tensor_meta"]`` from the example input.
        layers (dict name -> ConvUnit): filter layers in graph order.
        linears (dict name -> LinearUnit): Linear calls in graph order.
        regions (dict name -> Region): gateable regions in graph order; never nested.
        adds (list[ResidualAdd]), concats (list[ChannelConcat]).
        input_shape (tuple): shape of the example input.
        classifier (str or None): name of the Linear producing the logits.
        label_of (dict name -> label), layer_of_label (dict label -> name): for layers,
            linears and regions (a "layer" region shares its unit's name and label).
        node_kinds (dict Node -> str): category of every node (see :func:`classify`).
        dag (UnitDAG): producers, consumers and topological order of the units (cached).

    A ModelGraph is read-only to its users: the scored model and the compact model write new
    graphs and copy the modules they change, so one analysis serves ``extract``,
    ``Chain.apply``, ``compact`` and ``export`` (pass it as ``graph=``).
    """

    graph_module: fx.GraphModule
    layers: Dict[str, ConvUnit]
    linears: Dict[str, LinearUnit]
    regions: Dict[str, Region]
    adds: List[ResidualAdd]
    concats: List[ChannelConcat]
    input_shape: Tuple[int, ...]
    classifier: Optional[str]
    label_of: Dict[str, str]
    layer_of_label: Dict[str, str]
    node_kinds: Dict[Node, str] = field(repr=False)

    def __repr__(self) -> str:
        return (f"ModelGraph(layers={len(self.layers)}, linears={len(self.linears)}, "
                f"regions={len(self.regions)}, adds={len(self.adds)}, concats={len(self.concats)}, "
                f"filters_total={self.filters_total}, classifier={self.classifier!r})")

    @property
    def filters_total(self) -> int:
        """Number of conv filters (output channels summed over all conv units)."""
        return sum(u.out_channels for u in self.layers.values())

    def filter_label(self, layer: str, index: int) -> str:
        """Label of filter ``index`` of ``layer``: ``('layer4.0.conv2', 48)`` -> ``'L4B1C2_48'``."""
        unit = self.layers.get(layer) or self.linears.get(layer)
        if unit is None:
            raise ValueError(f"layer must be one of the analysed layers, got {layer!r}")
        width = unit.out_channels if isinstance(unit, ConvUnit) else unit.out_features
        if not 0 <= int(index) < width:
            raise ValueError(f"index must be in [0, {width}) for layer {layer!r}, got {index!r}")
        return _labels.filter_label(self.label_of[layer], index)

    def filter_of_label(self, label: str) -> Tuple[str, int]:
        """Inverse of :meth:`filter_label`: ``'L4B1C2_48'`` -> ``('layer4.0.conv2', 48)``."""
        layer_label, index = _labels.split_filter_label(label)
        if layer_label not in self.layer_of_label:
            raise ValueError(f"label {label!r} names no layer of this model")
        return self.layer_of_label[layer_label], index

    @functools.cached_property
    def dag(self) -> UnitDAG:
        """Producers, consumers and topological order of the conv and linear units (built on
        first use, then cached; see :mod:`nchains.graph.dag` for what "adjacent" means)."""
        return build_dag(self.graph_module, self.units, self.node_kinds)

    @property
    def units(self) -> Dict[str, Union[ConvUnit, LinearUnit]]:
        """Conv units then linear units, by name (a new dict; the units are shared)."""
        return {**self.layers, **self.linears}

    @functools.cached_property
    def _unit_of_last(self) -> Dict[Node, str]:
        return {u.last: n for n, u in self.units.items()}

    @functools.cached_property
    def _unit_rank(self) -> Dict[str, int]:
        return {n: i for i, n in enumerate(self.units)}

    def source_units(self, node: Node) -> Tuple[str, ...]:
        """Units whose output channels reach ``node`` through channel-preserving ops only
        (activations, elementwise ops, pools, residual adds, concats); unlike :attr:`dag`, a
        flatten or reshape stops the walk."""
        found, _ = walk_up([node], self._unit_of_last, lambda n: self.node_kinds.get(n) in _CHANNEL_PRESERVING)
        return tuple(sorted(set(found), key=self._unit_rank.__getitem__))

    def cpu_copy(self) -> "ModelGraph":
        """A copy of this analysis on the CPU: its graph module holds CPU copies of the model's
        parameters and buffers, and every unit, region, add and concat points at the copy's
        nodes. The model is not touched (a model on an accelerator is never copied there)."""
        gm = self.graph_module
        memo: Dict[int, object] = {}
        for t in [*gm.parameters(), *gm.buffers()]:
            cpu = t.detach().to("cpu", copy=True)
            memo[id(t)] = nn.Parameter(cpu, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else cpu
        new_gm = copy.deepcopy(gm, memo).to("cpu")
        # fx copies nodes by graph order (keyed by node, not by id): map them for the rest
        nodes = {id(a): b for a, b in zip(gm.graph.nodes, new_gm.graph.nodes)}
        return copy.deepcopy(self, {id(gm): new_gm, **nodes})

    def check_belongs(self, model: nn.Module, input_shape: Sequence[int], dtype: Optional[torch.dtype] = None,
                      arg: str = "graph") -> "ModelGraph":
        """ValueError unless this graph was analysed from ``model`` (its traced modules are
        ``model``'s own) on inputs of shape ``[N, *input_shape]`` (and ``dtype``); returns self.

        Args:
            model (nn.Module): the model the caller is about to use the graph with.
            input_shape (sequence of int): ``[C, H, W]`` of the caller's inputs.
            dtype (torch.dtype): the caller's input dtype, when it must match.
            arg (str): the argument name for the message.
        """
        gm = self.graph_module
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            try:
                same = model.get_submodule(node.target) is gm.get_submodule(node.target)
            except AttributeError:
                same = False
            if not same:
                raise ValueError(f"{arg} was not analysed from this model: its module {node.target!r} is not "
                                 f"the model's (pass graph=None, or nchains.analyze(model, example) of this model)")
        if list(self.input_shape[1:]) != [int(d) for d in input_shape]:
            raise ValueError(f"{arg} was analysed on inputs of shape {list(self.input_shape[1:])}, expected "
                             f"{[int(d) for d in input_shape]} (pass graph=None, or analyse the model on the "
                             "right input shape)")
        meta = gm.graph.find_nodes(op="placeholder")[0].meta.get("tensor_meta")
        if dtype is not None and isinstance(meta, TensorMetadata) and meta.dtype != dtype:
            raise ValueError(f"{arg} was analysed on {meta.dtype} inputs, expected {dtype} (the model's dtype "
                             "changed since; pass graph=None)")
        return self


class _ShapeProp(ShapeProp):
    current: Optional[Node] = None

    def run_node(self, n: Node):
        self.current = n
        return super().run_node(n)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_leaf(m) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        stack = list(tracer.module_stack.values())
        at = stack[-1][0] if stack else "(root)"
        raise ValueError(f"model could not be traced by torch.fx: {type(exc).__name__}: {exc} "
                         f"at module {at!r}") from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _check_trace(model: nn.Module, example_input: torch.Tensor, traced_out) -> None:
    """ValueError unless the traced graph computes what ``model`` computes on the example.

    Every rewrite (scored, compact, exported models) is built from the trace, and their
    self-checks compare with it; a trace that is not the model (``keep = y; y += f(y)`` traces
    as an out-of-place add, data-dependent Python branches are frozen) must stop here."""
    if example_input.device.type == "meta":  # shapes only: there are no values to compare
        return
    with torch.no_grad():
        want = model(example_input.clone())
    pairs = [(want, traced_out)] if isinstance(want, torch.Tensor) else list(
        zip(want, traced_out)) if isinstance(want, (tuple, list)) and isinstance(traced_out, (tuple, list)) else []
    for w, t in pairs:
        if not (isinstance(w, torch.Tensor) and isinstance(t, torch.Tensor) and w.is_floating_point()):
            continue
        scale = float(w.abs().max()) if w.numel() else 0.0
        diff = float((w - t).abs().max()) if w.shape == t.shape else float("inf")
        tol = (1e-9 if w.dtype == torch.float64 else 1e-4) * max(scale, 1.0)
        if not diff <= tol:
            raise ValueError(f"model's torch.fx trace does not compute what the model computes (max |difference| "
                             f"{diff:.3g} on the example input): an in-place update read through an alias "
                             "(keep = y; y += ...) or a branch on tensor values cannot be traced; write it "
                             "out-of-place")


def analyze(model: nn.Module, example_input: torch.Tensor) -> ModelGraph:
    """Analyse a CNN for scoring, gating, contributions and export.

    Puts ``model`` in eval mode (BatchNorm is folded with its running statistics).

    Args:
        model (nn.Module): the CNN; must be traceable by :func:`torch.fx.symbolic_trace`.
        example_input (Tensor[N, C, H, W]): one input batch, used for shape propagation.

    Returns:
        ModelGraph.

    Raises:
        TypeError: on a wrong argument type.
        ValueError: when the model cannot be traced, cannot run on ``example_input``, or
            uses an op that is not supported (the message names the module path).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a Tensor[N, C, H, W], "
                        f"got {type(example_input).__name__}")
    model.eval()
    gm = _trace(model)
    redirect_mutated_readers(gm)  # rewrites that make in-place ops out-of-place stay exact
    prop = _ShapeProp(gm)
    try:
        # ShapeProp prints the traceback of a failing node; the ValueError below carries it.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            traced_out = prop.propagate(example_input.clone())
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ValueError(f"example_input of shape {tuple(example_input.shape)} could not run "
                         f"through the model at module {_where(prop.current)!r} "
                         f"({prop.current.format_node()}): {type(cause).__name__}: {cause}"
                         ) from exc
    _check_trace(model, example_input, traced_out)
    kinds = {n: classify(gm, n) for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    layers: Dict[str, ConvUnit] = {}
    linears: Dict[str, LinearUnit] = {}
    for node, kind in kinds.items():
        if kind == "conv":
            unit = _conv_unit(gm, node)
            layers[unit.name] = unit
        elif kind == "linear":
            lin = _linear_unit(gm, node)
            linears[lin.name] = lin
    regions = _regions(gm, layers, kinds, order)
    classifier = _classifier(gm.graph, linears)
    if classifier is not None:
        linears[classifier].is_classifier = True

    producer = {u.last: n for n, u in {**layers, **linears}.items()}
    adds, concats = [], []
    for node, kind in kinds.items():
        if kind == "add":
            a, b = _operands(node)
            adds.append(ResidualAdd(node, (a, b), (producer.get(a), producer.get(b)),
                                    shape_of(node)))
        elif kind == "concat":
            ins = tuple(node.args[0])
            concats.append(ChannelConcat(node, ins, tuple(producer.get(a) for a in ins),
                                         tuple(shape_of(a)[1] for a in ins), shape_of(node)))

    entries = ([(n, "conv") for n in layers] + [(n, "linear") for n in linears]
               + [(r.name, "block") for r in regions.values() if r.kind == "block"])
    label_of = _labels.make_labels(model, entries)
    for name, item in [*layers.items(), *linears.items()]:
        item.label = label_of[name]
    for r in regions.values():
        r.label = label_of[r.name]
    layer_of_label = {label: name for name, label in label_of.items()}
    meta = gm.graph.find_nodes(op="placeholder")[0].meta.get("tensor_meta")
    input_shape = tuple((meta if isinstance(meta, TensorMetadata) else example_input).shape)
    return ModelGraph(gm, layers, linears, regions, adds, concats, input_shape, classifier,
                      label_of, layer_of_label, kinds)


def graph_for(model: nn.Module, input_shape: Sequence[int], graph: Optional[ModelGraph] = None, *,
              example: Optional[torch.Tensor] = None, arg: str = "graph") -> ModelGraph:
    """The analysis an entry point works on: ``graph`` when given (checked to be ``model``'s,
    at ``input_shape``, in the model's dtype), else :func:`analyze` on ``example`` (default:
    zeros ``[1, *input_shape]`` on the model's device, in its dtype). Puts ``model`` in eval mode.

    Raises:
        TypeError: when ``graph`` is not a ModelGraph or None.
        ValueError: when ``graph`` belongs to another model, input shape or dtype.
    """
    from nchains._util.device import example_input, model_device_dtype

    model.eval()
    if graph is None:
        return analyze(model, example if example is not None else example_input(model, input_shape))
    if not isinstance(graph, ModelGraph):
        raise TypeError(f"{arg} must be a ModelGraph (nchains.analyze) or None, got {type(graph).__name__}")
    return graph.check_belongs(model, input_shape, model_device_dtype(model)[1], arg=arg)
