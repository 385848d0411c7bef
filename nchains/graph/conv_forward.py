"""What a Conv2d really computes: read from its attributes when it is an exact
``torch.nn.Conv2d``, else from its own ``forward`` run once at the analysed input size.

A Conv2d subclass with its own ``forward`` (TensorFlow-style "same" padding computed from the
input size, a static ``nn.ZeroPad2d``, weight standardisation, ...) stays one fx leaf, so the
Python control flow of its ``forward`` never meets an fx proxy. Instead its ``forward`` is
traced at the ATen level (:func:`torch.fx.experimental.proxy_tensor.make_fx`) on an input of
the shape shape propagation found, where every size is a plain int. The supported form is::

    x -> [constant_pad_nd(value 0)]* -> convolution(x, W, b) -> output

with ``W`` and ``b`` computed from parameters and constants only (never from ``x``). ``W`` and
``b`` are then evaluated once, in the parameters' dtype exactly as the ``forward`` computes
them (weights are frozen), and the zero padding becomes the unit's padding (its symmetric part)
plus a pre-pad (the asymmetric rest). Anything else is refused with a one-line ``ValueError``
naming the module. The sizes are those of the analysed input: the spatial size a chain records
(``chain.input_shape``) fixes them for every later use; only the batch size varies.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

_aten = torch.ops.aten
# Data-path ops that do not change values (make_fx may record them around a pad or the conv).
_PASS = (_aten.alias.default, _aten.detach.default, _aten.clone.default)
_SUPPORTED = ("supported: zero padding (F.pad / nn.ZeroPad2d, static or computed from the input "
              "size) before one F.conv2d whose weight and bias are computed from parameters only")


class ConvCall(NamedTuple):
    """One conv as it runs: ``conv2d(pad(x, pre_pad), weight, bias, stride, padding, dilation,
    groups)``. ``weight``/``bias`` are None where the module's own parameter is used as is;
    ``pre_pad`` is ``(left, right, top, bottom)`` zeros, as :func:`torch.nn.functional.pad`."""

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    has_bias: bool
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    pre_pad: Tuple[int, int, int, int]


def overrides_forward(module: nn.Module, base: type) -> bool:
    """True when ``type(module)`` replaces ``base``'s forward (or, for a Conv2d, the
    ``_conv_forward`` it calls): then the module's attributes need not describe its output."""
    cls = type(module)
    if cls.forward is not base.forward:
        return True
    return base is nn.Conv2d and cls._conv_forward is not nn.Conv2d._conv_forward


def _refuse(path: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(f"unsupported conv at module {path!r} ({type(module).__name__}): its forward "
                      f"{why}; {_SUPPORTED}")


def _split_pad(padding: Tuple[int, int], pad: Tuple[int, int, int, int]):
    """Symmetric part of ``pad`` (left, right, top, bottom) into the conv's ``padding`` (h, w);
    the rest stays a pre-pad."""
    left, right, top, bottom = pad
    sym_w, sym_h = min(left, right), min(top, bottom)
    return ((padding[0] + sym_h, padding[1] + sym_w),
            (left - sym_w, right - sym_w, top - sym_h, bottom - sym_h))


def _pad_of(node: fx.Node, path: str, module: nn.Module) -> Tuple[int, int, int, int]:
    pad = list(node.args[1])
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)
    if value != 0 or len(pad) not in (2, 4) or any(p < 0 for p in pad):
        raise _refuse(path, module, f"pads with value {value!r} and sizes {pad} (only non-negative "
                                    "zero padding of the two spatial dims is exact here)")
    return tuple(int(p) for p in (pad + [0, 0])[:4])


def _data_path(gm: fx.GraphModule, path: str, module: nn.Module):
    """``(conv node, summed pre-pad)`` of the supported form, else a refusal."""
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    dependent = {x}
    for n in gm.graph.nodes:
        if n.op != "output" and any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
    convs = [n for n in dependent if n.target is _aten.convolution.default]
    if len(convs) != 1:
        raise _refuse(path, module, f"runs {len(convs)} convolutions on its input (exactly one is supported)")
    (conv,) = convs
    pad, cur = (0, 0, 0, 0), conv.args[0]
    if any(a in dependent for a in conv.args[1:3]):
        raise _refuse(path, module, "computes the conv weight or bias from its input")
    while cur is not x:
        if cur.target is _aten.constant_pad_nd.default:
            pad = tuple(a + b for a, b in zip(pad, _pad_of(cur, path, module)))
        elif cur.target not in _PASS:
            raise _refuse(path, module, f"computes {cur.target} on its input before the conv")
        cur = cur.args[0]
    result = out.args[0]
    while result is not conv:
        if not isinstance(result, fx.Node) or result.target not in _PASS:
            what = getattr(result, "target", type(result).__name__)
            raise _refuse(path, module, f"computes {what} after the conv")
        result = result.args[0]
    extra = dependent - {x, conv, out} - set(_chain(conv.args[0], x)) - set(_chain(out.args[0], conv))
    if extra:
        raise _refuse(path, module, f"also computes {sorted(str(n.target) for n in extra)[:3]} from its input")
    return conv, pad


def _chain(node, stop: fx.Node):
    """Nodes from ``node`` up its first arguments to ``stop`` (excluded)."""
    while isinstance(node, fx.Node) and node is not stop:
        yield node
        node = node.args[0] if node.args else None


class _Capture(fx.Interpreter):
    """Runs the ATen graph and keeps the conv's weight and bias values."""

    def __init__(self, gm: fx.GraphModule, conv: fx.Node):
        super().__init__(gm)
        self.conv, self.values = conv, None

    def run_node(self, n: fx.Node):
        if n is self.conv:
            self.values = tuple(self.env.get(a) if isinstance(a, fx.Node) else a for a in n.args[1:3])
        return super().run_node(n)


def resolve_conv(module: nn.Conv2d, path: str, x: torch.Tensor) -> ConvCall:
    """What ``module(x)`` computes, as one conv call (see the module docstring).

    Args:
        module (nn.Conv2d): a Conv2d subclass with its own ``forward``.
        path (str): its module path, for messages.
        x (Tensor[N, C, H, W]): an input of the analysed shape, dtype and device.

    Raises:
        ValueError: naming ``path`` when the forward is not of the supported form.
    """
    try:
        with torch.no_grad():
            gm = make_fx(lambda t: module(t))(x)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is a refusal
        raise _refuse(path, module, f"could not be traced at the ATen level ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    conv, pad = _data_path(gm, path, module)
    _, _, _, stride, padding, dilation, transposed, _, groups = conv.args
    if transposed or len(stride) != 2:
        raise _refuse(path, module, "runs a transposed or non-2-d convolution")
    capture = _Capture(gm, conv)
    with torch.no_grad():
        capture.run(x)
    weight, bias = capture.values
    padding, pre_pad = _split_pad(tuple(int(p) for p in padding), pad)
    own_w = weight.data_ptr() == module.weight.data_ptr() and weight.stride() == module.weight.stride()
    own_b = bias is None or (module.bias is not None and bias.data_ptr() == module.bias.data_ptr())
    return ConvCall(None if own_w else weight.detach().clone(), None if own_b else bias.detach().clone(),
                    bias is not None, tuple(int(s) for s in stride), padding, tuple(int(d) for d in dilation),
                    int(groups), pre_pad)


def attribute_conv(conv: nn.Conv2d, path: str) -> Optional[ConvCall]:
    """The conv call an exact ``nn.Conv2d`` makes, from its attributes; None when its
    ``padding="same"`` is asymmetric (then :func:`resolve_conv` reads the padding it runs)."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"unsupported Conv2d {path!r}: padding_mode={conv.padding_mode!r}; "
                         "only 'zeros' is supported")
    padding = conv.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        if any(t % 2 for t in totals):
            return None
        padding = tuple(t // 2 for t in totals)
    return ConvCall(None, None, conv.bias is not None, tuple(conv.stride), tuple(padding),
                    tuple(conv.dilation), conv.groups, (0, 0, 0, 0))
