"""Trains the default model shipped in ``nchains/models/data`` (Fashion-MNIST ResNet).

Writes, atomically, into ``--out-dir`` (default ``nchains/models/data``):

- ``fashion_resnet.safetensors``: float32 state_dict of ``zoo.fashion_resnet()``;
- ``fashion_sample.npz``: 100 test images per class (``images`` uint8 [1000, 28, 28],
  ``labels`` int64 [1000], ``indices`` int64 [1000] into the 10000-image test split);
- ``fashion_resnet.json``: class names, mean/std, test accuracy, seed, command, timing.

Runs on the CPU with 2 threads, seeded (initialisation, data order and augmentation):
about 0.3 s per batch of 128, so ~12 minutes for 5 epochs on 2 idle cores (the shipped
run took 34 minutes with other jobs sharing the cores; it reached 92.1% test accuracy)::

    python tools/train_default.py --epochs 5

Needs the Debian package ``dataset-fashion-mnist`` (or ``--root``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

# Other processes share the 2 cores: with OpenMP's default spin-waiting, an
# oversubscribed CPU makes each step ~10x slower (measured: 6 s vs 0.5 s per batch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

try:
    from nchains.models import zoo
except ImportError:  # compiled extension not built yet: zoo.py needs none of it
    import importlib.util

    _spec = importlib.util.spec_from_file_location("nchains_zoo", REPO / "nchains" / "zoo.py")
    zoo = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(zoo)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temp file next to ``path``, then renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per image.

    Args:
        x (Tensor[N, H, W], uint8): Raw images.
        gen (torch.Generator): Seeded generator (deterministic augmentation).
        pad (int): Padding of the random crop.

    Returns:
        Tensor[N, H, W], uint8.
    """
    n, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # pads raw pixels with 0 = background
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None], out.flip(-1), out)


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalised float [N, 1, 28, 28] in channels_last."""
    return zoo.normalize_fashion(x).unsqueeze(1).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 500):
        pred = model(to_input(images[i : i + 500])).argmax(1)
        correct += int((pred == labels[i : i + 500]).sum())
    return correct / len(images)


def pick_sample(labels: torch.Tensor, per_class: int, seed: int) -> np.ndarray:
    """Test indices of ``per_class`` random images per class, grouped by class, sorted."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    return np.concatenate(
        [np.sort(rng.choice(np.flatnonzero(y == c), per_class, replace=False)) for c in range(10)]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (one-cycle)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", default=None, help="Fashion-MNIST idx directory")
    p.add_argument("--out-dir", type=Path, default=REPO / "nchains" / "models" / "data")
    p.add_argument("--per-class", type=int, default=100, help="sample images per class")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()

    train_x, train_y = zoo.load_fashion_mnist("train", root=args.root)
    test_x, test_y = zoo.load_fashion_mnist("test", root=args.root)
    pixels = train_x.float() / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    del pixels
    print(f"train {tuple(train_x.shape)}  test {tuple(test_x.shape)}  "
          f"pixel mean {mean:.4f} std {std:.4f} (using {zoo.FASHION_MEAN}, {zoo.FASHION_STD})",
          flush=True)

    model = zoo.fashion_resnet(10).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    # No weight decay on BN affine and biases (standard; keeps BN scales meaningful).
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, div_factor=10.0, final_div_factor=100.0,
    )
    gen = torch.Generator().manual_seed(args.seed)
    print(f"fashion_resnet: {n_params} parameters; {args.epochs} epochs x "
          f"{steps_per_epoch} steps, batch {args.batch_size}, {args.threads} threads", flush=True)

    t_train = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.time()
        order = torch.randperm(len(train_x), generator=gen)
        loss_sum, correct = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            x = to_input(augment(train_x[idx], gen))
            y = train_y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            if (step + 1) % 100 == 0:
                print(f"  epoch {epoch} step {step + 1}/{steps_per_epoch} loss {loss.item():.4f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
        print(f"epoch {epoch}/{args.epochs}: train loss {loss_sum / len(train_x):.4f} "
              f"acc {correct / len(train_x):.4f}  lr {sched.get_last_lr()[0]:.2e}  "
              f"{time.time() - t0:.0f}s (total {time.time() - t_train:.0f}s)", flush=True)
    train_seconds = time.time() - t_train

    model = model.to(memory_format=torch.contiguous_format).eval()
    test_acc = evaluate(model, test_x, test_y)
    sample_idx = pick_sample(test_y, args.per_class, args.seed)
    sample_acc = evaluate(model, test_x[sample_idx], test_y[sample_idx])
    print(f"test accuracy {test_acc:.4f} (10000 images); shipped sample {sample_acc:.4f}",
          flush=True)

    from safetensors.torch import save

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    weights = save(state, metadata={"arch": "nchains.zoo.fashion_resnet", "num_classes": "10"})
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        images=test_x[sample_idx].numpy().astype(np.uint8),
        labels=test_y[sample_idx].numpy().astype(np.int64),
        indices=sample_idx.astype(np.int64),
    )
    info = {
        "arch": "nchains.zoo.fashion_resnet",
        "num_classes": 10,
        "num_parameters": n_params,
        "classes": list(zoo.FASHION_CLASSES),
        "class_names": list(zoo.FASHION_CLASS_NAMES),
        "mean": zoo.FASHION_MEAN,
        "std": zoo.FASHION_STD,
        "train_pixel_mean": round(mean, 6),
        "train_pixel_std": round(std, 6),
        "test_accuracy": test_acc,
        "sample_accuracy": sample_acc,
        "sample_per_class": args.per_class,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"SGD(momentum=0.9, nesterov, wd={args.weight_decay}) "
        f"+ OneCycleLR(max_lr={args.lr})",
        "augmentation": "random crop (zero pad 2) + horizontal flip",
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "command": "python tools/train_default.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    atomic_write_bytes(args.out_dir / "fashion_resnet.safetensors", weights)
    atomic_write_bytes(args.out_dir / "fashion_sample.npz", buf.getvalue())
    atomic_write_bytes(args.out_dir / "fashion_resnet.json",
                       (json.dumps(info, indent=2) + "\n").encode())
    for name in ("fashion_resnet.safetensors", "fashion_sample.npz", "fashion_resnet.json"):
        print(f"wrote {args.out_dir / name} ({(args.out_dir / name).stat().st_size} bytes)")
    print(f"done in {time.time() - t_start:.0f}s (training {train_seconds:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
