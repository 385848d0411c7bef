"""Benchmark: original model vs the compact model of a chain, in eager PyTorch, TorchScript and
onnxruntime.

For each model (the shipped Fashion-MNIST ResNet, torchvision ResNet-50 and VGG-19 with random
weights) a chain comes from a short NeuroChains extraction; for the random-weight models the
learned scores are thresholded at a quantile so that about ``--keep`` of the filters survive
(random weights give no meaningful chain, only a realistic sparsity pattern). Prints parameters,
MACs (multiply-accumulates) and median latency at batch 1 and 20 of the original and the compact
model, the measured speed-up and the target ``speed-up >= 0.6 x MAC ratio``. The MAC ratio is the
chain's: the original's MACs over the unpadded compact model's. An exported artifact computes more
(it pads channel counts to its format's ``channel_multiple`` with zero channels): column ``art. MACs``
shows what it computes, but the target does not move with it. The eager rows time
``compact(chain, model)`` (unpadded).

Timings run inside :func:`nchains._memory.keep_freed_memory` (both models alike), as an
inference server configures its allocator (jemalloc, tcmalloc or glibc's MALLOC_MMAP_THRESHOLD_):
with glibc's defaults every activation above 32 MiB is a fresh mmap whose pages fault in on
first touch, which on this VM costs more than the convolution writing them (VGG-19's first conv
at batch 20: 188 ms, 55 ms without the faults). ``--glibc-defaults`` measures without it.

    python tools/bench_export.py                      # all three models, 128x128 inputs
    python tools/bench_export.py --models resnet50 --size 224 --reps 10
    python tools/bench_export.py --models fashion --onnx-channel-multiple 1   # ONNX without padding
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nchains.neurochains.chain import Chain  # noqa: E402
from nchains.compact.walk import compact  # noqa: E402
from nchains.export.exporter import _EXPORTERS, export  # noqa: E402
from nchains.neurochains.extraction import extract  # noqa: E402
from nchains.export.artifacts import model_stats  # noqa: E402
from nchains._util.memory import keep_freed_memory  # noqa: E402


def _paired_ms(orig, comp, x, reps: int):
    """Median latencies (ms) of ``orig`` and ``comp`` and the median of their per-pair ratio.
    Runs alternate, so both see the same machine load (the bench machine may be shared)."""
    times = {orig: [], comp: []}
    with torch.no_grad():
        for fn in (orig, comp, orig, comp, orig, comp):  # warm-up (TorchScript profiles its first runs)
            fn(x)
        for _ in range(reps):
            for fn in (orig, comp):
                t = time.perf_counter()
                fn(x)
                times[fn].append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(times[orig], times[comp])]
    return 1000 * statistics.median(times[orig]), 1000 * statistics.median(times[comp]), statistics.median(ratios)


def _quantile_chain(chain: Chain, keep: float) -> Chain:
    """The same chain with filters kept where |score| is in the top ``keep`` fraction."""
    scores = torch.cat([torch.as_tensor(v, dtype=torch.float64).abs() for v in chain.scores.values() if v])
    tau = float(torch.quantile(scores, 1 - keep)) if len(scores) else 0.0
    kept, vals = {}, {}
    for name, idx in chain.kept.items():
        pairs = [(i, s) for i, s in zip(idx, chain.scores[name]) if abs(s) >= tau]
        kept[name] = [i for i, _ in pairs]
        vals[name] = [s for _, s in pairs]
    d = chain.to_dict()
    d.update(kept=kept, scores=vals)
    metrics = dict(chain.metrics)
    metrics["filters_kept"] = sum(len(v) for v in kept.values())
    d["metrics"] = metrics
    return Chain.from_dict(d)


def _build(name: str, size: int, steps: int, keep: float):
    if name == "fashion":
        from nchains.models import zoo

        try:
            model = zoo.default_model()
            images, _, _ = zoo.default_images(["sneaker", "ankle-boot"], per_class=10)
        except FileNotFoundError as exc:
            print(f"[skip] shipped model not available: {exc}", file=sys.stderr)
            return None
        chain = extract(model, images, class_names=zoo.default_class_names(), model_spec={"kind": "default"})
        return model, images, chain
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    images = torch.randn(4, 3, size, size)
    for attempt in range(3):
        try:
            chain = extract(model, images, steps=steps, lr=0.05, tau=0.0, finetune=False, stop_delta=None,
                            lam_gate=0.0, seed=attempt)
            break
        except RuntimeError as exc:  # report and retry with another seed
            print(f"[{name}] extraction failed ({exc}); retrying", file=sys.stderr)
    else:
        return None
    return model, images, _quantile_chain(chain, keep)


def _ort(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy()})[0]


def _onnx_bytes(model, x) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        return program.model_proto.SerializeToString()


def _ts(model, x):
    """The original model as TorchScript, prepared as nchains prepares chain.ts (scripted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.jit.script(model.eval())
        except Exception:  # noqa: BLE001 - not scriptable: trace
            module = torch.jit.trace(model.eval(), x, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        return torch.jit.load(buf)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="fashion,resnet50,vgg19")
    p.add_argument("--size", type=int, default=128, help="input size of the torchvision models (default 128)")
    p.add_argument("--steps", type=int, default=20, help="extraction steps for the random-weight models")
    p.add_argument("--keep", type=float, default=0.3, help="fraction of filters kept (random-weight models)")
    p.add_argument("--reps", type=int, default=11, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of PyTorch and onnxruntime (default 1: stable on a shared machine)")
    p.add_argument("--glibc-defaults", action="store_true",
                   help="time with glibc's allocator defaults (fresh mmap and page faults for blocks above 32 MiB)")
    p.add_argument("--onnx-channel-multiple", type=int, default=None,
                   help="compact(channel_multiple=...) of the ONNX artifact (default: export's, "
                        f"{_EXPORTERS['onnx'].channel_multiple})")
    args = p.parse_args(argv)
    if args.onnx_channel_multiple is not None:
        _EXPORTERS["onnx"] = dataclasses.replace(_EXPORTERS["onnx"], channel_multiple=args.onnx_channel_multiple)
    onnx_cm = _EXPORTERS["onnx"].channel_multiple
    torch.set_num_threads(args.threads)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        rows = []  # this model's table, printed as soon as it is measured
        built = _build(name, args.size, args.steps, args.keep)
        if built is None:
            continue
        model, images, chain = built
        small = compact(chain, model)
        shape = chain.input_shape
        s_orig, s_small = model_stats(model, shape), model_stats(small, shape)
        with tempfile.TemporaryDirectory() as tmp:
            manifest = export(chain, model, tmp, images=images)  # verified artifacts, as deployed
            formats = manifest["verification"]["formats"]  # what each artifact computes (padding)
            s_art = {"eager": s_small, "torchscript": formats["torchscript"], "onnxruntime": formats["onnx"]}
            ts_small = torch.jit.load(os.path.join(tmp, "chain.ts"))
            ort_small = _ort(os.path.join(tmp, "chain.onnx"), args.threads)
            x2 = torch.randn(2, *shape)
            ts_orig = _ts(model, x2)
            with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
                f.write(_onnx_bytes(model, x2))
                f.flush()
                ort_orig = _ort(f.name, args.threads)
            print(f"[{name}] chain {chain.metrics.get('filters_kept')}/{chain.metrics.get('filters_total')} "
                  f"filters, built and exported in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            for batch in (1, 20):
                x = torch.randn(batch, *shape)
                for runtime, orig, comp in (("eager", model, small), ("torchscript", ts_orig, ts_small),
                                            ("onnxruntime", ort_orig, ort_small)):
                    with keep_freed_memory(enabled=not args.glibc_defaults):
                        t_o, t_c, speed = _paired_ms(orig, comp, x, args.reps)
                    s_c = s_art[runtime]
                    ratio = s_orig["macs"] / max(s_small["macs"], 1)
                    rows.append((name, runtime, batch, s_orig["params"], s_c["params"], s_orig["macs"],
                                 s_small["macs"], s_c["macs"], ratio, t_o, t_c, speed))
        _print(rows)
    print("MACs: multiply-accumulates of conv and linear layers per image; MAC x = original / compact (the "
          "chain's, unpadded); art. MACs: what the timed artifact computes; "
          "target = 0.6 x MAC x; latency = median wall time of one forward pass; speed-up = median of the "
          f"ratios of interleaved runs; {args.threads} thread(s); ONNX channel_multiple {onnx_cm}; allocator: "
          + ("glibc defaults" if args.glibc_defaults else "freed memory kept (keep_freed_memory)"))
    return 0


def _print(rows) -> None:
    head = ("model", "runtime", "batch", "params", "params'", "MACs", "MACs'", "art. MACs", "MAC x", "orig ms",
            "compact ms", "speed-up", "target", "met")
    lines = [head]
    for name, rt, b, po, pc, fo, fc, fa, ratio, to, tc, speed in rows:
        lines.append((name, rt, str(b), f"{po / 1e6:.2f}M", f"{pc / 1e6:.2f}M", f"{fo / 1e6:.1f}M", f"{fc / 1e6:.1f}M",
                      f"{fa / 1e6:.1f}M", f"{ratio:.2f}", f"{to:.2f}", f"{tc:.2f}", f"{speed:.2f}",
                      f"{0.6 * ratio:.2f}", "yes" if speed >= 0.6 * ratio else "no"))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    for k, r in enumerate(lines):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
