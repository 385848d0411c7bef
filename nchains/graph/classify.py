"""Which fx nodes the analysis supports, and the category of each (:func:`classify`).

The tables below list the supported modules, functions and methods; anything else raises a
``ValueError`` naming the module path. Also the activation and padding helpers that units are
read with (:mod:`nchains._units`).
"""

from __future__ import annotations

import copy
import operator
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from nchains._util.paths import fetch
from nchains.graph.conv_forward import overrides_forward

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
    "supported: Conv2d (zero padding, also a subclass padding with zeros in forward), BatchNorm2d with running stats, Linear, parameter-free "
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


def is_leaf(module: nn.Module) -> bool:
    """True for a module the tracer keeps as one call: a Conv2d (exact or a subclass: a
    subclass's own ``forward`` is read by :func:`nchains.graph.conv_forward.resolve_conv`, never
    assumed from its attributes) or an exact instance of the other supported layer types. A
    subclass of those that replaces ``forward`` is traced through, so its real ops are seen."""
    if isinstance(module, nn.Conv2d):
        return True
    base = next((t for t in _LEAF_TYPES if isinstance(module, t)), None)
    return base is not None and not overrides_forward(module, base)


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
        value = fetch(gm, node.target)
        if isinstance(value, nn.Parameter):
            stack = node.meta.get("nn_module_stack") or {}
            owner = next(reversed(stack.values()))[1] if stack else None  # (path, class) of the caller
            owner = owner if isinstance(owner, type) else None
            base = next((t for t in _LEAF_TYPES if owner is not None and issubclass(owner, t)), None)
            why = (f" by {owner.__name__}, a {base.__name__} subclass with its own forward "
                   f"(its attributes need not describe it; only Conv2d subclasses are read from their "
                   f"forward)") if base is not None else ""
            raise _unsupported(node, f"parameter {node.target!r} is used directly{why} (only the "
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
