"""Recognising a ``--model`` file and loading it without running code from it.

``torch.export.load`` is not safe on untrusted files by itself, so a ``torch.export`` archive
is screened first (no native-code payloads, no opaque/custom objects, symbolic expressions
restricted to a whitelist) and loaded with every ``torch.load`` forced to
``weights_only=True``. TorchScript files are read by ``torch.jit.load`` (TorchScript's own
restricted unpickler). See :mod:`nchains.model_import` for the whole safety argument.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
import zipfile

import torch

_FORBIDDEN_ENTRIES = {
    "data/aotinductor/": "an AOTInductor shared library (native code run on load)",
    "data/executorch/": "an ExecuTorch payload",
    "data/mtia": "an MTIA payload",
    "xl_model_weights/": "externally stored weights",
    "data/constants/opaque_obj_": "a pickled Python object (arbitrary code on load)",
    "data/constants/custom_obj_": "a TorchScript custom-class object",
}


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
