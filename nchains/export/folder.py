"""What an export folder may hold, and where a manifest may point.

A manifest names each artifact by a plain file name inside its folder: no separator, not
``.``/``..``, not absolute, not a symlink to somewhere outside. :func:`artifact_path` refuses
anything else, so ``inspect`` never hashes or reads a file outside the folder (a hostile
manifest entry ``../other/chain.ts`` or ``/etc/passwd``).

:func:`replace_problem` decides whether an existing folder may be replaced by a new export as a
whole: only an empty folder or an earlier nchains export (its manifest, the artifacts it lists,
nchains artifact names and the temporary files of earlier nchains versions), never a folder
holding anything of the user's. :func:`check_export_destination` checks that before any work.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional

from nchains._util.publish import check_writable
from nchains.export.artifacts import EXPORT_FORMAT, FILES, MANIFEST

__all__ = ["artifact_path", "check_export_destination", "manifest_artifacts", "replace_problem"]

# temporary files written inside an export folder by earlier nchains versions, by write_atomic and
# by the CLI's writability probe (nchains.cli._outputs), left there when a run was killed
_OUR_TEMPS = re.compile(r"^\.tmp-.+|^\..+\.nchains-tmp-\d+-[0-9a-f]+$|^\.nchains-probe-\w+$")


def _plain_name(name: Any) -> bool:
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(s in name for s in seps)
            and "\x00" not in name and not os.path.isabs(name))


def artifact_path(folder: str, field: str, name: Any) -> str:
    """The path of the artifact ``name`` inside ``folder``.

    Args:
        folder (str): the export folder.
        field (str): the manifest field that gives ``name`` (for the message), e.g.
            ``artifacts.onnx.file``.
        name: the file name the manifest gives.

    Raises:
        ValueError: when ``name`` is not a plain file name, or is a symlink leaving ``folder``.
    """
    if not _plain_name(name):
        raise ValueError(f"manifest {field}: {name!r} is not a plain file name inside the export folder "
                         "(no path separators, '..' or absolute paths)")
    path = os.path.join(folder, name)
    if os.path.islink(path):
        target = os.path.realpath(path)
        if os.path.dirname(target) != os.path.realpath(folder):
            raise ValueError(f"manifest {field}: {name!r} is a symlink leaving the export folder (to {target!r})")
    return path


def manifest_artifacts(manifest: Dict[str, Any], folder: str) -> Dict[str, str]:
    """Format -> checked path of every artifact a manifest lists (ValueError naming the field)."""
    entries = manifest.get("artifacts", {})
    if not isinstance(entries, dict):
        raise ValueError(f"manifest artifacts must be an object (format -> entry), got {type(entries).__name__}")
    out = {}
    for fmt, entry in entries.items():
        if not isinstance(entry, dict):
            raise ValueError(f"manifest artifacts.{fmt} must be an object with file, sha256 and bytes, "
                             f"got {type(entry).__name__}")
        out[fmt] = artifact_path(folder, f"artifacts.{fmt}.file", entry.get("file"))
    return out


def _read_manifest(folder: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT else None


def replace_problem(folder: str) -> Optional[str]:
    """None when ``folder`` may be replaced as a whole by a new export, else why not.

    Args:
        folder (str): an existing folder.

    Returns:
        None for an empty folder or an earlier nchains export holding only its own files;
        otherwise a short reason (no manifest, or the first foreign entries).
    """
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        return f"cannot be listed: {exc.strerror or exc}"
    if not entries:
        return None
    manifest = _read_manifest(folder)
    if manifest is None:
        return f"no nchains {MANIFEST} in it"
    ours = {MANIFEST, *FILES.values()}
    for entry in manifest.get("artifacts", {}).values() if isinstance(manifest.get("artifacts"), dict) else []:
        if isinstance(entry, dict) and _plain_name(entry.get("file")):
            ours.add(entry["file"])
    foreign = [e for e in entries if not (e in ours or _OUR_TEMPS.match(e))
               or not os.path.isfile(os.path.join(folder, e)) or os.path.islink(os.path.join(folder, e))]
    if foreign:
        return f"it holds {', '.join(map(repr, foreign[:3]))}{' …' if len(foreign) > 3 else ''} besides an export"
    return None


def check_export_destination(out_dir, arg: str = "out_dir") -> None:
    """ValueError (naming ``arg``) unless an export can be published at ``out_dir``: a new
    folder, an empty one or an earlier export, with a parent that accepts a staging folder.
    Leaves nothing behind; :func:`nchains.export` checks the same before its work."""
    check_writable(out_dir, replace_problem, arg)
