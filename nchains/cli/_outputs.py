"""Checking, before any work starts, that a command's outputs can be written.

An extraction takes minutes; finding out only afterwards that ``--out`` is under a file, in a
read-only folder or on a pseudo file system loses the result. These checks walk up to the
nearest existing folder and create (and remove) a probe file there: permission bits alone do
not say it (root passes every ``os.access`` test, ``/proc`` and read-only mounts refuse anyway).
Nothing is left behind: missing folders are created later, by the write itself.
"""

from __future__ import annotations

import os
import tempfile


def _nearest_existing(path: str) -> str:
    """``path`` or its nearest existing ancestor."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _probe(folder: str, arg: str, target: str) -> None:
    """OSError-free check that a file can be created in ``folder``; ValueError otherwise."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".nchains-probe-")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"{arg} {target!r} cannot be written: {reason} in folder {folder!r}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str, arg: str = "--out") -> None:
    """ValueError unless a file can be written at ``path`` (its folder may not exist yet).

    Raises:
        ValueError: when ``path`` is a directory, a parent is a file, or the nearest existing
            folder does not accept new files (naming ``arg`` and the folder).
    """
    full = os.path.abspath(os.fspath(path))
    if os.path.isdir(full):
        raise ValueError(f"{arg} {path!r} is a directory; give a file name such as chain.json")
    if os.path.lexists(full) and not os.path.isfile(full):
        raise ValueError(f"{arg} {path!r} exists and is not a regular file")
    base = _nearest_existing(os.path.dirname(full))
    if not os.path.isdir(base):
        raise ValueError(f"{arg} {path!r} cannot be written: {base!r} is a file, not a folder")
    _probe(base, arg, path)


def check_output_dir(path: str, arg: str = "--out") -> None:
    """ValueError unless ``path`` is, or can be created as, a folder that accepts new files."""
    full = os.path.abspath(os.fspath(path))
    if os.path.lexists(full) and not os.path.isdir(full):
        raise ValueError(f"{arg} {path!r} exists and is not a folder")
    base = _nearest_existing(full)
    if not os.path.isdir(base):
        raise ValueError(f"{arg} {path!r} cannot be created: {base!r} is a file, not a folder")
    _probe(base, arg, path)
