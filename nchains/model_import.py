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

Example:
    >>> model = load_model_file("resnet18.pt2")
    >>> analyze(model, torch.randn(1, 3, 64, 64)).label_of["layer4.0.conv2"]
    'L4B1C2'
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import re
import sys
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

__all__ = ["load_model_file", "looks_like_model_file"]

_TS_META = "nchains_module_stack"  # node.meta["custom"] key set on TorchScript conversions
_MAX_REL_ERROR = 1e-5

# ---- the file ------------------------------------------------------------------------------

_FORBIDDEN_ENTRIES = {
    "data/aotinductor/": "an AOTInductor shared library (native code run on load)",
    "data/executorch/": "an ExecuTorch payload",
    "data/mtia": "an MTIA payload",
    "xl_model_weights/": "externally stored weights",
    "data/constants/opaque_obj_": "a pickled Python object (arbitrary code on load)",
    "data/constants/custom_obj_": "a TorchScript custom-class object",
}


def looks_like_model_file(value: str) -> bool:
    """True when ``--model VALUE`` names an existing file (not ``default``/``torchvision:NAME``)."""
    return isinstance(value, (str, os.PathLike)) and os.path.isfile(value)


def _sniff(path: str) -> str:
    """``"export"`` or ``"torchscript"``; ValueError naming ``--model`` otherwise."""
    accepted = ("accepted: a torch.export program (torch.export.save, .pt2) or a TorchScript "
                "module (torch.jit.save, .pt/.ts)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"--model {path!r} is not a TorchScript or torch.export archive "
                         f"(not a zip file); {accepted}")
    with zipfile.ZipFile(path) as archive:
        names = [n.replace("\\", "/") for n in archive.namelist()]
        fmt = [n for n in names if n.split("/", 1)[-1] == "archive_format"]
        if fmt and archive.read(fmt[0]).strip() == b"pt2":
            return "export"
    tails = {n.split("/", 1)[-1] for n in names}
    if "data.pkl" in tails and "constants.pkl" in tails and any(
            t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        raise ValueError(f"--model {path!r} is a torch.save checkpoint (a state_dict or a pickled "
                         "module), not a model file; for a state_dict use --model torchvision:NAME "
                         f"--weights FILE, or save the model with torch.export.save; {accepted}")
    raise ValueError(f"--model {path!r} is a zip archive of unknown format; {accepted}")


# Names a shape expression may use (sympy and torch.utils._sympy functions); anything else
# could reach Python builtins or sympy helpers through sympify's eval.
_EXPR_FUNCTIONS = frozenset("""
    Add Mul Pow Integer Rational FloorDiv ModularIndexing Where PythonMod Mod CleanDiv
    CeilToInt FloorToInt CeilDiv LShift RShift IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal
    ToFloat FloatPow PowByNatural IntTrueDiv FloatTrueDiv Identity BitwiseFn_bitwise_and
    BitwiseFn_bitwise_or BitwiseFn_bitwise_xor Max Min Abs floor ceiling Piecewise oo zoo nan
    true false True False BooleanTrue BooleanFalse And Or Not Eq Ne Lt Le Gt Ge Equality
    Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan
    """.split())
# torch writes symbols as sympy srepr: Symbol('s77', positive=True, integer=True)
_EXPR_SREPR_SYMBOL = re.compile(
    r"Symbol\('[a-z]{1,4}\d+'(\s*,\s*[a-z_]+\s*=\s*(True|False))*\s*\)")
_EXPR_CHARS = re.compile(r"^[A-Za-z0-9_\s+\-*/%().,<>=!&|~]*$")
_EXPR_NUMBER = re.compile(r"(?<![A-Za-z_])\d+(\.\d*)?([eE][+-]?\d+)?")
_EXPR_NAME = re.compile(r"[A-Za-z_]\w*")
_EXPR_SYMBOL = re.compile(r"^[a-z]{1,4}\d+$")


def _check_expr(expr: str, path: str) -> None:
    text = _EXPR_NUMBER.sub("0", _EXPR_SREPR_SYMBOL.sub("s0", expr))
    bad = (not _EXPR_CHARS.match(text) or "__" in text
           or re.search(r"[A-Za-z_]\w*\s*\.", text) is not None
           or any(not (_EXPR_SYMBOL.match(n) or n in _EXPR_FUNCTIONS)
                  for n in _EXPR_NAME.findall(text)))
    if bad:
        raise ValueError(f"--model {path!r}: the program contains a symbolic-shape expression "
                         f"nchains does not evaluate ({expr[:80]!r}); refusing to load it")


def _screen_export_archive(path: str) -> None:
    """Rejects archive content that ``torch.export.load`` would execute or un-pickle."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            slashed = "/" + name.replace("\\", "/")
            for marker, what in _FORBIDDEN_ENTRIES.items():
                if "/" + marker in slashed:
                    raise ValueError(f"--model {path!r} contains {what} ({name}); nchains only "
                                     "loads plain torch.export programs")
            if "/models/" in slashed and name.endswith(".json"):
                stack = [json.loads(archive.read(name))]
                while stack:
                    obj = stack.pop()
                    if isinstance(obj, dict):
                        if isinstance(obj.get("expr_str"), str):
                            _check_expr(obj["expr_str"], path)
                        stack.extend(obj.values())
                    elif isinstance(obj, list):
                        stack.extend(obj)


@contextlib.contextmanager
def _weights_only_unpickling():
    """Every ``torch.load`` inside is ``weights_only=True``, even where torch passes False."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ[keys[0]] = "1"
    os.environ.pop(keys[1], None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet():
    loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export", "torch._dynamo",
                                              "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _load_exported_program(path: str):
    _screen_export_archive(path)
    try:
        with _weights_only_unpickling(), _quiet():
            ep = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable archive is the same user error
        raise ValueError(f"--model {path!r} could not be loaded as a torch.export program: "
                         f"{_first_line(exc)}") from None
    # Python source from the file, compiled by ExportedProgram.module() (which
    # run_decompositions calls); the rebuild never needs it.
    ep._guards_code = []
    return ep


# ---- TorchScript -> ExportedProgram --------------------------------------------------------

def _load_torchscript(path: str):
    try:
        with _quiet():
            module = torch.jit.load(path, map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"--model {path!r} could not be loaded as TorchScript: "
                         f"{_first_line(exc)}") from None
    if not isinstance(module, torch.jit.ScriptModule):
        raise ValueError(f"--model {path!r} holds a {type(module).__name__}, not a module")
    return module.eval()


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


# ---- aten ops ------------------------------------------------------------------------------

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


def _act_module(name: str, b: Dict[str, Any]) -> Optional[nn.Module]:
    if name == "relu":
        return nn.ReLU()
    if name == "relu6" or (name == "hardtanh" and (b["min_val"], b["max_val"]) == (0, 6)):
        return nn.ReLU6()
    if name == "hardtanh":
        return nn.Hardtanh(b["min_val"], b["max_val"])
    if name == "elu" and b["scale"] == 1 and b["input_scale"] == 1:
        return nn.ELU(b["alpha"])
    simple = {"silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hardswish": nn.Hardswish,
              "hardsigmoid": nn.Hardsigmoid, "mish": nn.Mish, "selu": nn.SELU}
    if name in simple:
        return simple[name]()
    if name == "gelu":
        return nn.GELU(approximate=b["approximate"])
    if name == "leaky_relu":
        return nn.LeakyReLU(b["negative_slope"])
    if name == "celu":
        return nn.CELU(b["alpha"])
    if name == "softplus":
        return nn.Softplus(b["beta"], b["threshold"])
    return None


def _pool_module(name: str, b: Dict[str, Any]) -> Optional[nn.Module]:
    if name in ("max_pool2d", "max_pool2d_with_indices"):
        return nn.MaxPool2d(_pair(b["kernel_size"]), _pair(b["stride"]) if b["stride"] else None,
                            _pair(b["padding"]), _pair(b["dilation"]), ceil_mode=b["ceil_mode"])
    if name == "avg_pool2d":
        return nn.AvgPool2d(_pair(b["kernel_size"]), _pair(b["stride"]) if b["stride"] else None,
                            _pair(b["padding"]), b["ceil_mode"], b["count_include_pad"],
                            b["divisor_override"])
    if name in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d"):
        return nn.AdaptiveAvgPool2d(_pair(b["output_size"]))
    if name == "adaptive_max_pool2d":
        return nn.AdaptiveMaxPool2d(_pair(b["output_size"]))
    if name in ("dropout", "feature_dropout"):
        return (nn.Dropout2d if name == "feature_dropout" else nn.Dropout)(b["p"])
    if name == "flatten":
        return nn.Flatten(b["start_dim"], b["end_dim"])
    return None


_SUPPORTED = ("supported: conv2d, batch_norm (eval), linear, relu/relu6/hardtanh/silu/gelu/"
              "sigmoid/tanh/leaky_relu/elu/hardswish/hardsigmoid/mish/softplus, max/avg/adaptive "
              "pooling, dropout, flatten/view/reshape, add/sub/mul/div, cat, mean/sum, squeeze/"
              "unsqueeze, transpose/permute, softmax, pad, interpolate")


class _Lifted:
    """A parameter, buffer or constant of the program (a placeholder of the lifted graph)."""

    def __init__(self, fqn: str, tensor: torch.Tensor):
        self.fqn, self.tensor = fqn, tensor


class _FirstOf:
    """The new node computing element 0 of a tuple-returning op (BN, pool with indices)."""

    def __init__(self, node: fx.Node):
        self.node = node


def _param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def _buffer(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if isinstance(t, nn.Parameter) else t


def _short_type(type_name: str) -> str:
    name = re.sub(r"\W", "_", str(type_name).rsplit(".", 1)[-1])
    return name if name and not name[0].isdigit() else f"M{name}"


def _qualified(type_name: str) -> str:
    """``__torch__.m.___torch_mangle_3.Cls`` (TorchScript) -> ``m.Cls``."""
    atoms = str(type_name).split(".")
    return ".".join(a for a in atoms if a != "__torch__" and not a.startswith("___torch_mangle"))


def _is_sequential(type_name: str) -> bool:
    """Was the call an ``nn.Sequential`` (or a subclass such as torchvision's
    ``Conv2dNormActivation``)? Classes are only looked up among modules already imported."""
    name = _qualified(type_name)
    if name.rsplit(".", 1)[-1] == "Sequential":
        return True
    module, _, cls = name.rpartition(".")
    obj = getattr(sys.modules.get(module), cls, None) if module else None
    return isinstance(obj, type) and issubclass(obj, nn.Sequential)


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


# ---- rebuild -------------------------------------------------------------------------------

class _Restart(Exception):
    pass


class _Rebuilder:
    """ExportedProgram (lifted graph) -> flat fx graph of standard leaf modules and torch
    functions -> nested modules following the original module calls."""

    def __init__(self, ep, source: str, from_torchscript: bool, root_type: str,
                 strip: str = "", types: Optional[Dict[str, str]] = None):
        self.ep, self.source, self.ts, self.strip = ep, source, from_torchscript, strip
        self.types = types or {}  # module path -> qualified type name (TorchScript)
        self.root_type = root_type
        self.g = fx.Graph()
        self.chain: Dict[fx.Node, Tuple[str, ...]] = {}
        self.calls: Dict[str, Tuple[str, str]] = {}  # call key -> (path, type name)
        self.leaves: Dict[str, nn.Module] = {}  # module path -> leaf module
        self.leaf_ids: Dict[str, tuple] = {}  # module path -> identity of what it computes
        self.attrs: Dict[str, torch.Tensor] = {}
        self.user_outputs: List[Any] = []
        self.hoisted: Dict[fx.Node, str] = {}  # node -> leaf call key it is moved out of
        self.synthetic: Dict[str, str] = {}  # weight fqn -> path of its functionally called layer

    # -- helpers --
    def _path(self, p: str) -> str:
        return p[len(self.strip):] if self.strip and p.startswith(self.strip) else p

    def _stack(self, node: fx.Node) -> List[Tuple[str, str, str]]:
        if self.ts:
            entries = (node.meta.get("custom") or {}).get(_TS_META, [])
        else:
            entries = [(k, v[0], v[1] if isinstance(v[1], str)
                        else f"{v[1].__module__}.{v[1].__qualname__}")
                       for k, v in (node.meta.get("nn_module_stack") or {}).items()]
        out = []
        for key, path, typ in entries:
            path = self._path(path)
            if path:
                out.append((key, path, self.types.get(path, typ)))
        return out

    def _where(self, node: fx.Node) -> str:
        stack = self._stack(node)
        return stack[-1][1] if stack else "(root)"

    def _unsupported(self, node: fx.Node, what: str) -> ValueError:
        return ValueError(f"--model {self.source!r}: unsupported operation {what} at module "
                          f"{self._where(node)!r}; {_SUPPORTED}")

    # -- pass 1: flat graph --
    def flatten(self) -> None:
        ep = self.ep
        sig = ep.graph_signature
        placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
        env: Dict[fx.Node, Any] = {}
        for spec, ph in zip(sig.input_specs, placeholders):
            kind = spec.kind.name
            if kind == "USER_INPUT":
                if spec.arg.__class__.__name__ == "ConstantArgument":
                    env[ph] = spec.arg.value
                else:
                    env[ph] = self.g.placeholder(ph.name)
                    self.chain[env[ph]] = ()
            elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                target = spec.target
                tensor = (ep.state_dict[target] if target in ep.state_dict
                          else ep.constants[target])
                env[ph] = _Lifted(self._path(target), tensor)
            else:
                raise ValueError(f"--model {self.source!r}: program input {spec.arg} of kind "
                                 f"{kind} is not supported (custom objects, tokens)")
        out = next(n for n in ep.graph.nodes if n.op == "output")
        live, todo = set(), [out]
        while todo:  # dead code (unused shape checks, BN statistics) is not converted
            n = todo.pop()
            if n not in live:
                live.add(n)
                todo.extend(n.all_input_nodes)
        nodes = [n for n in ep.graph.nodes if n.op == "call_function" and n in live]

        leaf_of = self._leaf_calls(nodes)
        for n in nodes:
            self._convert(n, env, leaf_of)

        results = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        for spec, value in zip(sig.output_specs, results):
            kind = spec.kind.name
            if kind == "USER_OUTPUT":
                self.user_outputs.append(self._arg(env, value))
            elif kind == "USER_INPUT_MUTATION":
                continue  # the rebuilt model leaves its input alone; outputs are unchanged
            else:
                raise ValueError(f"--model {self.source!r}: the program writes {spec.target!r} "
                                 f"({kind}); BatchNorm was probably exported in training mode - "
                                 "call model.eval() before torch.export / torch.jit")
        flat_out = [o for o in self.user_outputs if isinstance(o, fx.Node)]
        self.g.output(tuple(flat_out))
        for n in reversed(list(self.g.nodes)):  # dead code: unused BN statistics and the like
            if n.op not in ("placeholder", "output") and not n.users:
                self.g.erase_node(n)

    def _leaf_calls(self, nodes: Sequence[fx.Node]) -> Dict[fx.Node, Tuple[str, str]]:
        """Main op node -> (call key, path) for every call of one standard layer."""
        direct: Dict[str, List[fx.Node]] = {}
        parents = set()
        for n in nodes:
            stack = self._stack(n)
            for key, path, typ in stack:
                self.calls.setdefault(key, (path, typ))
            parents.update(k for k, _, _ in stack[:-1])
            if stack:
                direct.setdefault(stack[-1][0], []).append(n)
        out = {}
        for key, members in direct.items():
            # view/size ops that only feed the layer's op (re-created aliases after
            # functionalisation) belong to the caller
            feeding = {n for n in members if (_opname(n) in _VIEW_OPS or _opname(n) == "sym_size"
                                              or _opname(n) in _IDENTITY)
                       and all(u in members for u in n.users)}
            mains = [n for n in members if n.target is not operator.getitem and n not in feeding]
            if key in parents or len(mains) != 1:
                continue
            m = mains[0]
            name = _opname(m)
            if name is None or not all(g.args[0] is m for g in members
                                       if g is not m and g not in feeding):
                continue
            if (name in _WEIGHTED or _act_module(name, _bind(m)) is not None
                    or _pool_module(name, _bind(m)) is not None):
                out[m] = (key, self.calls[key][0])
                for n in feeding:
                    self.hoisted[n] = key
        return out

    def _arg(self, env, a):
        def one(x):
            if not isinstance(x, fx.Node):
                return x
            v = env[x]
            if isinstance(v, _Lifted):
                if v.fqn not in self.attrs:
                    self.attrs[v.fqn] = v.tensor
                node = self.g.get_attr(v.fqn)
                self.chain[node] = None  # floating: placed where it is used
                return node
            if isinstance(v, _FirstOf):
                raise ValueError(f"--model {self.source!r}: the tuple result of {x.target} is "
                                 "used as a whole; not supported")
            return v
        return fx.node.map_aggregate(a, one)

    def _tensor(self, env, a) -> Optional[torch.Tensor]:
        v = env.get(a) if isinstance(a, fx.Node) else None
        return v.tensor if isinstance(v, _Lifted) else None

    def _convert(self, n: fx.Node, env, leaf_of) -> None:
        name = _opname(n)
        stack = self._stack(n)
        keys = tuple(k for k, _, _ in stack)
        if n in self.hoisted:
            keys = keys[:keys.index(self.hoisted[n])]
        if n.target is operator.getitem and isinstance(env.get(n.args[0]), _FirstOf):
            if n.args[1] == 0:
                env[n] = env[n.args[0]].node
            elif n.users:
                raise self._unsupported(n, f"output {n.args[1]} of {n.args[0].target}")
            return
        if name is not None and (name.startswith("_assert") or name.startswith("sym_constrain")):
            return
        if name in _IDENTITY:
            env[n] = env[n.args[0]]
            return
        if name == "dim" and isinstance(n.args[0].meta.get("val"), torch.Tensor):
            env[n] = n.args[0].meta["val"].dim()  # ranks are static in a program
            return
        if name is None:  # python operator on sizes
            new = self.g.call_function(n.target, self._arg(env, n.args), self._arg(env, n.kwargs))
            self.chain[new] = keys
            env[n] = new
            return
        b = _bind(n)
        self._keys = keys
        if n in leaf_of or name in _WEIGHTED:
            module = self._layer(n, name, b, env)
            if module is not None:
                key, path = leaf_of.get(n, (None, None))
                if key is not None:
                    keys = keys[:keys.index(key)]
                else:
                    path = self._synthetic_path(n, name, b, env)
                self._register_leaf(n, path, module, b, env)
                new = self.g.call_module(path, (self._arg(env, b[_first_arg(n)]),))
                self.chain[new] = keys
                env[n] = _FirstOf(new) if name in _TUPLE_OPS else new
                return
            if name in _WEIGHTED:
                raise self._unsupported(n, f"{n.target} with computed or missing weights/"
                                           "running statistics")
        target, args, kwargs = self._function(n, name, b, env)
        if target is None:  # identity (eval-mode dropout)
            env[n] = args
            return
        if isinstance(target, str):
            new = self.g.call_method(target, args, kwargs)
        else:
            new = self.g.call_function(target, args, kwargs)
        self.chain[new] = keys
        env[n] = _FirstOf(new) if name in _TUPLE_OPS else new

    def _layer(self, n, name, b, env) -> Optional[nn.Module]:
        t = lambda a: self._tensor(env, a)  # noqa: E731
        if name in ("conv2d", "convolution", "_convolution"):
            w = t(b["weight"])
            if w is None or w.dim() != 4 or (b["bias"] is not None and t(b["bias"]) is None):
                return None
            if name != "conv2d" and (b["transposed"] or any(_pair(b["output_padding"]))):
                raise self._unsupported(n, "transposed convolution")
            groups = b["groups"]
            padding = b["padding"] if isinstance(b["padding"], str) else _pair(b["padding"])
            m = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]),
                          stride=_pair(b["stride"]), padding=padding,
                          dilation=_pair(b["dilation"]), groups=groups,
                          bias=b["bias"] is not None, device="meta")
            m.weight = _param(w)
            if b["bias"] is not None:
                m.bias = _param(t(b["bias"]))
            return m
        if name in ("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"):
            if b.get("training", False):
                raise ValueError(f"--model {self.source!r}: BatchNorm at module "
                                 f"{self._where(n)!r} runs in training mode (batch statistics); "
                                 "call model.eval() before torch.export / torch.jit")
            rm, rv, w, bias = (t(b[k]) for k in ("running_mean", "running_var", "weight", "bias"))
            if (rm is None or rv is None or (b["weight"] is not None and w is None)
                    or (b["bias"] is not None and bias is None)):
                return None
            val = b["input"].meta.get("val")
            rank = val.dim() if isinstance(val, torch.Tensor) else 4
            cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 5: nn.BatchNorm3d}.get(rank,
                                                                               nn.BatchNorm2d)
            m = cls(rm.numel(), eps=b["eps"], momentum=b["momentum"],
                    affine=w is not None or bias is not None, device="meta")
            if m.affine:
                m.weight = _param(w if w is not None else torch.ones_like(rm))
                m.bias = _param(bias if bias is not None else torch.zeros_like(rm))
            m.running_mean, m.running_var = _buffer(rm), _buffer(rv)
            m.num_batches_tracked = torch.tensor(0, dtype=torch.long)
            return m
        if name == "linear":
            w = t(b["weight"])
            if w is None or w.dim() != 2 or (b["bias"] is not None and t(b["bias"]) is None):
                return None
            m = nn.Linear(w.shape[1], w.shape[0], bias=b["bias"] is not None, device="meta")
            m.weight = _param(w)
            if b["bias"] is not None:
                m.bias = _param(t(b["bias"]))
            return m
        act = _act_module(name, b)
        return act if act is not None else _pool_module(name, b)

    def _synthetic_path(self, n, name, b, env) -> str:
        """Path of a layer without a module call of its own: its weight's owner when that path
        is free (``layer1.0.conv1.weight`` -> ``layer1.0.conv1``), else next to the weight
        (``block.weight`` -> ``block.weight_conv2d``)."""
        fqn = env[b["weight"] if b.get("weight") is not None else b["running_mean"]].fqn
        if fqn not in self.synthetic:
            owner = fqn.rpartition(".")[0]
            taken = {p for p, _ in self.calls.values()} | set(self.attrs) | set(self.leaves)
            free = owner and owner not in taken and not any(
                p.startswith(owner + ".") or owner.startswith(p + ".") for p in taken)
            self.synthetic[fqn] = owner if free else f"{fqn}_{name}"
        return self.synthetic[fqn]

    def _register_leaf(self, n, path, module, b, env) -> None:
        tensors = [self._tensor(env, v) for v in b.values() if isinstance(v, fx.Node)]
        ident = (repr(module), tuple(id(t) for t in tensors if t is not None))
        if path in self.leaves:
            if self.leaf_ids[path] != ident:
                raise ValueError(f"--model {self.source!r}: module {path!r} computes different "
                                 "layers in different calls; not supported")
            return
        if path in self.attrs or any(path.startswith(p + ".") for p in self.leaves):
            raise ValueError(f"--model {self.source!r}: module path {path!r} is ambiguous")
        self.leaves[path] = module
        self.leaf_ids[path] = ident

    def _function(self, n, name, b, env):
        """(target, args, kwargs) of the torch-level equivalent; target None = identity."""
        a = lambda v: self._arg(env, v)  # noqa: E731
        x = a(b.get("self", b.get("input")))
        act = _act_module(name, b)
        if act is not None:
            fn = {nn.ReLU: torch.relu, nn.ReLU6: F.relu6, nn.SiLU: F.silu,
                  nn.Sigmoid: torch.sigmoid, nn.Tanh: torch.tanh, nn.Hardswish: F.hardswish,
                  nn.Hardsigmoid: F.hardsigmoid, nn.Mish: F.mish, nn.SELU: F.selu}.get(type(act))
            if fn is not None:
                return fn, (x,), {}
            params = {nn.GELU: {"approximate": b.get("approximate")},
                      nn.LeakyReLU: {"negative_slope": b.get("negative_slope")},
                      nn.Hardtanh: {"min_val": b.get("min_val"), "max_val": b.get("max_val")},
                      nn.ELU: {"alpha": b.get("alpha")}, nn.CELU: {"alpha": b.get("alpha")},
                      nn.Softplus: {"beta": b.get("beta"), "threshold": b.get("threshold")}}
            fn = {nn.GELU: F.gelu, nn.LeakyReLU: F.leaky_relu, nn.Hardtanh: F.hardtanh,
                  nn.ELU: F.elu, nn.CELU: F.celu, nn.Softplus: F.softplus}[type(act)]
            return fn, (x,), params[type(act)]
        if name in ("dropout", "feature_dropout"):
            return None, x, None
        if name in ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d"):
            stride = _pair(b["stride"]) if b["stride"] else None
            if name == "avg_pool2d":
                return F.avg_pool2d, (x, _pair(b["kernel_size"]), stride, _pair(b["padding"]),
                                      b["ceil_mode"], b["count_include_pad"],
                                      b["divisor_override"]), {}
            return F.max_pool2d, (x, _pair(b["kernel_size"]), stride, _pair(b["padding"]),
                                  _pair(b["dilation"]), b["ceil_mode"]), {}
        if name in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"):
            fn = F.adaptive_max_pool2d if name == "adaptive_max_pool2d" else F.adaptive_avg_pool2d
            return fn, (x, a(b["output_size"])), {}
        if name in ("add", "sub", "rsub"):
            other, alpha = a(b["other"]), b.get("alpha", 1)
            if name == "rsub":
                return torch.rsub, (x, other), ({} if alpha == 1 else {"alpha": alpha})
            if alpha == 1:
                return (operator.add if name == "add" else operator.sub), (x, other), {}
            return (torch.add if name == "add" else torch.sub), (x, other), {"alpha": alpha}
        if name in ("mul", "div"):
            other = a(b["other"])
            if b.get("rounding_mode") is not None:
                return torch.div, (x, other), {"rounding_mode": b["rounding_mode"]}
            return (operator.mul if name == "mul" else operator.truediv), (x, other), {}
        if name == "neg":
            return operator.neg, (x,), {}
        if name == "cat":
            return torch.cat, (a(b["tensors"]), b["dim"]), {}
        if name in ("mean", "sum"):
            fn = torch.mean if name == "mean" else torch.sum
            kwargs = {"dtype": b["dtype"]} if b.get("dtype") is not None else {}
            if "dim" not in b:
                return fn, (x,), kwargs
            return fn, (x, a(b["dim"]), b["keepdim"]), kwargs
        if name == "flatten":
            return torch.flatten, (x, b["start_dim"], b["end_dim"]), {}
        if name in ("view", "reshape", "_unsafe_view"):
            return self._reshape(b, x, a)
        if name == "squeeze":
            dim = b.get("dim")
            return torch.squeeze, ((x,) if dim is None else (x, a(dim))), {}
        if name == "unsqueeze":
            return torch.unsqueeze, (x, b["dim"]), {}
        if name == "transpose":
            return torch.transpose, (x, b["dim0"], b["dim1"]), {}
        if name == "permute":
            return torch.permute, (x, tuple(b["dims"])), {}
        if name == "contiguous":
            return "contiguous", (x,), {}
        if name in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
            fn = torch.log_softmax if "log" in name else torch.softmax
            return fn, (x, b["dim"]), {}
        if name == "constant_pad_nd":
            return F.pad, (x, a(b["pad"]), "constant", b["value"]), {}
        if name == "clamp":
            return torch.clamp, (x, b["min"], b["max"]), {}
        if name in ("upsample_nearest2d", "upsample_bilinear2d"):
            kwargs = {"size": a(b["output_size"]), "scale_factor": b["scale_factors"],
                      "mode": "nearest" if "nearest" in name else "bilinear"}
            if "align_corners" in b:
                kwargs["align_corners"] = b["align_corners"]
            return F.interpolate, (x,), kwargs
        if name == "sym_size":
            return "size", (x, b["dim"]), {}
        if "batch_norm" in name:
            raise ValueError(f"--model {self.source!r}: BatchNorm at module {self._where(n)!r} "
                             f"runs in training mode ({n.target}); call model.eval() before "
                             "torch.export / torch.jit")
        raise self._unsupported(n, str(n.target))

    def _reshape(self, b, x, a):
        """A target shape whose first dimension is the batch stays batch-agnostic:
        ``torch.flatten(x, 1)`` or ``x.reshape(x.size(0), ...)`` instead of baked sizes."""
        size = list(b["size"] if "size" in b else b["shape"])
        val = b["self"].meta.get("val")
        shape = list(val.shape) if isinstance(val, torch.Tensor) else []
        first = size[0] if size else None
        if isinstance(first, fx.Node):
            batch_dim = _opname(first) == "sym_size" and first.args[1] == 0
        else:
            batch_dim = (len(shape) >= 2 and isinstance(first, int) and isinstance(shape[0], int)
                         and first == shape[0] and not any(isinstance(d, fx.Node) for d in size))
        if batch_dim:
            rest = (math.prod(shape[1:]) if shape and all(isinstance(d, int) for d in shape[1:])
                    else None)
            if len(size) == 2 and size[1] in (rest, -1) and size[1] is not None:
                return torch.flatten, (x, 1), {}
            batch = self.g.call_method("size", (x, 0))
            self.chain[batch] = self._keys
            return "reshape", (x, batch, *a(size[1:])), {}
        return "reshape", (x, *a(size)), {}

    # -- pass 2: nesting --
    def build(self) -> nn.Module:
        self.dissolved: set = set()
        for _ in range(len(self.calls) + 1):
            self.built: Dict[str, nn.Module] = {}
            try:
                nodes = [n for n in self.g.nodes if n.op not in ("output",)]
                outputs = [o for o in self.user_outputs if isinstance(o, fx.Node)]
                return self._build(None, 0, nodes, [], outputs)
            except _Restart:
                continue
        raise ValueError(f"--model {self.source!r}: could not rebuild the module hierarchy")

    def _eff(self, n: fx.Node) -> Tuple[str, ...]:
        return tuple(k for k in self.chain.get(n) or () if k not in self.dissolved)

    @staticmethod
    def _rel(target: str, path: str) -> str:
        if not path:
            return target
        if target.startswith(path + "."):
            return target[len(path) + 1:]
        return "_shared_" + target.replace(".", "_")

    def _build(self, key, depth, nodes, inputs, outputs) -> nn.Module:
        path, typ = self.calls[key] if key is not None else ("", self.root_type)
        g = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        mods: Dict[str, nn.Module] = {}
        attrs: Dict[str, torch.Tensor] = {}
        if key is None:
            for n in nodes:
                if n.op == "placeholder":
                    env[n] = g.placeholder(n.name)
        else:
            for i, a in enumerate(inputs):
                env[a] = g.placeholder("x" if len(inputs) == 1 else f"x{i}")

        def lookup(a: fx.Node) -> fx.Node:
            if a not in env:
                if a.op != "get_attr":
                    raise AssertionError(f"{a.name} used before it is computed at {path!r}")
                target = self._rel(a.target, path)
                attrs[target] = self.attrs[a.target]
                env[a] = g.get_attr(target)
            return env[a]

        done = set()
        members_of: Dict[str, List[fx.Node]] = {}
        for n in nodes:
            eff = self._eff(n)
            if n.op not in ("get_attr", "placeholder") and len(eff) > depth:
                members_of.setdefault(eff[depth], []).append(n)
        for n in nodes:
            if n.op in ("get_attr", "placeholder"):
                continue
            eff = self._eff(n)
            if len(eff) > depth:
                child = eff[depth]
                if child in done:
                    continue
                done.add(child)
                members = members_of[child]
                mset = set(members)
                c_in = list(dict.fromkeys(a for m in members for a in m.all_input_nodes
                                          if a not in mset and a.op != "get_attr"))
                c_out = [m for m in members if any(u not in mset for u in m.users)]
                if not c_out or any(a not in env for a in c_in):
                    self.dissolved.add(child)
                    raise _Restart()
                module = self._build(child, depth + 1, members, c_in, c_out)
                target = self._rel(self.calls[child][0], path)
                mods[target] = module
                call = g.call_module(target, tuple(env[a] for a in c_in))
                if len(c_out) == 1:
                    env[c_out[0]] = call
                else:
                    for j, o in enumerate(c_out):
                        env[o] = g.call_function(operator.getitem, (call, j))
                continue
            target = n.target
            if n.op == "call_module":
                target = self._rel(n.target, path)
                mods[target] = self.leaves[n.target]
            env[n] = g.create_node(n.op, target, fx.node.map_arg(n.args, lookup),
                                   fx.node.map_arg(n.kwargs, lookup), name=n.name)
        if key is None:
            result = [lookup(o) if isinstance(o, fx.Node) else o for o in self.user_outputs]
            g.output(pytree.tree_unflatten(result, self.out_spec))
        else:
            g.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
        module = self._assemble(g, mods, attrs, typ)
        return self._dedup(path, module) if key is not None else module

    def _assemble(self, g: fx.Graph, mods, attrs, typ: str) -> nn.Module:
        nodes = [n for n in g.nodes]
        chain = nodes[1:-1]
        if (_is_sequential(typ) and len(nodes) >= 3 and nodes[0].op == "placeholder"
                and not attrs and all(c.op == "call_module" and "." not in c.target
                                      and c.args == (prev,) and len(prev.users) == 1
                                      for prev, c in zip(nodes[:-2], chain))
                and nodes[-1].args[0] is chain[-1]):
            seq = nn.Sequential()
            for c in chain:
                seq.add_module(c.target, mods[c.target])
            return seq
        holder = nn.Module()
        for target, value in [*mods.items(), *attrs.items()]:
            *prefix, field = target.split(".")
            owner = holder
            for atom in prefix:
                if not hasattr(owner, atom):
                    owner.add_module(atom, nn.Module())
                owner = getattr(owner, atom)
            if isinstance(value, nn.Module):
                owner.add_module(field, value)
            elif isinstance(value, nn.Parameter):
                owner.register_parameter(field, value)
            else:
                owner.register_buffer(field, value)
        g.lint()
        return fx.GraphModule(holder, g, class_name=_short_type(typ))

    def _dedup(self, path: str, module: nn.Module) -> nn.Module:
        """One module object per path: a second call of the same block must compute the same
        graph over the same submodules."""
        old = self.built.get(path)
        if old is None:
            self.built[path] = module
            return module

        def ident(m):
            code = _structure(m.graph) if isinstance(m, fx.GraphModule) else type(m).__name__
            return (code, [(k, id(v)) for k, v in m.named_children()],
                    [(k, id(v)) for k, v in m.named_parameters(recurse=False)],
                    [(k, id(v)) for k, v in m.named_buffers(recurse=False)])
        if ident(old) != ident(module):
            raise ValueError(f"--model {self.source!r}: module {path!r} is called several times "
                             "with different computations; not supported")
        return old


def _structure(graph: fx.Graph) -> list:
    """The graph up to node names."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    return [(n.op, n.target, fx.node.map_arg((n.args, n.kwargs), lambda a: ("%", index[a])))
            for n in graph.nodes]


def _first_arg(n: fx.Node) -> str:
    return n.target._schema.arguments[0].name


# ---- entry point ---------------------------------------------------------------------------

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
