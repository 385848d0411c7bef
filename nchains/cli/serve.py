"""The ``nchains serve`` command: an export folder over HTTP on Ray Serve (:mod:`nchains.distributed.serve`).

The folder, runtime, host and port are checked before Ray starts; the command then serves until
interrupted (Ctrl-C, SIGTERM), and shuts Serve and its local Ray down cleanly.
"""

from __future__ import annotations

import signal
import sys
import threading


def add_command(sub) -> None:
    """Registers ``serve`` on an argparse sub-parsers object."""
    p = sub.add_parser("serve", help="serve an exported chain over HTTP on Ray Serve",
                       description="Serve an export folder (nchains export ... --out DIR): POST /predict with JSON "
                                   '{"inputs": [[...]]} (preprocessed, the manifest\'s input shape) or an image file '
                                   "(multipart form; the manifest's preprocessing is applied) returns logits and "
                                   "classes; GET / returns the manifest summary. Needs Ray: pip install nchains[ray].")
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="an export folder (manifest.json and artifacts)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--runtime", choices=["onnx", "pt2", "ts"], default="onnx",
                   help="artifact and runtime: onnx (onnxruntime, default), pt2 (torch.export), ts (TorchScript)")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas (default 1)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per replica (default: the runtime's)")
    p.add_argument("--address", default=None, help="a running Ray cluster (auto, HOST:PORT or ray://HOST:PORT); "
                                                   "default: start a local Ray")
    p.add_argument("--num-cpus", dest="num_cpus", type=int, default=None, help="CPUs of the local Ray (default all)")
    p.add_argument("--quiet", action="store_true", help="no start-up lines")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from nchains.distributed._ray import check_num_cpus
    from nchains.distributed.serve import serve_export, stop_serving

    for flag, value in (("--replicas", args.replicas), ("--threads", args.threads)):
        if value is not None and not 1 <= value <= 256:
            raise ValueError(f"{flag} must be between 1 and 256, got {value}")
    check_num_cpus(args.num_cpus, "--num-cpus")
    if args.address is not None and args.num_cpus is not None:
        raise ValueError("--num-cpus applies to a local Ray; a cluster given by --address has its own CPUs")
    url = serve_export(args.export_dir, host=args.host, port=args.port, runtime=args.runtime, replicas=args.replicas,
                       threads=args.threads, address=args.address, num_cpus=args.num_cpus)
    if not args.quiet:
        print(f"serving {args.export_dir} ({args.runtime}, {args.replicas} replica(s)) at {url}: "
              f"GET {url}/ , POST {url}/predict; Ctrl-C stops", file=sys.stderr, flush=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_serving()
        if not args.quiet:
            print("nchains serve: stopped", file=sys.stderr)
    return 0
