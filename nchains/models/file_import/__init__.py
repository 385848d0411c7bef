"""``--model FILE``: a trained CNN shipped without its Python class, rebuilt for analysis.

Accepted files (recognised by content, not by suffix):

- a ``torch.export`` program (``torch.export.save``, usually ``.pt2``);
- a TorchScript module (``torch.jit.save`` of ``torch.jit.script``/``torch.jit.trace``, usually
  ``.pt``/``.ts``). It is converted to a ``torch.export`` program with
  ``torch._export.converter.TS2EPConverter`` on an example input; the module path of every
  TorchScript op (``node.getModuleHierarchy()``) is carried through the conversion.

The program is then rebuilt as an ``nn.Module`` that :func:`nchains.analysis.analyze` can
trace: every conv / BN / linear / activation / pool call becomes a fresh standard module
(``nn.Conv2d``, ``nn.BatchNorm2d``, ...) holding the file's own tensors, at its original module
path (``layer4.0.conv2``, so paper labels such as ``L4B1C2`` work); every module call that
contains other calls (a ResNet block) becomes a sub-``GraphModule`` at its path, or an
``nn.Sequential`` when it was one and still is a chain (VGG ``features``); everything else
becomes torch-level functions (``operator.add``, ``torch.cat``, ``torch.flatten``, ...). The
rebuilt model is checked against the program on a random input before it is returned.

Safety. ``torch.export.load`` is *not* safe on untrusted files by itself (it falls back to
``torch.load(weights_only=False)``, un-pickles "opaque" constants, loads AOTInductor shared
libraries and ``sympify``-evaluates expressions), and ``ExportedProgram.module()`` executes
Python guard code stored in the file. So the archive is screened first (no native-code
payloads, no opaque/custom objects, symbolic expressions restricted to a whitelist),
``torch.export.load`` runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (process-wide for the
duration of the call), ``.module()`` is never called, and no op of the file runs before
every op was checked against the supported set. TorchScript files are read by
``torch.jit.load`` (TorchScript's own restricted unpickler; no Python code runs).

The steps live in the private package :mod:`nchains._model_import`; this module runs them.

Example:
    >>> model = load_model_file("resnet18.pt2")
    >>> analyze(model, torch.randn(1, 3, 64, 64)).label_of["layer4.0.conv2"]
    'L4B1C2'
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from nchains.models.file_import.aten_ops import _PY_OPERATORS, _opname, _unsafe_mutation
from nchains.models.file_import.convert_torchscript import _TS_META, _infer_example_input, _torchscript_to_program
from nchains.models.file_import.loading import _load_exported_program, _load_torchscript, _quiet, _sniff
from nchains.models.file_import.nesting import _Rebuilder

__all__ = ["load_model_file", "looks_like_model_file"]

_MAX_REL_ERROR = 1e-5


def looks_like_model_file(value: str) -> bool:
    """True when ``--model VALUE`` names an existing file (not ``default``/``torchvision:NAME``)."""
    return isinstance(value, (str, os.PathLike)) and os.path.isfile(value)


def _rebuild(ep, source: str, from_torchscript: bool, root_type: str, strip: str = "",
             types: Optional[Dict[str, str]] = None):
    _check_ops(ep, source)
    if _unsafe_mutation(ep.graph):
        if any(s.kind.name == "USER_INPUT" and type(s.arg).__name__ != "TensorArgument"
               for s in ep.graph_signature.input_specs):
            raise ValueError(f"--model {source!r}: in-place ops on a program with non-tensor "
                             "inputs are not supported")
        with _quiet():  # functionalises in-place ops (only checked aten ops run, on fakes)
            ep = ep.run_decompositions({})
    rb = _Rebuilder(ep, source, from_torchscript, root_type, strip, types)
    rb.flatten()
    rb.out_spec = ep.call_spec.out_spec
    model = rb.build()
    leftovers = [k for k, t in [*model.named_parameters(), *model.named_buffers()]
                 if t.device.type == "meta"]
    if leftovers:
        raise ValueError(f"--model {source!r}: tensors {leftovers[:3]} were not restored")
    return model.eval(), ep


def _check_ops(ep, source: str) -> None:
    """Before anything of the program runs: only aten ops and size arithmetic."""
    rb = _Rebuilder(ep, source, False, "")
    for n in ep.graph.nodes:
        if n.op not in ("placeholder", "call_function", "output"):
            raise rb._unsupported(n, f"{n.op} {n.target!r} (control flow / submodules)")
        if n.op == "call_function" and _opname(n) is None and n.target not in _PY_OPERATORS:
            raise rb._unsupported(n, repr(str(n.target)))


def _root_type(ep) -> str:
    for n in ep.graph.nodes:
        for path, typ in (n.meta.get("nn_module_stack") or {}).values():
            if path == "":
                return typ if isinstance(typ, str) else typ.__name__
    return "ImportedModel"


def _example_inputs(ep) -> Optional[List[torch.Tensor]]:
    """Random user inputs of the shapes the program was exported with (None if unknown)."""
    gen = torch.Generator().manual_seed(0)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"]
    user = [v for spec, v in zip(ep.graph_signature.input_specs, vals)
            if spec.kind.name == "USER_INPUT"]
    shapes = []
    for i, v in enumerate(user):
        if not isinstance(v, torch.Tensor):
            return None
        try:
            shape = tuple(int(d.node.hint) if isinstance(d, torch.SymInt) else int(d)
                          for d in v.shape)
        except (TypeError, AttributeError):
            ex = getattr(ep, "example_inputs", None)
            if not ex or len(ex[0]) <= i:
                return None
            shape = tuple(ex[0][i].shape)
        shapes.append((shape, v.dtype))
    return [torch.randn(s, generator=gen).to(d) if d.is_floating_point
            else torch.zeros(s, dtype=d) for s, d in shapes]


def _verify(model: nn.Module, reference, inputs: List[torch.Tensor], source: str) -> None:
    with torch.no_grad(), _quiet():
        expected = pytree.tree_leaves(reference(*inputs))
        got = pytree.tree_leaves(model(*inputs))
    if len(expected) != len(got):
        raise ValueError(f"--model {source!r}: the rebuilt model returns {len(got)} outputs, "
                         f"the file's model {len(expected)}")
    for e, g in zip(expected, got):
        if isinstance(e, torch.Tensor):
            scale = max(e.abs().max().item(), 1e-12) if e.numel() else 1.0
            err = (e - g).abs().max().item() / scale if e.numel() else 0.0
            if e.shape != g.shape or not err <= _MAX_REL_ERROR:
                raise ValueError(f"--model {source!r}: the rebuilt model differs from the file's "
                                 f"model (relative error {err:.3g}); please report this file")


def load_model_file(path, example_input: Optional[torch.Tensor] = None) -> nn.Module:
    """Load a TorchScript or torch.export file as an analysable ``nn.Module`` (eval mode).

    Args:
        path (str or PathLike): the file (``torch.export.save`` or ``torch.jit.save``).
        example_input (Tensor[N, C, H, W], optional): an input the model accepts. Needed to
            convert TorchScript (inferred from the file when omitted: the traced input shape,
            else the first of a few usual image shapes that runs). A torch.export program is
            checked on random inputs of its own example shapes; ``example_input`` only when
            the program records none.

    Returns:
        nn.Module: a ``torch.fx.GraphModule`` (or ``nn.Sequential``) whose layers are standard
        modules at their original module paths, numerically identical to the file's model.
        ``model.nchains_input_shape`` is the input shape it was checked with.

    Raises:
        TypeError: on a wrong argument type.
        ValueError: naming ``--model``: missing file, unknown format, unsafe content, an
            unsupported op (named with its module path), a failed TorchScript conversion.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a Tensor[N, C, H, W], "
                        f"got {type(example_input).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"--model {path!r} does not exist or is not a file (accepted: 'default', "
                         "'torchvision:NAME' or a TorchScript / torch.export file)")
    if _sniff(path) == "export":
        ep = _load_exported_program(path)
        model, ep = _rebuild(ep, path, False, _root_type(ep))
        inputs = _example_inputs(ep)
        if inputs is None and example_input is not None:
            inputs = [example_input]

        def reference(*xs):
            state = []
            for spec in ep.graph_signature.input_specs:
                if spec.kind.name != "USER_INPUT":
                    state.append(ep.state_dict[spec.target] if spec.target in ep.state_dict
                                 else ep.constants[spec.target])
            outs = ep.graph_module(*state, *xs)
            kinds = [s.kind.name for s in ep.graph_signature.output_specs]
            return [o for o, k in zip(outs, kinds) if k == "USER_OUTPUT"]
    else:
        ts = _load_torchscript(path)
        x = example_input if example_input is not None else _infer_example_input(ts, path)
        ep, strip = _torchscript_to_program(ts, x, path)
        tagged = any(_TS_META in (n.meta.get("custom") or {}) for n in ep.graph.nodes)
        types = {name: m._c._type().qualified_name() for name, m in ts.named_modules()}
        model, ep = _rebuild(ep, path, tagged, types.pop(""), strip, types)
        inputs = [x]

        def reference(*xs):
            with torch.jit.optimized_execution(False):
                return ts(*xs)
    if inputs is not None:
        _verify(model, reference, inputs, path)
        model.nchains_input_shape = tuple(inputs[0].shape)
    return model
