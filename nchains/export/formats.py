"""The export formats: how a compact fx graph becomes each runtime's artifact, and back.

One :class:`_Exporter` per format (TorchScript, ONNX, torch.export ``pt2``, AOTInductor
``aoti``) prepares the program, checks it holds no nchains op, serializes it with the metadata
JSON embedded, and loads it back from those bytes for verification. :data:`FORMATS` maps the
accepted names and aliases to the canonical names; :data:`FILES` (in :mod:`.artifacts`) names
each file. The zip formats are written through :mod:`._archive`, so the same chain and model give
the same bytes (AOTInductor: when compiled in the same Inductor cache folder).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch
from torch import fx

from nchains.export._archive import canonical_archive, drop_provenance, fresh_jit_namespace, strip_compile_commands
from nchains.export.artifacts import FILES, METADATA_KEY

__all__ = ["ExportError", "FORMATS"]

#: Accepted format names (and aliases) -> canonical name.
FORMATS = {"torchscript": "torchscript", "ts": "torchscript", "onnx": "onnx", "pt2": "pt2",
           "export": "pt2", "torch.export": "pt2", "aoti": "aoti", "aotinductor": "aoti"}
_INPUT, _OUTPUT = "input", "logits"


class ExportError(ValueError):
    """An artifact could not be exported or failed verification; nothing was written."""


@dataclass
class _Exporter:
    prepare: Callable[[fx.GraphModule, torch.Tensor], Tuple[Any, str]]  # -> (program, how)
    serialize: Callable[[Any, str], bytes]  # (program, metadata JSON) -> file bytes
    load: Callable[[bytes], Callable[[torch.Tensor], torch.Tensor]]
    plain: Callable[[Any], None]  # ExportError when the program needs nchains
    scatter: str = "index_add"  # compact(scatter=...): the faster exact encoding for the runtime
    channel_multiple: int = 1  # compact(channel_multiple=...): channel blocks of the runtime's fast convs
    max_pool: str = "separable"  # compact(max_pool=...): the faster exact form of max pooling there
    memory_format: str = "contiguous"  # compact(memory_format=...): the layout the runtime's convs want

    def compact_options(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`nchains.compact.compact` for this runtime."""
        return {"scatter": self.scatter, "channel_multiple": self.channel_multiple, "max_pool": self.max_pool,
                "memory_format": self.memory_format}


@contextlib.contextmanager
def _quiet():
    """Exporters print progress and emit deprecation warnings that say nothing to our users."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _no_nchains(fmt: str, names) -> None:
    bad = sorted({n for n in names if "nchains" in n})
    if bad:
        raise ExportError(f"{fmt} artifact references nchains ops {bad[:3]}; it would not load without nchains")


# ---- TorchScript -----------------------------------------------------------------------------

def _ts_prepare(gm: fx.GraphModule, example: torch.Tensor):
    with _quiet(), fresh_jit_namespace():  # class names as in a fresh process: reproducible bytes
        try:
            return torch.jit.script(gm), "torch.jit.script"
        except Exception:  # noqa: BLE001 - scripting is stricter than tracing; tracing is exact here
            return torch.jit.trace(gm, example, check_trace=False), "torch.jit.trace"


def _ts_serialize(module, meta: str) -> bytes:
    buf = io.BytesIO()
    with _quiet():
        torch.jit.save(module, buf, _extra_files={METADATA_KEY: meta})
    return canonical_archive(buf.getvalue())


def _ts_load(data: bytes):
    with _quiet():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return module


def _ts_plain(module) -> None:
    graph = module.inlined_graph
    _no_nchains("torchscript", [n.kind() for n in graph.nodes()])


# ---- ONNX ------------------------------------------------------------------------------------

def _onnx_prepare(gm: fx.GraphModule, example: torch.Tensor):
    import onnx

    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        try:
            program = torch.onnx.export(gm, (example,), dynamo=True, input_names=[_INPUT], output_names=[_OUTPUT],
                                        dynamic_shapes=({0: batch},), verbose=False)
            proto, how = program.model_proto, "torch.onnx.export(dynamo=True)"
        except Exception as first:  # noqa: BLE001 - the TorchScript-based exporter is the fallback
            buf = io.BytesIO()
            try:
                torch.onnx.export(gm, (example,), buf, dynamo=False, input_names=[_INPUT], output_names=[_OUTPUT],
                                  dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}}, opset_version=17)
            except Exception as second:  # noqa: BLE001
                raise ExportError(f"onnx export failed: dynamo exporter: {type(first).__name__}: "
                                  f"{str(first).strip().splitlines()[0] if str(first).strip() else ''}; legacy "
                                  f"exporter: {type(second).__name__}: {second}") from second
            proto, how = onnx.load_from_string(buf.getvalue()), "torch.onnx.export(dynamo=False)"
    for value, role in ((proto.graph.input[0], "input"), (proto.graph.output[0], "output")):
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise ExportError(f"onnx export has a fixed batch size {dim.dim_value} on its {role}; expected dynamic")
    return proto, how


def _onnx_serialize(proto, meta: str) -> bytes:
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: meta})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnx model fails onnx.checker (full_check=True): {exc}") from exc
    return proto.SerializeToString()


def _onnx_load(data: bytes):
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().contiguous().numpy()})[0])
    return run


def _onnx_plain(proto) -> None:
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    _no_nchains("onnx", [f"{n.domain}::{n.op_type}" for n in nodes])


# ---- torch.export (pt2) ----------------------------------------------------------------------

def _pt2_prepare(gm: fx.GraphModule, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        program = torch.export.export(gm, (example,), dynamic_shapes=({0: batch},))
    drop_provenance(program)  # object ids and addresses: the same chain would give other bytes
    return program, "torch.export.export"


def _pt2_serialize(program, meta: str) -> bytes:
    buf = io.BytesIO()
    with _quiet():
        torch.export.save(program, buf, extra_files={METADATA_KEY: meta})
    return canonical_archive(buf.getvalue())


def _pt2_load(data: bytes):
    with _quiet():
        module = torch.export.load(io.BytesIO(data)).module()
    return module


def _pt2_plain(program) -> None:
    _no_nchains("pt2", [str(n.target) for n in program.graph.nodes if n.op == "call_function"])


# ---- AOTInductor package (aoti) -------------------------------------------------------------

#: Inductor options of the package: weights frozen into the compiled code (constant-folded,
#: prepacked for oneDNN) and stored inside the shared library, one file to deploy.
_AOTI_CONFIGS = {"freezing": True, "aot_inductor.package_constants_in_so": True}


@dataclass
class _Package:
    """An AOTInductor package before its metadata is added."""

    program: Any  # the torch.export program it was compiled from
    data: bytes  # the package as aoti_compile_and_package wrote it


def _aoti_prepare(gm: fx.GraphModule, example: torch.Tensor):
    program, _ = _pt2_prepare(gm, example)  # dynamic batch (min 1), as pt2
    with tempfile.TemporaryDirectory(prefix="nchains-aoti-") as tmp, _quiet():
        path = os.path.join(tmp, FILES["aoti"])
        torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=dict(_AOTI_CONFIGS))
        with open(path, "rb") as f:
            data = f.read()
    return _Package(program, data), "torch._inductor.aoti_compile_and_package"


def _aoti_serialize(package: _Package, meta: str) -> bytes:
    # the package format takes extra files like pt2 (extra/nchains.json); the C++ loader ignores them
    return canonical_archive(package.data, strip_compile_commands, extra={f"extra/{METADATA_KEY}": meta.encode()})


def _aoti_load(data: bytes):
    # aoti_load_package needs a path; the loader extracts the library elsewhere and keeps it loaded
    with tempfile.TemporaryDirectory(prefix="nchains-aoti-") as tmp, _quiet():
        path = os.path.join(tmp, FILES["aoti"])
        with open(path, "wb") as f:
            f.write(data)
        return torch._inductor.aoti_load_package(path)


def _aoti_plain(package: _Package) -> None:
    _no_nchains("aoti", [str(n.target) for n in package.program.graph.nodes if n.op == "call_function"])


_EXPORTERS: Dict[str, _Exporter] = {
    # CPU PyTorch (TorchScript, pt2): oneDNN's convs work natively on channels-last tensors
    "torchscript": _Exporter(_ts_prepare, _ts_serialize, _ts_load, _ts_plain, channel_multiple=8,
                             memory_format="auto"),
    # onnxruntime's CPU NCHWc convs (blocks of 8 with AVX2; 16 with AVX-512 still gains from 8)
    # need input and output channels in whole blocks; odd counts fall back to the plain NCHW
    # conv at a fraction of the throughput, with layout Reorders around it.
    "onnx": _Exporter(_onnx_prepare, _onnx_serialize, _onnx_load, _onnx_plain, scatter="gather",
                      channel_multiple=8, max_pool="native"),
    "pt2": _Exporter(_pt2_prepare, _pt2_serialize, _pt2_load, _pt2_plain, channel_multiple=8,
                     memory_format="auto"),
    # Inductor compiles the same graph as pt2 (its convs are oneDNN's too)
    "aoti": _Exporter(_aoti_prepare, _aoti_serialize, _aoti_load, _aoti_plain, channel_multiple=8,
                      memory_format="auto"),
}
