"""Graph analysis of a CNN: filter units, linears, residual adds, concats, gateable regions.

One mechanism for every architecture: the model is traced with :mod:`torch.fx` (standard
layers are leaves) and run once on an example input with
:class:`~torch.fx.passes.shape_prop.ShapeProp`. Module calls are read from
``node.meta["nn_module_stack"]``, so everything is keyed per call, not per module.

Example:
    >>> import torchvision
    >>> from nchains.analysis import analyze
    >>> g = analyze(torchvision.models.resnet50(), torch.randn(1, 3, 64, 64))
    >>> g.label_of["layer4.0.conv2"], len(g.regions), g.filters_total
    ('L4B1C2', 12, 26560)
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from . import _labels

Node = fx.Node

# ---- supported operations -------------------------------------------------------------

_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                  F.relu6: "relu6", F.silu: "silu", F.gelu: "gelu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ELEMENTWISE_MODULES = (nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid,
                        nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Softplus, nn.Identity,
                        nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                 nn.Upsample)
_LEAF_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.Flatten, *_ACT_MODULES,
               *_ELEMENTWISE_MODULES, *_POOL_MODULES)
_FUNCTIONS = {
    **{f: "add" for f in (operator.add, operator.iadd, torch.add)},
    **{f: "elementwise" for f in (
        operator.mul, operator.imul, operator.sub, operator.isub, operator.truediv,
        operator.itruediv, operator.neg, torch.mul, torch.sub, torch.div, torch.sigmoid,
        torch.tanh, torch.clamp, F.sigmoid, F.hardswish, F.hardsigmoid, F.hardtanh,
        F.leaky_relu, F.elu, F.mish, F.dropout, F.dropout2d)},
    **{f: "pool" for f in (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                           F.adaptive_max_pool2d, F.interpolate)},
    torch.flatten: "reshape", torch.reshape: "reshape", torch.cat: "concat", torch.mean: "mean",
    operator.getitem: "shape", getattr: "shape",
}
_METHODS = {
    "add": "add", "add_": "add", "view": "reshape", "reshape": "reshape", "flatten": "reshape",
    "size": "shape", "dim": "shape", "mean": "mean",
    **{m: "elementwise" for m in ("mul", "mul_", "sub", "sub_", "div", "div_", "sigmoid",
                                  "sigmoid_", "tanh", "clamp", "clamp_", "neg", "contiguous")},
}
_CHANNEL_PRESERVING = ("act", "elementwise", "add", "concat", "pool", "affine")
_SUPPORTED_TEXT = (
    "supported: Conv2d (zero padding), BatchNorm2d with running stats, Linear, parameter-free "
    "activations (ReLU, ReLU6, SiLU, GELU, ...), dropout, max/avg/adaptive pooling, flatten/"
    "view/reshape, spatial mean, residual add, torch.cat on channels, elementwise arithmetic")


def is_tensor(a) -> bool:
    """True for an fx node whose value (from shape propagation) is one tensor."""
    return isinstance(a, fx.Node) and isinstance(a.meta.get("tensor_meta"), TensorMetadata)


def shape_of(node: Node) -> Tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _where(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else "(root)"


def _unsupported(node: Node, what: str) -> ValueError:
    return ValueError(f"unsupported operation at module {_where(node)!r}: {what}; "
                      f"{_SUPPORTED_TEXT}")


def _act_kind(gm: fx.GraphModule, node: Node) -> Optional[str]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return next((k for t, k in _ACT_MODULES.items() if isinstance(module, t)), None)
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)
    return _ACT_METHODS.get(node.target) if node.op == "call_method" else None


def _act_module(gm: fx.GraphModule, node: Node) -> nn.Module:
    """A fresh, out-of-place module computing the activation of ``node``."""
    if node.op == "call_module":
        module = copy.deepcopy(gm.get_submodule(node.target))
        if hasattr(module, "inplace"):
            module.inplace = False
        return module
    kind = _act_kind(gm, node)
    if kind == "gelu":
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return nn.GELU(approximate=approximate)
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}[kind]()


def _explicit_padding(conv: nn.Conv2d, path: str) -> Tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise ValueError(f"unsupported Conv2d {path!r}: padding_mode={conv.padding_mode!r}; "
                         "only 'zeros' is supported")
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    if any(t % 2 for t in totals):
        raise ValueError(f"unsupported Conv2d {path!r}: padding='same' is asymmetric for "
                         f"kernel_size={conv.kernel_size}, dilation={conv.dilation}")
    return tuple(t // 2 for t in totals)


def _dims(arg, rank: int) -> Tuple[int, ...]:
    dims = (arg,) if isinstance(arg, int) else tuple(arg or ())
    return tuple(d % rank for d in dims)


def classify(gm: fx.GraphModule, node: Node) -> str:
    """Category of a call node: ``conv``, ``linear``, ``affine`` (standalone BN), ``act``,
    ``elementwise``, ``add`` (tensor + tensor, equal shapes), ``concat``, ``pool``,
    ``reshape``, ``shape`` (size queries), ``constant``.

    Raises:
        ValueError: naming the module path, for anything unsupported.
    """
    if node.op == "get_attr":
        value = _fetch(gm, node.target)
        if isinstance(value, nn.Parameter):
            raise _unsupported(node, f"parameter {node.target!r} is used directly (only the "
                                     "parameters of Conv2d, BatchNorm2d and Linear are supported)")
        return "constant"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Conv2d):
            return "conv"
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, nn.BatchNorm2d):
            if module.running_mean is None:
                raise _unsupported(node, f"BatchNorm2d {node.target!r} has no running stats")
            return "affine"
        if _act_kind(gm, node):
            return "act"
        if isinstance(module, _ELEMENTWISE_MODULES):
            return "elementwise"
        if isinstance(module, _POOL_MODULES):
            return "pool"
        if isinstance(module, nn.Flatten):
            return "reshape"
        n_params = sum(p.numel() for p in module.parameters())
        raise _unsupported(node, f"module {node.target!r} ({type(module).__name__}"
                                 f"{f', {n_params} parameters' if n_params else ''})")
    if _act_kind(gm, node):
        return "act"
    table = _FUNCTIONS if node.op == "call_function" else _METHODS
    try:
        kind = table.get(node.target)
    except TypeError:  # unhashable target
        kind = None
    name = getattr(node.target, "__name__", str(node.target))
    first = node.args[0] if node.args else None
    if kind == "add":
        first, second = _operands(node)
        both = is_tensor(first) and is_tensor(second) and node.kwargs.get("alpha", 1) == 1
        return "add" if both and shape_of(first) == shape_of(second) else "elementwise"
    if kind == "shape" and is_tensor(first) and name == "getitem":
        raise _unsupported(node, "tensor indexing/slicing")
    if kind == "reshape" and not (is_tensor(first) and shape_of(first)[:1] == shape_of(node)[:1]):
        raise _unsupported(node, f"{name} that changes the batch dimension")
    if kind == "mean":
        rank = len(shape_of(first))
        dims = _dims(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"), rank)
        if not dims or 0 in dims or 1 in dims:
            raise _unsupported(node, f"mean over dims {dims or 'all'} (only spatial means)")
        return "pool"
    if kind == "concat":
        rank = len(shape_of(node))
        dim = _dims(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank)
        if dim != (1,):
            raise _unsupported(node, f"torch.cat along dim {dim[0]} (only dim=1, channels)")
    if kind is None:
        raise _unsupported(node, f"{node.op} {name!r}")
    return kind


def _operands(node: Node) -> Tuple[object, object]:
    args = (*node.args, node.kwargs.get("other"))
    return args[0], args[1]


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj



@dataclass(eq=False)
class ConvUnit:
    """A filter layer: one Conv2d call, its sole eval-mode BatchNorm2d and sole activation.

    ``input_shape``/``output_shape`` are those of the unit's input (conv input) and output
    (after the activation, or the BN/conv when absent). ``nodes`` are the fx nodes
    conv[, bn][, act] in order; ``first``/``last`` are the conv node and the output node.
    """

    name: str
    label: str
    conv: str
    bn: Optional[str]
    act: Optional[str]
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    input: Node
    first: Node
    last: Node
    nodes: Tuple[Node, ...]
    consumers: Tuple[Node, ...]
    region: Optional[str] = None
    act_module: Optional[nn.Module] = field(default=None, repr=False)


@dataclass(eq=False)
class LinearUnit:
    """A Linear call and its sole activation; ``is_classifier`` marks the logits layer."""

    name: str
    label: str
    in_features: int
    out_features: int
    act: Optional[str]
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    input: Node
    first: Node
    last: Node
    nodes: Tuple[Node, ...]
    consumers: Tuple[Node, ...]
    is_classifier: bool = False
    act_module: Optional[nn.Module] = field(default=None, repr=False)


@dataclass(eq=False)
class Region:
    """A gateable region: ``out = G * f(x) + (1 - G) * x`` with ``x = input``, ``f(x) = output``.

    ``kind`` is ``"block"`` (a module call, e.g. a ResNet block) or ``"layer"`` (one unit).
    """

    name: str
    label: str
    kind: str
    input: Node
    output: Node
    units: Tuple[str, ...]
    shape: Tuple[int, ...]
    nodes: Tuple[Node, ...]


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

    def source_units(self, node: Node) -> Tuple[str, ...]:
        """Units whose output channels reach ``node`` through channel-preserving ops only
        (activations, elementwise ops, pools, residual adds, concats)."""
        producer = {u.last: n for n, u in {**self.layers, **self.linears}.items()}
        found, seen, stack = [], set(), [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in producer:
                found.append(producer[n])
            elif self.node_kinds.get(n) in _CHANNEL_PRESERVING:
                stack.extend(a for a in n.all_input_nodes if is_tensor(a))
        order = {n: i for i, n in enumerate({**self.layers, **self.linears})}
        return tuple(sorted(set(found), key=order.__getitem__))


class _ShapeProp(ShapeProp):
    current: Optional[Node] = None

    def run_node(self, n: Node):
        self.current = n
        return super().run_node(n)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAF_TYPES) or super().is_leaf_module(m, qualname)


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


def _call_key(node: Node) -> str:
    return next(reversed(node.meta["nn_module_stack"]))


def _sole_user(node: Node) -> Optional[Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _follow_act(gm: fx.GraphModule, cur: Node, nodes: List[Node]) -> Tuple[Node, Optional[str]]:
    user = _sole_user(cur)
    kind = _act_kind(gm, user) if user is not None and user.args[:1] == (cur,) else None
    if kind is None:
        return cur, None
    nodes.append(user)
    return user, kind


def _conv_unit(gm: fx.GraphModule, node: Node) -> ConvUnit:
    conv: nn.Conv2d = gm.get_submodule(node.target)
    nodes, bn = [node], None
    user = _sole_user(node)
    if (user is not None and user.op == "call_module" and user.args[:1] == (node,)
            and isinstance(gm.get_submodule(user.target), nn.BatchNorm2d)
            and gm.get_submodule(user.target).running_mean is not None):
        nodes.append(user)
        bn = user.target
    last, act = _follow_act(gm, nodes[-1], nodes)
    inp = node.args[0]
    return ConvUnit(
        name=_call_key(node), label="", conv=node.target, bn=bn, act=act,
        in_channels=conv.in_channels, out_channels=conv.out_channels, groups=conv.groups,
        kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),
        padding=_explicit_padding(conv, node.target), dilation=tuple(conv.dilation),
        input_shape=shape_of(inp), output_shape=shape_of(last), input=inp, first=node,
        last=last, nodes=tuple(nodes), consumers=tuple(last.users),
        act_module=_act_module(gm, last) if act else None)


def _linear_unit(gm: fx.GraphModule, node: Node) -> LinearUnit:
    lin: nn.Linear = gm.get_submodule(node.target)
    nodes = [node]
    last, act = _follow_act(gm, node, nodes)
    return LinearUnit(
        name=_call_key(node), label="", in_features=lin.in_features,
        out_features=lin.out_features, act=act, input_shape=shape_of(node.args[0]),
        output_shape=shape_of(last), input=node.args[0], first=node, last=last,
        nodes=tuple(nodes), consumers=tuple(last.users),
        act_module=_act_module(gm, last) if act else None)


@dataclass(eq=False)
class _Call:
    key: str
    path: str
    nodes: FrozenSet[Node]
    input: Optional[Node] = None
    output: Optional[Node] = None
    units: Tuple[str, ...] = ()


def _module_calls(gm: fx.GraphModule, leaf_nodes: set) -> List[_Call]:
    """Non-leaf, non-container module calls (candidates for block regions)."""
    members: Dict[str, Tuple[str, List[Node]]] = {}
    for node in gm.graph.nodes:
        for key, (path, _) in node.meta.get("nn_module_stack", {}).items():
            members.setdefault(key, (path, []))[1].append(node)
    calls = []
    for key, (path, nodes) in members.items():
        module = gm.get_submodule(path)
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        if len(nodes) == 1 and nodes[0] in leaf_nodes:
            continue
        calls.append(_Call(key, path, frozenset(nodes)))
    return calls


def _bind_region(call: _Call, layers: Dict[str, ConvUnit]) -> bool:
    """Fill ``call.input/output/units``; True when it is a one-in one-out same-shape call
    that contains at least one whole unit and cuts no unit."""
    inputs = {a for n in call.nodes for a in n.all_input_nodes
              if a not in call.nodes and a.op != "get_attr"}
    outputs = [n for n in call.nodes if any(u not in call.nodes for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    (inp,), (out,) = inputs, outputs
    if not (is_tensor(inp) and is_tensor(out)):
        return False
    a, b = inp.meta["tensor_meta"], out.meta["tensor_meta"]
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    units = []
    for name, unit in layers.items():
        inside = sum(n in call.nodes for n in unit.nodes)
        if inside and inside != len(unit.nodes):
            return False
        if inside:
            units.append(name)
    call.input, call.output, call.units = inp, out, tuple(units)
    return bool(units)


def _innermost(cands: List[_Call]) -> List[_Call]:
    def inside(o: _Call, c: _Call) -> bool:
        deeper = o.key.count(".") > c.key.count(".")
        return o.nodes <= c.nodes and (len(o.nodes) < len(c.nodes) or deeper)
    return [c for c in cands if not any(o is not c and inside(o, c) for o in cands)]


def _regions(gm: fx.GraphModule, layers: Dict[str, ConvUnit], kinds: Dict[Node, str],
             order: Dict[Node, int]) -> Dict[str, Region]:
    leaf_nodes = {n for n in gm.graph.nodes if n.op == "call_module"}
    calls = _module_calls(gm, leaf_nodes)
    blocks = _innermost([c for c in calls if _bind_region(c, layers)])
    # Units inside a residual module (e.g. a downsampling ResNet block) are gated with
    # their block when it is gateable and never as single layers, as in the paper.
    residual = [c for c in calls if any(kinds.get(n) == "add" for n in c.nodes)]
    regions = []
    for c in blocks:
        nodes = tuple(sorted(c.nodes, key=order.__getitem__))
        regions.append(Region(c.key, "", "block", c.input, c.output, c.units,
                              shape_of(c.output), nodes))
        for u in c.units:
            layers[u].region = c.key
    for name, u in layers.items():
        if (u.region is None and u.input_shape == u.output_shape
                and u.input.meta["tensor_meta"].dtype == u.last.meta["tensor_meta"].dtype
                and not any(u.first in c.nodes for c in residual)):
            u.region = name
            regions.append(Region(name, "", "layer", u.input, u.last, (name,),
                                  u.output_shape, u.nodes))
    regions.sort(key=lambda r: order[r.output])
    return {r.name: r for r in regions}


def _classifier(graph: fx.Graph, linears: Dict[str, LinearUnit]) -> Optional[str]:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    ancestors, stack = set(), list(out.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in ancestors:
            ancestors.add(n)
            stack.extend(n.all_input_nodes)
    names = [name for name, lin in linears.items() if lin.first in ancestors]
    return names[-1] if names else None


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
    prop = _ShapeProp(gm)
    try:
        # ShapeProp prints the traceback of a failing node; the ValueError below carries it.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(example_input)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ValueError(f"example_input of shape {tuple(example_input.shape)} could not run "
                         f"through the model at module {_where(prop.current)!r} "
                         f"({prop.current.format_node()}): {type(cause).__name__}: {cause}"
                         ) from exc
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
