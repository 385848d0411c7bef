"""Hashing and atomic file writes shared by artifacts (chains, exports)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Union

import torch
from torch import nn

PathLike = Union[str, "os.PathLike[str]"]


def hash_tensor(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values (device- and layout-independent)."""
    h = hashlib.sha256()
    t = t.detach().cpu().contiguous()
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hash_model(model: nn.Module) -> str:
    """SHA-256 over a model's state_dict (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(hash_tensor(value).encode())
    return h.hexdigest()


def hash_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """Writes ``data`` to ``path`` via a temporary file in the same folder and a rename, so a
    reader never sees a half-written file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
