"""TorchScript module -> ``torch.export`` program, keeping the module path of every op.

``torch._export.converter.TS2EPConverter`` is tried first with a layer that tags every fx node
with the TorchScript module path of its op (``node.getModuleHierarchy()``), then untagged, then
``torch.export.export`` of a wrapper around the script module.
"""

from __future__ import annotations

import re
from typing import List, Tuple

import torch
from torch import nn

from nchains.models.file_import.loading import _first_line, _quiet

_TS_META = "nchains_module_stack"  # node.meta["custom"] key set on TorchScript conversions


def _infer_example_input(ts, path: str) -> torch.Tensor:
    """A random input the TorchScript module accepts: the traced input shape when the file
    records one, else the first that runs of a few usual image shapes."""
    inputs = list(ts.graph.inputs())[1:]
    shapes: List[Tuple[int, ...]] = []
    if len(inputs) == 1:
        typ = inputs[0].type()
        sizes = typ.sizes() if isinstance(typ, torch._C.TensorType) else None
        if sizes and all(isinstance(s, int) for s in sizes):
            shapes.append(tuple(sizes))
        convs = [p for _, p in ts.named_parameters() if p.dim() == 4]
        channels = [convs[0].shape[1]] if convs else [3, 1]
        shapes += [(1, c, s, s) for c in channels for s in (64, 32, 28, 224)]
    gen = torch.Generator().manual_seed(0)
    for shape in dict.fromkeys(shapes):
        x = torch.randn(shape, generator=gen)
        try:
            with torch.no_grad(), torch.jit.optimized_execution(False), _quiet():
                ts(x)
            return x
        except Exception:  # noqa: BLE001 - a failed probe just means "not this shape"
            continue
    raise ValueError(f"--model {path!r}: could not infer the input shape of the TorchScript "
                     "module; pass --input-shape C,H,W (example_input=... from Python)")


def _ts_scope(node) -> List[Tuple[str, str]]:
    """``SELF(ResNet).layer1(Sequential).0(BasicBlock).conv1(Conv2d).SELF(Conv2d)`` ->
    ``[("layer1", "Sequential"), ("0", "BasicBlock"), ("conv1", "Conv2d")]``."""
    entries = re.findall(r"([^.()]+)\(([^()]*)\)", node.getModuleHierarchy())
    return [(n, t) for n, t in entries if n not in ("SELF", "UNKNOWN_INSTANCE")]


def _tagging_converter():
    """A ``TS2EPConverter`` whose fx nodes carry the TorchScript module path of their op in
    ``meta["custom"]`` (which survives the converter's re-trace); None if the private
    converter API differs from the one this was written against."""
    try:
        from torch._export import converter as conv

        for name in ("TS2EPConverter", "TS2FXGraphConverter", "get_block_to_lifted_attrs",
                     "replace_quantized_ops_with_standard_ops"):
            getattr(conv, name)
    except (ImportError, AttributeError):
        return None

    class Tagger(conv.TS2FXGraphConverter):
        def convert_node(self, node):
            seen = getattr(self, "_nc_seen", None)
            if seen is None:
                seen = self._nc_seen = set(self.fx_graph.nodes)
                self._nc_open, self._nc_count = [], {}
            super().convert_node(node)
            new = []
            for n in reversed(self.fx_graph.nodes):
                if n in seen:
                    break
                new.append(n)
            seen.update(new)
            if not any(n.op == "call_function" for n in new):
                return
            if not node.kind().startswith("aten::"):
                # prim::If & co. report a truncated hierarchy: inherit the open calls
                tag = [[key, p, typ] for p, key, typ in self._nc_open]
                for n in new:
                    n.meta.setdefault("custom", {})[_TS_META] = tag
                return
            paths, prefix = [], ""
            for name, typ in _ts_scope(node):
                prefix = f"{prefix}.{name}" if prefix else name
                paths.append((prefix, typ))
            common = 0
            while (common < min(len(paths), len(self._nc_open))
                   and self._nc_open[common][0] == paths[common][0]):
                common += 1
            stack = self._nc_open[:common]
            for p, typ in paths[common:]:
                k = self._nc_count.get(p, 0)
                self._nc_count[p] = k + 1
                stack.append((p, f"{p}@{k}" if k else p, typ))
            self._nc_open = stack
            tag = [[key, p, typ] for p, key, typ in stack]
            for n in new:
                n.meta.setdefault("custom", {})[_TS_META] = tag

    class Converter(conv.TS2EPConverter):
        def convert(self):
            blocks, fqns = conv.get_block_to_lifted_attrs(self.ts_graph)
            graph_converter = Tagger(self.ts_graph, self.name_to_param, self.name_to_buffer,
                                     blocks, self.name_to_non_tensor_attributes,
                                     self.name_to_constant, fqns)
            gm = graph_converter.convert()
            conv.replace_quantized_ops_with_standard_ops(gm)
            return self.retrace_as_exported_program(gm, graph_converter.name_to_constant)

    return Converter


class _ScriptWrapper(nn.Module):
    def __init__(self, script):
        super().__init__()
        self.script = script

    def forward(self, *args):
        return self.script(*args)


def _torchscript_to_program(ts, x: torch.Tensor, path: str):
    """Returns ``(ExportedProgram, path prefix to strip)``."""
    errors = []
    tagged = _tagging_converter()
    attempts = []
    if tagged is not None:
        attempts.append(("TS2EPConverter", lambda: (tagged(ts, (x,)).convert(), "")))
    try:
        from torch._export.converter import TS2EPConverter
    except ImportError:
        errors.append("TS2EPConverter: not available in this torch")
    else:  # without module paths of parameter-free layers and blocks, but still analysable
        attempts.append(("TS2EPConverter (untagged)",
                         lambda: (TS2EPConverter(ts, (x,)).convert(), "")))
    attempts.append(("torch.export.export",
                     lambda: (torch.export.export(_ScriptWrapper(ts), (x,)), "script.")))
    skip_untagged = False
    for name, attempt in attempts:
        if skip_untagged and name == "TS2EPConverter (untagged)":
            continue
        try:
            with _quiet():
                return attempt()
        except Exception as exc:  # noqa: BLE001 - reported together below
            errors.append(f"{name}: {_first_line(exc)}")
            # the untagged converter only helps when the tagging layer itself broke
            skip_untagged = name == "TS2EPConverter" and not isinstance(
                exc, (AttributeError, TypeError, NameError))
    raise ValueError(f"--model {path!r}: could not convert TorchScript to an analysable model: "
                     + "; ".join(errors))
