"""In-place ops in a traced graph: make every later reader of a mutated tensor read the op's result.

``y.add_(b)`` whose result is dropped, ``F.relu(y, inplace=True)`` as a statement, or
``identity = x; x += 1`` then ``identity`` used: in the traced graph the later users of ``y``
(``x``) point at the node *before* the mutation. Run as traced that is harmless (both names are
one tensor), but every rewrite that makes in-place ops out-of-place (the scored model, the compact
model, per-call taps) would then read the stale value. :func:`redirect_mutated_readers` points
those users at the in-place node itself, which changes nothing when the graph runs as traced
(the in-place op returns the tensor it mutated) and makes the out-of-place rewrites exact.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul, torch.relu_, F.relu_}


def _inplace_flag(node: fx.Node) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    try:
        names = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return False
    if "inplace" in names:
        i = names.index("inplace")
        return len(node.args) > i and node.args[i] is True
    return False


def mutates_first_argument(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node`` writes into its first argument (and returns it)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or _inplace_flag(node)
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def redirect_mutated_readers(gm: fx.GraphModule) -> int:
    """Point every user of a tensor that comes after an in-place op on it at that op's node.

    Args:
        gm (fx.GraphModule): a traced model; its graph is edited, its code recompiled.

    Returns:
        int: the number of uses redirected.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    moved = 0
    for node in list(gm.graph.nodes):
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node) or not mutates_first_argument(gm, node):
            continue
        for user in [u for u in target.users if u is not node and order[u] > order[node]]:
            user.replace_input_with(target, node)
            moved += 1
    if moved:
        gm.recompile()
    return moved
