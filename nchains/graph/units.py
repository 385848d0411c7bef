"""Filter units of a traced CNN: a Conv2d with its BatchNorm2d and activation, a Linear with its
activation, and which Linear is the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import fx, nn

from nchains.graph.classify import _act_kind, _act_module, shape_of
from nchains.graph.conv_forward import attribute_conv, overrides_forward, resolve_conv

Node = fx.Node


@dataclass(eq=False)
class ConvUnit:
    """A filter layer: one Conv2d call, its sole eval-mode BatchNorm2d and sole activation.

    ``input_shape``/``output_shape`` are those of the unit's input (conv input) and output
    (after the activation, or the BN/conv when absent). ``nodes`` are the fx nodes
    conv[, bn][, act] in order; ``first``/``last`` are the conv node and the output node.

    The conv computes ``conv2d(pad(x, pre_pad), *params(gm), stride, padding, dilation,
    groups)``: ``pre_pad`` (left, right, top, bottom) is the asymmetric zero padding of a
    TensorFlow-style "same" conv (zeros otherwise), and :meth:`params` gives the weight and bias
    the conv really uses (a Conv2d subclass may transform its parameters in ``forward``; see
    :mod:`nchains.graph.conv_forward`). Every consumer (scored model, compact model) reads
    these, never the module's attributes.
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
    pre_pad: Tuple[int, int, int, int] = (0, 0, 0, 0)
    weight: Optional[torch.Tensor] = field(default=None, repr=False)
    bias: Optional[torch.Tensor] = field(default=None, repr=False)
    uses_bias: bool = True

    def params(self, gm: nn.Module) -> "ConvParams":
        """``(weight Tensor[C_out, C_in / groups, kH, kW], bias Tensor[C_out] or None)`` that the
        conv computes with: the effective ones read from its ``forward`` where they differ from
        the module's parameters, else the module's (``gm``: the analysed graph module)."""
        conv = gm.get_submodule(self.conv)
        weight = conv.weight if self.weight is None else self.weight
        bias = self.bias if self.bias is not None else (conv.bias if self.uses_bias else None)
        return ConvParams(weight, bias)


class ConvParams(NamedTuple):
    """The weight and bias a conv unit computes with (what :func:`fold_bn64` reads)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]


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


def _conv_call(conv: nn.Conv2d, node: Node):
    """The conv call of ``node``: from the attributes of an exact Conv2d, else from its
    forward run at the propagated input shape (a seeded random input: only sizes matter)."""
    call = None if overrides_forward(conv, nn.Conv2d) else attribute_conv(conv, node.target)
    if call is None:
        meta = node.args[0].meta["tensor_meta"]
        gen = torch.Generator(device=conv.weight.device).manual_seed(0)
        x = torch.randn(tuple(meta.shape), generator=gen, dtype=meta.dtype, device=conv.weight.device)
        call = resolve_conv(conv, node.target, x)
    return call


def _conv_unit(gm: fx.GraphModule, node: Node) -> ConvUnit:
    conv: nn.Conv2d = gm.get_submodule(node.target)
    call = _conv_call(conv, node)
    nodes, bn = [node], None
    user = _sole_user(node)
    if (user is not None and user.op == "call_module" and user.args[:1] == (node,)
            and isinstance(gm.get_submodule(user.target), nn.BatchNorm2d)
            and gm.get_submodule(user.target).running_mean is not None):
        nodes.append(user)
        bn = user.target
    last, act = _follow_act(gm, nodes[-1], nodes)
    inp = node.args[0]
    weight = conv.weight if call.weight is None else call.weight
    return ConvUnit(
        name=_call_key(node), label="", conv=node.target, bn=bn, act=act,
        in_channels=int(weight.shape[1]) * call.groups, out_channels=int(weight.shape[0]),
        groups=call.groups, kernel_size=tuple(weight.shape[2:]), stride=call.stride,
        padding=call.padding, dilation=call.dilation,
        input_shape=shape_of(inp), output_shape=shape_of(last), input=inp, first=node,
        last=last, nodes=tuple(nodes), consumers=tuple(last.users),
        act_module=_act_module(gm, last) if act else None, pre_pad=call.pre_pad,
        weight=call.weight, bias=call.bias, uses_bias=call.has_bias)


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
