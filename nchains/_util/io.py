"""Hashing and crash-safe file writes shared by artifacts (chains, exports).

Files are created with mode ``0o666`` and folders with ``0o777``, and the kernel applies the
process umask to both (0644/0755 under umask 022, 0600/0700 under 077), so a server running as
another user can read what the umask allows; nothing here changes the umask, not even briefly.

Temporary files are named ``.<name>.nchains-tmp-<pid>-<hex>`` beside their target: a run killed
between writing and renaming leaves one behind, and the next :func:`write_atomic` into the same
folder removes every such file whose process is gone.

Test-only hook: with ``NCHAINS_TEST_PAUSE_AT=<step>`` in the environment, :func:`pause_for_test`
prints ``nchains-test-paused <step>`` to stderr at that step and sleeps, so that a test can
SIGKILL the process at a known instant. Steps of :func:`write_atomic`: ``partial:<name>``
(half the bytes written) and ``tmp-written:<name>`` (written and synced, not yet renamed).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import sys
import time
from typing import Union

import torch
from torch import nn

PathLike = Union[str, "os.PathLike[str]"]

#: Leftover temporary files of :func:`write_atomic`: ``.<name>.nchains-tmp-<pid>-<hex>``.
_TMP = re.compile(r"^\.(?P<name>.+)\.nchains-tmp-(?P<pid>\d+)-[0-9a-f]+$")
PAUSE_ENV = "NCHAINS_TEST_PAUSE_AT"


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
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pause_for_test(step: str) -> None:
    """Test-only: stops here for a test to kill the process when ``NCHAINS_TEST_PAUSE_AT`` is ``step``."""
    if os.environ.get(PAUSE_ENV) == step:
        print(f"nchains-test-paused {step}", file=sys.stderr, flush=True)
        time.sleep(600)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (ours counts as alive; one of another user too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(folder: str) -> None:
    """Makes a rename or a new entry in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unique_name(folder: str, stem: str, make) -> str:
    """Creates ``folder/<stem><pid>-<hex>`` with ``make(path)`` (raising FileExistsError on a
    clash, then another name is tried) and returns the path."""
    for _ in range(100):
        path = os.path.join(folder, f"{stem}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            make(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.path.join(folder, stem))


def write_file(path: str, data: bytes, exclusive: bool = True, label: str = "") -> None:
    """Writes ``data`` to ``path`` (a new file, mode 0o666 less the umask, unless not
    ``exclusive``) and syncs it; ``label`` names the file in the test hook's step ``partial:``."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o666)
    with os.fdopen(fd, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        pause_for_test(f"partial:{label or os.path.basename(path)}")
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())


def _create_empty(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def clean_stale_temps(folder: str) -> None:
    """Removes the temporary files of killed :func:`write_atomic` calls in ``folder``."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TMP.match(name)
        if m is not None and not pid_alive(int(m["pid"])):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass  # another run removed it, or it is not ours to remove: leave it


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """Writes ``data`` to ``path`` via a temporary file in the same folder, fsync and a rename,
    so that ``path`` holds either its previous content or the new one at every instant, even
    when the process is killed. The folder (and its parents) is created when missing; the
    leftovers of killed writes into that folder are removed first.

    Raises:
        OSError: when the folder cannot be created or written.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    clean_stale_temps(folder)
    blob = data.encode() if isinstance(data, str) else bytes(data)
    name = os.path.basename(path)
    tmp = unique_name(folder, f".{name}.nchains-tmp-", _create_empty)
    try:
        write_file(tmp, blob, exclusive=False, label=name)
        pause_for_test(f"tmp-written:{name}")
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
