"""Ray, imported lazily: nchains imports and every other command runs without it.

:func:`require_ray` is the one place that imports ``ray`` (and ``ray.serve``); without it the
caller gets one line naming the install command. :func:`start_ray` connects to a running
cluster (``address``) or starts a local one with ``num_cpus`` CPUs, usage statistics and the
dashboard off, and worker logs kept out of the driver's terminal.
"""

from __future__ import annotations

import builtins
import os
from typing import Optional, Tuple

INSTALL_HINT = "pip install nchains[ray]"


def require_ray(what: str = "this", serve: bool = False):
    """The ``ray`` module (and ``ray.serve`` when ``serve``), or ValueError ``<what> needs Ray: pip
    install nchains[ray]`` when Ray (or Ray Serve) is not installed."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from any Ray we start
    try:
        import ray

        if serve:
            from ray import serve as _serve  # noqa: F401 - ray[serve] pulls fastapi, uvicorn, starlette
    except ImportError as exc:
        extra = " Serve" if serve else ""
        raise ValueError(f"{what} needs Ray{extra}: {INSTALL_HINT} (import failed: {exc})") from None
    return ray


def check_num_cpus(num_cpus: Optional[int], arg: str = "num_cpus") -> Optional[int]:
    """``num_cpus`` when None or an int in [1, 4096]; ValueError naming ``arg`` otherwise."""
    if num_cpus is None:
        return None
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or not 1 <= num_cpus <= 4096:
        raise ValueError(f"{arg} must be an integer between 1 and 4096, got {num_cpus!r}")
    return num_cpus


def check_address(address: Optional[str], arg: str = "address") -> Optional[str]:
    """``address`` when None, ``auto`` or ``[ray://]host:port``; ValueError naming ``arg`` otherwise."""
    if address is None or address == "auto":
        return address
    rest = address[len("ray://"):] if isinstance(address, str) and address.startswith("ray://") else address
    host, _, port = rest.rpartition(":") if isinstance(rest, str) else ("", "", "")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{arg} must be 'auto' or [ray://]HOST:PORT of a running Ray cluster (`ray start --head` "
                         f"prints it), got {address!r}")
    return address


def local_runtime_env() -> dict:
    """The runtime environment of a local Ray's workers: this process's nchains first on their
    ``PYTHONPATH``, so that workers import the same nchains as the driver whatever their
    working folder (a cluster's nodes need nchains installed instead)."""
    import nchains

    root = os.path.dirname(os.path.dirname(os.path.abspath(nchains.__file__)))
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


#: ``builtins.print`` as it was before each :func:`start_ray`: Ray's driver replaces it with
#: ``ray.experimental.tqdm_ray.safe_print`` once a worker's output reaches it, for the rest of the
#: process (the caller's pickles of ``print`` then name Ray's function); :func:`stop_ray` puts it back.
_PRINT: list = []


def stop_ray(ray, started: bool) -> None:
    """Ends what :func:`start_ray` began: shuts Ray down when that call started it, and restores
    ``builtins.print`` in any case."""
    try:
        if started:
            ray.shutdown()
    finally:
        if _PRINT:
            builtins.print = _PRINT.pop()


def start_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, what: str = "this") -> Tuple[object, bool]:
    """Connects to Ray.

    Args:
        address (str): a running cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``); None
            starts a local Ray (or reuses the one this process already started).
        num_cpus (int): CPUs of the local Ray (default: all); not with ``address``.
        what (str): the command or function that needs Ray, for the message when it is missing.

    Returns:
        tuple: the ``ray`` module and whether this call started the connection (the caller
        then shuts it down when done; a connection made before is left alone).
    """
    ray = require_ray(what)
    check_address(address)
    check_num_cpus(num_cpus)
    if address is not None and num_cpus is not None:
        raise ValueError(f"num_cpus {num_cpus} applies to a local Ray; a cluster at {address!r} has its own CPUs")
    _PRINT.append(builtins.print)
    if ray.is_initialized():
        return ray, False
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, runtime_env=local_runtime_env(), **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ValueError(f"cannot connect to the Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from None
    return ray, True
