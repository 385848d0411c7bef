"""Serving an export folder over HTTP on Ray Serve.

:func:`serve_export` checks the folder (a :class:`~nchains.distributed.predictor.Predictor` is
built once in the caller, so a bad folder or runtime fails before Ray starts), then runs a
Ray Serve deployment (:mod:`nchains.distributed._app`) of ``replicas`` replicas, each holding
its own Predictor, behind a FastAPI ingress:

- ``GET /``: the manifest summary (region, class names, input, verification, size);
- ``POST /predict``: JSON ``{"inputs": [...]}`` or an image file -> ``{"logits", "predicted",
  "classes"}``.

Every bad request is answered with a 4xx status and ``{"error": "<one line>"}``; an unexpected
failure is a 500 with a one-line ``error`` too, never a traceback. :func:`stop_serving` shuts
Serve down (and the Ray that :func:`serve_export` started).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Optional

from nchains.distributed._ray import check_address, check_num_cpus, require_ray, start_ray, stop_ray
from nchains.distributed.predictor import RUNTIME_FORMATS, Predictor

__all__ = ["serve_export", "stop_serving", "APP_NAME"]

APP_NAME = "nchains"
_STARTED_RAY = []  # whether serve_export started the Ray that stop_serving must shut down


def _check_port(host: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer between 1 and 65535, got {port!r}")
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a host name or address such as 127.0.0.1, got {host!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"host {host!r} cannot be resolved: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise ValueError(f"port {port} on {host} {why}; give another --port") from None


def serve_export(folder, *, host: str = "127.0.0.1", port: int = 8000, runtime: str = "onnx", replicas: int = 1,
                 threads: Optional[int] = None, address: Optional[str] = None, num_cpus: Optional[int] = None) -> str:
    """Starts serving ``folder`` and returns its URL (``http://HOST:PORT``); returns when the
    replicas are up. Call :func:`stop_serving` to stop.

    Args:
        folder (path): an export folder (``nchains export chain.json --out DIR``).
        host (str): address the HTTP proxy listens on (127.0.0.1: this machine only).
        port (int): its port.
        runtime (str): ``onnx``, ``pt2`` or ``ts`` (the artifact each replica loads).
        replicas (int): Serve replicas (1 CPU each, or ``threads``).
        threads (int): intra-op threads per replica (default: the runtime's).
        address (str): a running Ray cluster (default: a local Ray with ``num_cpus`` CPUs).
        num_cpus (int): CPUs of the local Ray.

    Raises:
        ValueError: a bad argument, a folder that is not a verified export with that runtime's
            artifact, a port in use; before Ray is started.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 256:
        raise ValueError(f"replicas must be an integer between 1 and 256, got {replicas!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 256):
        raise ValueError(f"threads must be an integer between 1 and 256, got {threads!r}")
    if runtime not in RUNTIME_FORMATS:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIME_FORMATS)}, got {runtime!r}")
    check_address(address)
    check_num_cpus(num_cpus)
    _check_port(host, port)
    require_ray("nchains serve", serve=True)
    Predictor(folder, runtime)  # a bad folder fails here, in one line, not inside a replica
    folder = os.path.abspath(os.fspath(folder))  # replicas may run in another working folder
    ray, started = start_ray(address, num_cpus, what="nchains serve")
    from ray import serve

    try:
        serve.start(http_options={"host": host, "port": port})
        from nchains.distributed._app import ChainServer

        deployment = ChainServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": threads or 1})
        serve.run(deployment.bind(folder, runtime, threads), name=APP_NAME, route_prefix="/")
    except BaseException:
        _shutdown(ray, serve, started)
        raise
    _STARTED_RAY.append(started)
    return f"http://{host}:{port}"


def _shutdown(ray, serve, started: bool) -> None:
    try:
        serve.shutdown()
    finally:
        stop_ray(ray, started)


def stop_serving() -> None:
    """Stops Serve, and the local Ray when :func:`serve_export` started it."""
    ray = require_ray("nchains serve", serve=True)
    from ray import serve

    started = _STARTED_RAY.pop() if _STARTED_RAY else False
    _shutdown(ray, serve, started)
