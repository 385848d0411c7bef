"""The compact sub-network of a chain: pruned filters physically removed, plain PyTorch ops only.

:func:`compact` rewrites the model's traced fx graph (the same :class:`~nchains.analysis.ModelGraph`
the scored model is built from) into a smaller graph that computes exactly what the masked model
``chain.apply(model)`` computes. Per fx node it tracks a *channel state*:

- ``live``: the original channels (dim 1) that are physically present, in ascending order;
- ``const``: the batch-independent value of every other channel (``Tensor[C, *rest]``, zero at
  live positions). A removed filter's map is ``act(0)``; a BatchNorm, bias or padding downstream
  can turn it into a nonzero constant or a fixed spatial map, which is carried forward exactly
  and folded into consumers (a conv's or linear's bias, or a bias map when zero padding makes
  the contribution vary at the borders). So a layer without live inputs never runs;
- ``pad``: with ``channel_multiple > 1``, the number of exactly-zero channels that follow the
  live ones in the tensor, bringing its channel count to a whole number of blocks.

Each conv keeps its own filter set. A residual add keeps the union of its operands' live
channels; an operand carrying a subset is added with ``index_add`` instead of forcing all
producers of the stream to share one channel set. Concats concatenate live channels only.
Grouped and depthwise convs keep their grouping (groups with no live filters or inputs are
dropped; uneven groups are padded with zero-weight channels).

This module walks the graph and handles the channel-preserving ops; residual adds, concats and
reshapes are in :mod:`nchains.compact.joins`, the channel state and graph-writing primitives in
:mod:`nchains.compact.emit`, the conv and linear units in :mod:`nchains.compact.units`.

Example:
    >>> chain = nchains.extract(model, images)
    >>> small = compact(chain, model)
    >>> torch.allclose(small(images), chain.apply(model)(images), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.utils import _pair

from nchains.compact.emit import _detached, _nonzero, _State
from nchains.compact.joins import _JoinBuilder
from nchains.compact.units import _slice_bn
from nchains._util.device import full_precision, model_device_dtype
from nchains.graph.analysis import ConvUnit, ModelGraph, graph_for, is_tensor
from nchains.neurochains.chain import Chain
from nchains.instrument.scored_model import _out_of_place
from nchains.instrument.self_check import check_compact

__all__ = ["compact"]


class _Builder(_JoinBuilder):
    """Builds the compact fx graph from a ModelGraph and per-layer scores and gates: the walk
    and the channel-preserving ops (joins: :mod:`nchains.compact.joins`)."""

    # ---- graph walk ----------------------------------------------------------------------

    def build(self) -> fx.GraphModule:
        graph = self.graph
        kinds = graph.node_kinds
        units = {u.first: u for u in [*graph.layers.values(), *graph.linears.values()]}
        inner = {n for u in units.values() for n in u.nodes[1:]}
        removed = [r for name, r in graph.regions.items() if self.gates.get(name, 1) == 0]
        removed_nodes = {n for r in removed for n in r.nodes}
        removed_out = {r.output: r for r in removed}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if self.input is not None:
                    raise ValueError("model must take one input tensor, got several placeholders")
                self.input = self.g.placeholder(node.name)
                self.batch = self.g.call_method("size", (self.input, 0))
                c, *rest = node.meta["tensor_meta"].shape[1:]
                self.env[node] = _State(self.input, list(range(c)), torch.zeros(c, *rest, dtype=self.dtype))
            elif node.op == "output":
                self.g.output(fx.node.map_arg(node.args[0], lambda n: self.value(n, full=True)))
            elif node in removed_out:
                self.env[node] = self.env[removed_out[node].input]
            elif node.op == "get_attr":
                self.env[node] = self.g.get_attr(self._copy_attr(node.target))
            elif node in removed_nodes or node in inner:
                continue
            elif node in units:
                unit = units[node]
                out = self.conv_unit(unit) if isinstance(unit, ConvUnit) else self.linear_unit(unit)
                self.env[unit.last] = out
            else:
                self.env[node] = self.op(node, kinds[node])
        gm = fx.GraphModule(self.root, self.g, class_name="CompactNet")
        gm.graph.eliminate_dead_code()
        used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
        for name in [n for n, _ in gm.named_children() if n not in used]:
            delattr(gm, name)
        for name in [n for n, _ in gm.named_buffers(recurse=False) if n not in used]:
            delattr(gm, name)
        gm.recompile()
        return gm

    def _copy_attr(self, target: str) -> str:
        obj = self.gm
        for atom in target.split("."):
            obj = getattr(obj, atom)
        name = self._name(target)
        if isinstance(obj, torch.Tensor):
            self.root.register_buffer(name, obj.detach().clone())
        else:
            setattr(self.root, name, copy.deepcopy(obj))
        return name

    def value(self, node, full: bool = False):
        """The new-graph value of an original node (a fully materialised tensor for states)."""
        v = self.env[node]
        if isinstance(v, _State):
            return self.full(v) if full else v
        return v

    # ---- generic ops -----------------------------------------------------------------------

    def op(self, node: fx.Node, kind: str):
        states = [a for a in node.all_input_nodes if isinstance(self.env.get(a), _State)]
        if not states:  # shape queries and constants only
            return self.copy(node, full=True)
        if kind == "add" and len(states) == 2:
            return self.residual_add(node)
        if kind == "concat":
            return self.concat(node)
        if kind == "reshape":
            return self.reshape(node)
        if kind in ("act", "elementwise", "pool", "affine") and len(node.all_input_nodes) == 1 \
                and node.args and node.args[0] is states[0]:
            return self.channelwise(node, kind)
        return self.fallback(node)

    def copy(self, node: fx.Node, full: bool) -> fx.Node:
        new = self.g.node_copy(node, lambda n: self.value(n, full=full))
        if node.op == "call_module":
            new.target = self.module(_detached(self.gm.get_submodule(node.target)), node.target)
        _out_of_place(new)
        return new

    def fallback(self, node: fx.Node):
        """Any other op: runs on fully materialised inputs; its output is fully live."""
        new = self.copy(node, full=True)
        meta = node.meta.get("tensor_meta")
        if not is_tensor(node) or len(meta.shape) < 2:
            return new
        c, *rest = meta.shape[1:]
        return _State(new, list(range(c)), torch.zeros(c, *rest, dtype=self.dtype))

    def _evaluate(self, node: fx.Node, x: torch.Tensor) -> torch.Tensor:
        """The original op on a concrete input ``x`` (its only tensor input)."""
        args = fx.node.map_arg(node.args, lambda n: x)
        kwargs = fx.node.map_arg(node.kwargs, lambda n: x)
        with torch.no_grad():
            if node.op == "call_module":
                module = _detached(self.gm.get_submodule(node.target))
                return module(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

    def channelwise(self, node: fx.Node, kind: str) -> _State:
        s: _State = self.env[node.args[0]]
        const = self._evaluate(node, s.const.unsqueeze(0).clone())[0]
        if const.dim() == 0 or const.shape[0] != s.channels:
            return self.fallback(node)
        const = const.clone()
        if s.live:
            const[torch.as_tensor(s.live)] = 0
        if s.node is None:
            return _State(None, [], const)
        if s.pad and kind != "affine" and _nonzero(self._evaluate(node, torch.zeros_like(s.const).unsqueeze(0))):
            s = self.repad(s, 0)  # the op does not keep zero channels zero
        if kind == "affine":  # a standalone BatchNorm: keep only the live channels (padding: neutral)
            bn = _slice_bn(self.gm.get_submodule(node.target), list(s.live) + [None] * s.pad)
            new = self.g.call_module(self.module(bn, node.target), (s.node,))
        elif self.max_pool == "separable" and (spec := self._max_pool_spec(node)) is not None:
            new = self.separable_max_pool(s.node, *spec)
        else:
            new = self.g.node_copy(node, lambda n: s.node)
            if node.op == "call_module":
                new.target = self.module(_detached(self.gm.get_submodule(node.target)), node.target)
            _out_of_place(new)
        return _State(new, list(s.live), const, s.pad)

    def _max_pool_spec(self, node: fx.Node):
        """(spatial size, kernel, stride, padding) of a 2-d max pooling that
        :meth:`separable_max_pool` computes exactly (dilation 1, no indices, output size as in
        floor mode), else None."""
        if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), nn.MaxPool2d):
            m = self.gm.get_submodule(node.target)
            k, st, p, d, ceil, idx = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices
        elif node.op == "call_function" and node.target is F.max_pool2d:
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            defaults = dict(zip(names, (None, None, 0, 1, False, False)))
            defaults.update(zip(names, node.args[1:]))
            defaults.update({k: v for k, v in node.kwargs.items() if k in names})
            k, st, p, d, ceil, idx = (defaults[n] for n in names)
        else:
            return None
        k, p, d = _pair(k), _pair(p), _pair(d)
        st = _pair(st) if st not in (None, (), []) else k
        shape_in = tuple(node.args[0].meta["tensor_meta"].shape)
        shape_out = tuple(node.meta["tensor_meta"].shape)
        if idx or d != (1, 1) or len(shape_in) != 4 or not all(isinstance(v, int) for v in (*k, *st, *p)):
            return None
        floor = tuple((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip(shape_in[2:], k, st, p))
        if floor != shape_out[2:]:  # ceil mode adding a window
            return None
        return shape_in[2:], k, st, p


def compact(chain: Chain, model: nn.Module, *, graph: Optional[ModelGraph] = None, keep_scores: bool = False,
            scatter: str = "index_add", channel_multiple: int = 1, max_pool: str = "separable",
            memory_format: str = "contiguous", check: bool = True,
            masked: Optional[nn.Module] = None) -> fx.GraphModule:
    """The chain as a small standalone model made of plain PyTorch ops.

    Pruned filters are removed together with the matching input channels of every consumer,
    removed regions are the identity, layers with no live filter do not run (their constant
    output is folded downstream), eval-mode BatchNorm is folded into the convs and the chain's
    scores into the weights, and an adaptive average pooling that enlarges the map before a
    Linear (``flatten(adaptive_avg_pool2d(x))``, e.g. VGG's 7x7 pool at inputs below 224x224)
    is folded into that Linear, which then reads ``x``. Computes what ``chain.apply(model)``
    computes (up to float rounding).

    Args:
        chain (Chain): a chain extracted from ``model``.
        model (nn.Module): the original model (weights must match ``chain.model_hash``); not
            modified, except that it is put in eval mode. On any device, in any float dtype:
            the compact model is written from a CPU copy of the analysed graph (constants are
            folded on the host) and moved to the model's device; its dtype is the model's.
        graph (ModelGraph): ``nchains.analyze(model, example)`` at ``chain.input_shape``, to
            reuse one analysis (checked to be this model's); default: analysed here. Not modified.
        keep_scores (bool): keep BatchNorm and the scores as explicit per-channel ops (and
            pooling unfolded), so that every retained filter's weights (and BN parameters) are
            bit-for-bit copies of the original's.
        scatter (str): how a tensor holding a subset of a wider channel set (a residual branch
            writing part of its stream) is added into it; both are exact. ``"index_add"``
            (fastest in eager PyTorch and TorchScript) or ``"gather"`` (zero-pad one channel,
            ``index_select``, add: a Gather in ONNX, fastest in onnxruntime).
        channel_multiple (int): pad the channels of every (ungrouped) conv's input and output,
            and of the residual streams, to a multiple of this with exactly-zero channels (zero
            filters, zero bias, zero weights in the consumers), for runtimes whose fast conv
            kernels need blocked channel counts (onnxruntime's NCHWc and oneDNN behind CPU
            PyTorch: 8 with AVX2, 16 with AVX-512). The padded channels are real computation (counted by
            :func:`nchains.inspect.model_stats`); outputs are unchanged. Default 1: no padding.
        max_pool (str): how 2-d max pooling (dilation 1, floor-mode sizes) is written; both
            give exactly the same values. ``"separable"`` (default): strided slices and
            elementwise maxima, which on CPU PyTorch is 4-10x faster than ``max_pool2d``
            (that computes an int64 index per output even when none is wanted); ``"native"``:
            the model's own pooling op (onnxruntime's MaxPool is the faster one there).
        memory_format (str): ``"contiguous"`` (default), ``"channels_last"`` or ``"auto"``.
            Channels-last stores the conv weights NHWC and makes an image input NHWC first
            thing (same values), the layout oneDNN's convolutions use natively: on CPU
            PyTorch a VGG-19 chain runs 7-8% faster at batch 1, 5-14% at batch 20. But PyTorch's
            channel scatters and gathers (``index_add``, ``index_select`` at residual joins)
            are ~5x slower on it, which makes a ResNet-50 chain 28% slower. ``"auto"``:
            channels-last when the graph has no such op. The choice made is in the returned
            module's ``nchains_memory_format``.
        check (bool): self-check the result (:func:`nchains.instrument.self_check.check_compact`):
            on two random inputs of the chain's shape, every unit's computed channels and the
            logits must equal the masked model's (``chain.apply(model)``, itself checked against
            the original), else a ValueError names the first diverging unit.
        masked (nn.Module): ``chain.apply(model, graph=graph)`` when the caller has built it
            already (``export`` checks several compact graphs against one); default: built
            here for the check.

    Returns:
        torch.fx.GraphModule in eval mode mapping ``Tensor[N, *chain.input_shape]`` to the
        logits ``Tensor[N, classes]``, for any batch size N. Its ``nchains_layers``
        attribute maps each analysed layer to ``{"module": name or None, "out": original
        output channels computed, "in": original input channels read}``.

    Raises:
        TypeError: on wrong argument types.
        ValueError: when ``model`` is not the chain's model or is not supported.
    """
    _check_arguments(chain, model, keep_scores, scatter, max_pool, memory_format, channel_multiple)
    chain.check_model(model)
    device, dtype = model_device_dtype(model)
    graph = graph_for(model, chain.input_shape, graph)
    chain.check_graph(graph)  # the chain's layers, widths and regions are the model's
    gates = {name: int(g) for name, g in chain.gates.items()}
    # Writing the graph reads many small host-side values (live channels, constants): on an
    # accelerator it works on a CPU copy, then the small result moves to the device.
    work = graph if device.type == "cpu" else graph.cpu_copy()
    builder = _Builder(work, chain.full_scores(), gates, keep_scores, dtype, scatter, channel_multiple, max_pool)
    gm = builder.build().to(device)
    gm.nchains_layers = builder.layers
    if memory_format == "auto":
        memory_format = "contiguous" if _channel_index_ops(gm) else "channels_last"
    if memory_format == "channels_last" and len(chain.input_shape) == 3:
        _to_channels_last(gm)
    else:
        memory_format = "contiguous"
    gm.nchains_memory_format = memory_format
    gm.nchains_taps = {name: (node.name, live) for name, (node, live) in builder.taps.items()}
    gm = gm.eval().requires_grad_(False)
    if check:
        with full_precision():  # no TF32 convs: both sides exact
            check_compact(gm, masked if masked is not None else chain.apply(model, graph=graph), graph)
    return gm


def _check_arguments(chain, model, keep_scores, scatter, max_pool, memory_format, channel_multiple) -> None:
    """TypeError/ValueError naming the first bad argument of :func:`compact`."""
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must be an nchains.Chain, got {type(chain).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(keep_scores, bool):
        raise TypeError(f"keep_scores must be True or False, got {keep_scores!r}")
    if scatter not in ("index_add", "gather"):
        raise ValueError(f"scatter must be 'index_add' or 'gather', got {scatter!r}")
    if max_pool not in ("separable", "native"):
        raise ValueError(f"max_pool must be 'separable' or 'native', got {max_pool!r}")
    if memory_format not in ("contiguous", "channels_last", "auto"):
        raise ValueError(f"memory_format must be 'contiguous', 'channels_last' or 'auto', got {memory_format!r}")
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise ValueError(f"channel_multiple must be a positive int, got {channel_multiple!r}")
    if not chain.input_shape:
        raise ValueError("chain has no input_shape; it cannot be compacted")


def _channel_index_ops(gm: fx.GraphModule) -> int:
    """How many channel scatters and gathers (residual joins, widened constants) ``gm`` runs."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.index_add,
                                                                                     torch.index_select))


def _to_channels_last(gm: fx.GraphModule) -> None:
    """Store every conv weight channels-last and make the input channels-last first thing (a
    no-op for a tensor that already is, or has one channel): CPU PyTorch's convs then read and
    write NHWC, oneDNN's native layout, and the ops between them keep it."""
    for m in gm.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    users = [u for u in placeholder.users if not (u.op == "call_method" and u.target == "size")]
    with gm.graph.inserting_after(placeholder):
        x = gm.graph.call_method("contiguous", (placeholder,), {"memory_format": torch.channels_last})
    for u in users:
        u.replace_input_with(placeholder, x)
    gm.recompile()
