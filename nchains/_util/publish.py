"""All-or-nothing publication of a folder of files (an export) under its final name.

:class:`StagedFolder` builds the whole set of files in a staging folder beside the destination
(``<parent>/.<name>.nchains-staging-<pid>-<hex>``: the same filesystem, so renames are atomic),
syncs every file and the folder, and then publishes it:

- when the destination does not exist: one ``rename(staging, out)``;
- when it exists (an earlier export, or an empty folder): one ``renameat2(RENAME_EXCHANGE)``
  (Linux >= 3.15, on ext4, xfs, btrfs, tmpfs...), which swaps the two names atomically; the
  staging name then holds the previous export, which is deleted;
- where the kernel or filesystem cannot exchange: ``rename(out, .<name>.nchains-old-<pid>-<hex>)``
  then ``rename(staging, out)``. A crash between the two renames leaves ``out`` missing and the
  previous complete export under the ``-old-`` name; the next export (or
  :func:`clean_leftovers`) renames it back before anything else.

Why this scheme rather than a symlink ``out -> .out.v2`` replaced by ``os.replace``: the
destination stays a plain folder, which is what users copy, archive, mount into containers
and point servers at, and an existing folder from an earlier export can be replaced in place
(a folder cannot be atomically turned into a symlink). On Linux the exchange is as atomic as
the symlink swap: at every instant ``out`` holds the previous complete set or the new one.

Leftovers of killed runs (staging or ``-old-`` folders of a process that no longer exists) are
removed by the next run for the same destination. Two live processes exporting to the same
destination at once are not coordinated: the last to publish wins.

Which existing destination a command may replace is its ``problem`` callable;
:func:`earlier_output_problem` is the common rule (empty, or an earlier output holding exactly
the files its index JSON lists) that the commands other than export use.

Test-only hook (see :mod:`nchains._util.io`): ``NCHAINS_TEST_PAUSE_AT`` steps ``staging-created``,
``partial:<file>``, ``written:<file>``, ``before-publish``, ``between-renames`` (the fallback only;
``NCHAINS_TEST_NO_EXCHANGE=1`` forces it) and ``after-publish`` (new set in place, the previous
one not yet deleted).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
from typing import Callable, Iterable, List, Optional

from nchains._util.io import fsync_dir, pause_for_test, pid_alive, unique_name, write_file

__all__ = ["StagedFolder", "check_destination", "check_writable", "clean_leftovers"]

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.nchains-(?P<kind>staging|old)-(?P<pid>\d+)-[0-9a-f]+$")
_NO_EXCHANGE_ENV = "NCHAINS_TEST_NO_EXCHANGE"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

#: ``problem(folder) -> None or why``: whether an existing destination may be replaced.
Problem = Callable[[str], Optional[str]]


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps the names ``a`` and ``b``; False where the system cannot."""
    if os.environ.get(_NO_EXCHANGE_ENV) == "1":
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _split(out: str):
    out = os.path.realpath(out)  # a symlinked destination: publish where it points, keep the link
    return out, os.path.dirname(out), os.path.basename(out)


def clean_leftovers(out: str) -> None:
    """Removes the staging and ``-old-`` folders that killed runs left beside ``out``; when
    ``out`` is missing and a killed run left the previous export aside, it is renamed back."""
    out, parent, name = _split(out)
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return
    for entry in entries:
        m = _LEFTOVER.match(entry)
        if m is None or m["name"] != name or pid_alive(int(m["pid"])):
            continue
        path = os.path.join(parent, entry)
        if m["kind"] == "old" and not os.path.lexists(out):
            os.rename(path, out)
            fsync_dir(parent)
        else:
            shutil.rmtree(path, ignore_errors=True)


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


def check_destination(out: str, problem: Problem, arg: str = "out_dir", kind: str = "export") -> None:
    """Refuses a destination that is not a folder, or one ``problem`` says must not be replaced
    (``kind`` names what an earlier output is in the message: ``"export"``, ``"ssa output"``).

    Raises:
        ValueError: naming ``arg``, ``out`` and why.
    """
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"{arg} {out!r} exists and is not a directory; give a folder (new or an earlier {kind})")
    real, cwd = os.path.realpath(out), os.path.realpath(os.getcwd())
    if os.path.dirname(real) == real or os.path.commonpath([real, cwd]) == real:
        # replacing it would delete the folder this process (and the user's shell) works in
        raise ValueError(f"{arg} {out!r} is the current folder, one above it or the root; give a folder below it")
    if os.path.isdir(out):
        why = problem(out)
        if why is not None:
            raise ValueError(f"{arg} {out!r} is a non-empty folder that is not an nchains {kind} ({why}); "
                             "refusing to replace it: give a new or empty folder")


def check_writable(out, problem: Problem, arg: str = "out_dir", kind: str = "export") -> None:
    """What :class:`StagedFolder` checks on entering (``out`` replaceable, a staging folder can be
    made beside it), leaving nothing behind: for callers that want to fail before long work.

    Raises:
        ValueError: naming ``arg``, ``out`` and why.
    """
    with StagedFolder(out, problem, arg=arg, kind=kind):
        pass


class StagedFolder:
    """A staging folder that becomes ``out`` in one step (see the module docstring).

    Use as a context manager: entering cleans leftovers, checks ``out`` and creates the staging
    folder (so an unwritable destination fails before any work); leaving removes the staging
    folder unless :meth:`publish` moved it into place, and the parents it created.

    Args:
        out (path): destination folder (its missing parents are created, mode 0o777 less the umask).
        problem (callable): ``problem(folder) -> None or str``; an existing non-empty ``out`` is
            replaced only when it returns None.
        arg (str): how messages name ``out`` (``--out`` in the CLI).
        kind (str): what an earlier output is called in messages (:func:`check_destination`).

    Example:
        >>> with StagedFolder("out", problem) as s:
        ...     s.write("a.bin", b"...")
        ...     s.publish()
    """

    def __init__(self, out, problem: Problem, arg: str = "out_dir", kind: str = "export"):
        self.requested = os.fspath(out)
        self.problem, self.arg, self.kind = problem, arg, kind
        self.out, self.parent, self.name = _split(self.requested)
        self.path: Optional[str] = None
        self._made: List[str] = []

    def __enter__(self) -> "StagedFolder":
        check_destination(self.requested, self.problem, self.arg, self.kind)
        clean_leftovers(self.out)
        self._make_parents()
        try:
            self.path = unique_name(self.parent, f".{self.name}.nchains-staging-", lambda p: os.mkdir(p, 0o777))
        except OSError as exc:
            self._remove_parents()
            raise ValueError(f"{self.arg} {self.requested!r}: cannot write in {self.parent!r}: "
                             f"{exc.strerror or exc}") from None
        pause_for_test("staging-created")
        return self

    def _make_parents(self) -> None:
        missing, folder = [], self.parent
        while folder and not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for folder in reversed(missing):
            try:
                os.mkdir(folder, 0o777)
            except OSError as exc:
                self._remove_parents()
                raise ValueError(f"{self.arg} {self.requested!r}: cannot create {folder!r}: "
                                 f"{exc.strerror or exc}") from None
            self._made.append(folder)

    def _remove_parents(self) -> None:
        for folder in reversed(self._made):
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._made = []

    def write(self, name: str, data: bytes) -> None:
        """Writes and syncs ``data`` as the file ``name`` of the set (a plain file name)."""
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"name must be a plain file name, got {name!r}")
        write_file(os.path.join(self.path, name), data, label=name)
        pause_for_test(f"written:{name}")

    def publish(self) -> None:
        """Puts the set in place of ``out`` atomically and deletes the previous one."""
        fsync_dir(self.path)
        check_destination(self.requested, self.problem, self.arg, self.kind)  # ``out`` may have changed during the work
        pause_for_test("before-publish")
        staging, self.path = self.path, None
        if not os.path.lexists(self.out):
            os.rename(staging, self.out)
            pause_for_test("after-publish")
        elif _exchange(staging, self.out):
            pause_for_test("after-publish")
            shutil.rmtree(staging, ignore_errors=True)  # the previous export, now under the staging name
        else:
            old = unique_name(self.parent, f".{self.name}.nchains-old-", lambda p: os.rename(self.out, p))
            pause_for_test("between-renames")
            try:
                os.rename(staging, self.out)
            except OSError:
                if not os.path.lexists(self.out):
                    os.rename(old, self.out)  # put the previous export back
                shutil.rmtree(staging, ignore_errors=True)
                raise
            pause_for_test("after-publish")
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(self.parent)
        self._made = []

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
            self._remove_parents()
