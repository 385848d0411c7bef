"""Facts about the aten ops of a program: names, bound arguments, which ones nchains handles."""

from __future__ import annotations

import math
import operator
from typing import Any, Dict, Optional, Tuple

import torch
from torch import fx


def _opname(node: fx.Node) -> Optional[str]:
    """``aten.relu_.default`` -> ``"relu"`` (in-place ops map to their functional form)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = target._schema.name.split("::", 1)[1]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _bind(node: fx.Node) -> Dict[str, Any]:
    """Schema argument name -> value (node or literal), defaults filled in."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if not arg.kwarg_only and i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def _pair(v) -> Tuple[int, ...]:
    v = (v,) if isinstance(v, int) else tuple(v)
    return v * 2 if len(v) == 1 else v


_WEIGHTED = ("conv2d", "convolution", "_convolution", "batch_norm",
             "_native_batch_norm_legit_no_training", "native_batch_norm", "linear")
_TUPLE_OPS = ("_native_batch_norm_legit_no_training", "native_batch_norm",
              "max_pool2d_with_indices", "adaptive_max_pool2d")
_IDENTITY = ("clone", "alias", "detach", "lift_fresh_copy", "lift_fresh")
_VIEW_OPS = frozenset("""view reshape _unsafe_view flatten squeeze unsqueeze permute transpose t
    expand expand_as view_as slice select alias detach as_strided unfold diagonal narrow split
    split_with_sizes chunk unbind""".split())
_PY_OPERATORS = {getattr(operator, n) for n in
                 ("add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne",
                  "lt", "le", "gt", "ge", "getitem")}
_PY_OPERATORS |= {torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min, math.floor,
                  math.ceil}

_SUPPORTED = ("supported: conv2d, batch_norm (eval), linear, relu/relu6/hardtanh/silu/gelu/"
              "sigmoid/tanh/leaky_relu/elu/hardswish/hardsigmoid/mish/softplus, max/avg/adaptive "
              "pooling, dropout, flatten/view/reshape, add/sub/mul/div, cat, mean/sum, squeeze/"
              "unsqueeze, transpose/permute, softmax, pad, interpolate")


def _first_arg(n: fx.Node) -> str:
    return n.target._schema.arguments[0].name


def _unsafe_mutation(graph: fx.Graph) -> bool:
    """True when rewriting an in-place op as its functional form could change a result (the
    mutated value is a graph input, a view, or an alias of it is read after the mutation)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        schema = n.target._schema
        if not schema.is_mutable:
            continue
        first = schema.arguments[0] if schema.arguments else None
        if (not schema.name.endswith("_") or first is None or first.alias_info is None
                or not first.alias_info.is_write
                or any(a.alias_info is not None and a.alias_info.is_write
                       for a in schema.arguments[1:])):
            return True
        a = n.args[0]
        if not isinstance(a, fx.Node) or a.op != "call_function" or _opname(a) in _VIEW_OPS:
            return True
        family, todo = {a}, [a]
        while todo:
            for u in todo.pop().users:
                if u is not n and u not in family and _opname(u) in _VIEW_OPS:
                    family.add(u)
                    todo.append(u)
        if any(order[u] > order[n] for m in family for u in m.users
               if u is not n and u not in family):
            return True
    return False
