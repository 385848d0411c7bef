"""Byte-reproducible PyTorch zip archives (TorchScript, torch.export and AOTInductor packages).

The three formats are zip archives written by libtorch's ``PyTorchStreamWriter``: members are
stored uncompressed, 64-byte aligned, with zero timestamps, and the ``.data/serialization_id``
record is derived from the member names and their CRCs. So two exports differ in bytes only
where a member's *content* differs, and measured here those contents were:

- TorchScript ``code/**.py``: the ``name : Final[T] = value`` constant lines of a module class
  come from a Python ``set`` of the module's ``__constants__``: their order follows the
  process's string-hash seed (``PYTHONHASHSEED``), so it changes from one run to the next;
- TorchScript class names: ``___torch_mangle_<k>`` counts the classes already compiled in the
  process, so a second export in the same process names (and files) its classes differently
  (:func:`fresh_jit_namespace` scripts in a compilation unit of its own);
- fx code names: every GraphModule's generated code is "file" ``<eval_with_key>.<k>``, a
  process-wide counter, recorded in TorchScript's ``.debug_pkl`` and pt2 stack traces;
- torch.export ``models/model.json``: every node's ``from_node`` provenance holds ``id()``
  values and ``repr``s with memory addresses (``<function relu at 0x7f...>``);
- AOTInductor sources: a freshly compiled ``*.cpp`` ends with comments giving the compile and
  link commands, which name the cache folder (a cached compile leaves them out). The kernel
  source's first line and the compiled library also name the Inductor cache folder, so a
  package is reproducible only when compiled in the same one (measured: two fresh compiles in
  the same folder give the same bytes, in two folders different ``.so`` bytes).

:func:`rewrite` copies an archive record by record through libtorch's own reader and writer
(so alignment and layout stay what every loader expects), applying an edit per record;
:func:`canonical_archive` is that copy with the edits above (and :func:`strip_compile_commands`
for AOTInductor packages). ONNX protobufs have no such sources here: the same graph
serializes to the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
from typing import Callable, Dict, Iterable, List, Optional

import torch

__all__ = ["canonical_archive", "drop_provenance", "fresh_jit_namespace", "rewrite", "strip_compile_commands"]

_SERIALIZATION_ID = ".data/serialization_id"  # the writer derives it again from the records
_FINAL = re.compile(rb"^\s+\w+ : Final\[.*$")
_KEY = re.compile(rb"<eval_with_key>\.\d+")


def rewrite(data: bytes, edit: Optional[Callable[[str, bytes], Optional[bytes]]] = None,
            extra: Optional[Dict[str, bytes]] = None) -> bytes:
    """The archive ``data`` written again, record by record, in its own order.

    Args:
        data (bytes): a PyTorch zip archive.
        edit (callable): ``(record name, bytes) -> bytes`` (or None to drop the record).
        extra (dict): records to add (``name -> bytes``), after the archive's own ones.

    Returns:
        bytes: the new archive (its ``.data/serialization_id`` recomputed from its records).
    """
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    records: List[tuple] = []
    for name in reader.get_all_records():
        if name == _SERIALIZATION_ID:
            continue
        record = reader.get_record(name)
        record = edit(name, record) if edit is not None else record
        if record is not None:
            records.append((name, record))
    records += list((extra or {}).items())
    for name, record in records:
        writer.write_record(name, record, len(record))
    writer.write_end_of_file()
    return out.getvalue()


def _sorted_runs(lines: List[bytes], pattern: "re.Pattern[bytes]") -> List[bytes]:
    """``lines`` with every run of consecutive lines matching ``pattern`` sorted (a run keeps its
    length in bytes, so source offsets after it, e.g. in ``.debug_pkl`` ranges, do not move)."""
    out: List[bytes] = []
    run: List[bytes] = []
    for line in lines + [b""]:
        if pattern.match(line):
            run.append(line)
            continue
        out += sorted(run)
        run = []
        out.append(line)
    return out[:-1]


def _key_map(records: Iterable[bytes]) -> Dict[bytes, bytes]:
    """fx code names ``<eval_with_key>.<k>`` in order of first appearance in the archive ->
    ``.0``, ``.1``, ... (the same numbers whatever the process counted before)."""
    order: Dict[bytes, bytes] = {}
    for record in records:
        for m in _KEY.finditer(record):
            order.setdefault(m.group(0), b"<eval_with_key>.%d" % len(order))
    return order


def _renumber_keys(name: str, record: bytes, order: Dict[bytes, bytes]) -> bytes:
    if not order or b"<eval_with_key>." not in record:
        return record
    if not name.endswith("pkl"):  # text: code, JSON
        return _KEY.sub(lambda m: order[m.group(0)], record)
    out, pos = [], 0
    for m in _KEY.finditer(record):
        if m.start() < pos:
            continue
        found = _pickled_string(record, m.start(), m.end())
        if found is None:  # not inside a string we can delimit: leave it
            continue
        start, end = found
        text = _KEY.sub(lambda k: order[k.group(0)], record[start + 5:end])
        # pickles hold no byte offsets: a string may change length with its length field
        out += [record[pos:start], b"X", struct.pack("<I", len(text)), text]
        pos = end
    return b"".join(out + [record[pos:]])


def _pickled_string(record: bytes, first: int, last: int) -> Optional[tuple]:
    """(start, end) of the pickled string (BINUNICODE: b"X", uint32 length, UTF-8, then a memo
    opcode) that holds ``record[first:last]``, or None."""
    start = record.rfind(b"X", 0, first - 4)
    while start >= 0 and first - start < 1 << 16:
        n = struct.unpack_from("<I", record, start + 1)[0]
        end = start + 5 + n
        if last <= end < len(record) and record[end:end + 1] in (b"q", b"r", b"\x94"):
            return start, end
        start = record.rfind(b"X", 0, start)
    return None


def canonical_archive(data: bytes, edit: Optional[Callable[[str, bytes], bytes]] = None,
                      extra: Optional[Dict[str, bytes]] = None) -> bytes:
    """The archive ``data`` with its run-dependent contents made canonical: TorchScript class
    constants sorted, fx code names ``<eval_with_key>.<k>`` numbered from 0 (in code, JSON and
    pickles), then ``edit`` per record and the ``extra`` records added."""
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    order = _key_map(reader.get_record(n) for n in reader.get_all_records())

    def canonical(name: str, record: bytes) -> bytes:
        if name.startswith("code/") and name.endswith(".py"):
            record = b"\n".join(_sorted_runs(record.split(b"\n"), _FINAL))
        record = _renumber_keys(name, record, order)
        return edit(name, record) if edit is not None else record

    return rewrite(data, canonical, extra=extra)


def strip_compile_commands(name: str, record: bytes) -> bytes:
    """An AOTInductor source without the trailing ``// Compile cmd`` / ``// Link cmd`` comments
    (they name the compile cache folder, and only a fresh compile writes them)."""
    if name.endswith(".cpp"):
        cut = record.find(b"\n// Compile cmd\n")
        if cut >= 0:
            record = record[:cut].rstrip(b"\n") + b"\n"
    return record


@contextlib.contextmanager
def fresh_jit_namespace():
    """TorchScript compiles into a compilation unit and type store of its own (restored after),
    so the classes of one export are numbered as in a fresh process."""
    import torch.jit._recursive as recursive
    import torch.jit._state as state
    import torch.jit._trace as trace

    try:
        saved = (state._python_cu, recursive._python_cu, trace._python_cu, recursive.concrete_type_store)
    except AttributeError:  # another torch layout: script as usual (bytes may then differ per process)
        yield
        return
    unit = torch._C.CompilationUnit()
    state._python_cu = recursive._python_cu = trace._python_cu = unit
    recursive.concrete_type_store = recursive.ConcreteTypeStore()
    try:
        yield
    finally:
        state._python_cu, recursive._python_cu, trace._python_cu, recursive.concrete_type_store = saved


def drop_provenance(program) -> None:
    """Remove the ``from_node`` provenance (object ids, memory addresses) from every node of a
    torch.export program, in place; the graph and its other metadata are unchanged."""
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in getattr(graph, "nodes", ()):
            node.meta.pop("from_node", None)
