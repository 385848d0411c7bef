"""Load test of ``nchains serve``: the original model's export vs the chain's, on localhost.

Extracts a chain of the shipped model (or reads ``--chain``), exports it and the original model
(ONNX), serves each in turn on Ray Serve (one local Ray), and sends ``--requests`` POST
/predict requests (JSON, ``--batch`` preprocessed images each) from ``--concurrency`` client
threads. Prints p50/p99 latency and throughput per model, plus the in-process latency of the
same Predictor (no HTTP), in a table. The client shares the machine's cores with the server, so
on a small machine the figures are the whole loop's, not the server's alone.

Usage:
    python tools/bench_serve.py                       # 2000 requests, 16 concurrent
    python tools/bench_serve.py --requests 300 --concurrency 8 --steps 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's nchains


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per model (default 2000)")
    p.add_argument("--concurrency", type=int, default=16, help="client threads (default 16)")
    p.add_argument("--batch", type=int, default=1, help="images per request (default 1)")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas (default 1)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default all)")
    p.add_argument("--runtime", choices=["onnx"], default="onnx", help="served runtime (the original is ONNX only)")
    p.add_argument("--chain", default=None, help="a chain JSON of the shipped model (default: extract one)")
    p.add_argument("--classes", default="sneaker,ankle-boot", help="classes of the extracted chain")
    p.add_argument("--steps", type=int, default=300, help="scoring steps of the extracted chain (default 300)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    args = p.parse_args(argv)
    for name, low, high in (("requests", 1, 10**6), ("concurrency", 1, 1024), ("batch", 1, 256),
                            ("replicas", 1, 64), ("steps", 0, 10**6)):
        if not low <= getattr(args, name) <= high:
            p.error(f"--{name} must be between {low} and {high}, got {getattr(args, name)}")
    return args


def _exports(args, root: str):
    """(chain export folder, original export folder, the chain's images Tensor[N, 1, 28, 28])."""
    import nchains
    from nchains.export.module_export import export_module
    from nchains.models import zoo

    model = zoo.default_model()
    names = zoo.default_class_names()
    if args.chain:
        chain = nchains.Chain.load(args.chain)
        from nchains.models.image_source import images_from_source

        images = images_from_source(chain.images_source)[0]
    else:
        images, _, _ = zoo.default_images(args.classes.split(","), per_class=10)
        print(f"extracting a chain ({args.steps} steps) ...", file=sys.stderr)
        chain = nchains.extract(model, images, steps=args.steps, class_names=names, progress=False)
    chain_dir, original_dir = os.path.join(root, "chain"), os.path.join(root, "original")
    nchains.export(chain, model, chain_dir, formats="onnx", images=images, class_names=names)
    export_module(model, original_dir, images[:2], formats="onnx", images=images,
                  metadata={"class_names": names, "region": None})
    return chain_dir, original_dir, images, chain


def _load(url: str, bodies: List[bytes], concurrency: int) -> Dict[str, float]:
    import requests

    local = threading.local()
    lat: List[float] = []
    errors = [0]
    lock = threading.Lock()

    def one(body: bytes) -> None:
        session = getattr(local, "s", None) or requests.Session()
        local.s = session
        t = time.perf_counter()
        r = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=120)
        dt = time.perf_counter() - t
        with lock:
            lat.append(dt)
            errors[0] += r.status_code != 200

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    wall = time.perf_counter() - start
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {"p50": 1e3 * statistics.median(lat), "p99": 1e3 * q[98], "rps": len(lat) / wall, "errors": errors[0]}


def _in_process(predictor, x: np.ndarray, n: int = 200) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        predictor.predict("inputs", x)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    import json

    from nchains.distributed._ray import start_ray
    from nchains.distributed.predictor import Predictor
    from nchains.distributed.serve import serve_export, stop_serving

    args = _args(argv)
    with tempfile.TemporaryDirectory(prefix="nchains-bench-serve-") as root:
        chain_dir, original_dir, images, chain = _exports(args, root)
        rng = np.random.default_rng(0)
        picks = [rng.integers(0, len(images), args.batch) for _ in range(args.requests)]
        bodies = [json.dumps({"inputs": images[p].tolist()}).encode() for p in picks]
        with open(os.path.join(chain_dir, "manifest.json")) as f:
            compact = json.load(f)["compact"]
        ray, started = start_ray(None, args.num_cpus, what="bench_serve")
        rows = []
        try:
            for label, folder in (("original", original_dir), ("chain", chain_dir)):
                macs = compact["original_macs" if label == "original" else "macs"]
                direct = _in_process(Predictor(folder, args.runtime), images[picks[0]].numpy())
                port = args.port or _free_port()
                url = serve_export(folder, port=port, runtime=args.runtime, replicas=args.replicas)
                try:
                    _load(url + "/predict", bodies[: min(50, len(bodies))], args.concurrency)  # warm-up
                    stats = _load(url + "/predict", bodies, args.concurrency)
                finally:
                    stop_serving()
                rows.append((label, macs, direct, stats))
        finally:
            if started:
                ray.shutdown()
    print(f"\nnchains serve load test: {args.requests} requests of {args.batch} image(s), {args.concurrency} "
          f"concurrent, {args.replicas} replica(s), {args.runtime}; chain keeps "
          f"{chain.metrics['filters_kept']}/{chain.metrics['filters_total']} filters")
    print(f"{'model':<10} {'MACs/image':>11} {'in-process ms':>14} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>7}")
    for label, macs, direct, s in rows:
        macs_text = f"{macs / 1e6:.2f} M"
        print(f"{label:<10} {macs_text:>11} {direct:>14.3f} {s['p50']:>8.2f} {s['p99']:>8.2f} {s['rps']:>8.1f} "
              f"{s['errors']:>7d}")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
