"""Reading an untrusted ``--weights`` file into a state_dict, and saying in one line why a file
cannot be read or does not fit a model.

Checkpoints load with ``torch.load(..., weights_only=True)`` (or safetensors), so no pickled
code ever runs. torch's own messages for a refused file advise re-running with
``weights_only=False``, which is exactly what must not be done with an untrusted file; they are
replaced here by what is wrong (the blocked global, a corrupt archive, a truncated file).
"""

from __future__ import annotations

import pickle
import re
from typing import Dict, List

import torch
from torch import nn

__all__ = ["load_state_dict_file", "load_weights_into", "describe_mismatch"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch's weights-only unpickler names a refused global in one of these two forms.
_GLOBAL = (re.compile(r"Unsupported global: GLOBAL ([\w.]+)"), re.compile(r"unsupported GLOBAL ([\w.]+)"))


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour/bold escape sequences."""
    return _ANSI.sub("", text)


def _unpickling_reason(exc: BaseException) -> str:
    """What a weights-only load refused, without torch's advice to disable the protection."""
    text = strip_ansi(str(exc))
    for pattern in _GLOBAL:
        found = pattern.search(text)
        if found:
            return (f"it needs the Python object {found.group(1)}, which nchains never unpickles "
                    "(it could run code); save model.state_dict() of plain tensors instead")
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    what = detail.group(1).strip().splitlines()[0] if detail else "its pickle data is invalid"
    return f"it is not a PyTorch checkpoint ({what.rstrip('.')})"


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """The state_dict in ``path`` (``.safetensors`` or a ``torch.save`` file).

    A ``{"state_dict": {...}}`` wrapper (Lightning-style) is unwrapped.

    Raises:
        ValueError: naming ``--weights``, the file and what is wrong with it (never suggesting
            ``weights_only=False``).
    """
    label = f"--weights {path!r}"
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{label} cannot be loaded safely: {_unpickling_reason(exc)}") from None
    except EOFError:
        raise ValueError(f"{label} is empty or truncated (not a PyTorch checkpoint)") from None
    except OSError as exc:
        raise ValueError(f"{label} cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - zip/safetensors/format errors are all "not a checkpoint"
        first = strip_ansi(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.split(". This is an internal")[0]  # miniz adds a paragraph of speculation
        raise ValueError(f"{label} is not a readable checkpoint: {first}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{label} holds a {type(state).__name__}, not a state_dict (a dict of tensors)")
    return state


def _first(names: List[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (", …" if len(names) > n else "")


def describe_mismatch(model: nn.Module, state: Dict[str, torch.Tensor]) -> str:
    """One line saying how ``state`` differs from ``model.state_dict()`` (empty when it fits):
    the counts and first names of missing and unexpected keys, and the first size mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    sizes = [f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
             for k in own if k in state and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} keys missing ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if sizes:
        parts.append(f"{len(sizes)} size mismatches ({_first(sizes, 2)})")
    return "; ".join(parts)


def load_weights_into(model: nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)`` (strict), or ValueError naming what does not fit."""
    problem = describe_mismatch(model, state)
    if problem:
        raise ValueError(f"--weights does not fit {what}: {problem}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise ValueError(f"--weights does not fit {what}: {strip_ansi(str(exc)).strip().splitlines()[-1]}") from None
