"""Checking, before any work starts, that a command's outputs can be written.

An extraction takes minutes; finding out only afterwards that ``--out`` is under a file, in a
read-only folder or on a pseudo file system loses the result. These checks walk up to the
nearest existing folder and create (and remove) a probe file there: permission bits alone do
not say it (root passes every ``os.access`` test, ``/proc`` and read-only mounts refuse anyway).
Nothing is left behind: missing folders are created later, by the write itself.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Iterable, Optional


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


def earlier_output_problem(folder: str, index: str, listed: Callable[[dict], Optional[Iterable[str]]],
                           command: str) -> Optional[str]:
    """Why ``folder`` may not be replaced by ``command``'s output folder, or None when it is
    empty or an earlier output of ``command`` holding only the files its ``index`` JSON lists.

    Args:
        folder (str): an existing folder.
        index (str): the name of the command's index file in it (``summary.json``...).
        listed (callable): ``listed(index contents)``: the names of the files the command wrote
            beside the index; None (or a KeyError/TypeError) for an index of another kind, and
            then no file is ours.
        command (str): the command's name, for the message.

    Returns:
        None, or a short reason naming the first entry that is not the command's: a file the
        index does not list, a sub-folder, or (without an index of the command) any entry.
    """
    names = sorted(os.listdir(folder))
    if not names:
        return None
    try:
        with open(os.path.join(folder, index)) as f:
            files = listed(json.load(f))
        ours = None if files is None else {index, *(n for n in files if isinstance(n, str))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        ours = None
    if ours is None:
        why = f"its {index} is not an nchains {command} index" if index in names else f"no nchains {index} in it"
        others = [n for n in names if n != index]
        return why + (f"; it holds {others[0]!r}" if others else "")
    foreign = [n for n in names if n not in ours or not os.path.isfile(os.path.join(folder, n))]
    return None if not foreign else f"it holds {foreign[0]!r} besides an nchains {command} output"
