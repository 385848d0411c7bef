"""What each kept filter of a chain responds to: activation maximisation (Erhan et al. 2009,
"Visualizing higher-layer features of a deep network") and its top-activating images.

Activation maximisation searches the input that maximises one filter's mean activation (over
the pixels of its map) in the chain's masked model, by gradient ascent from small seeded noise.
All kept filters are optimised together: a batch with one input per filter (all filters of a
layer, and the report puts every layer's in the same batch), one forward and one backward per
step (the forward stops at the deepest layer: :mod:`.unit_outputs`). It starts from seeded
Gaussian noise of standard deviation ``INIT_STD`` [1.0, the scale of preprocessed inputs; small
noise leaves many ReLU filters at exactly 0, where the gradient is 0 too]. Each step
(defaults in brackets):

1. *jitter*: the batch is rolled by a random shift of up to ``jitter`` pixels in each direction
   [``max(1, H // 28)``], so no pattern can depend on exact pixel positions;
2. the objective per input ``i`` is ``mean_hw a_{f_i}(x_i) - l2 * mean(x_i^2)`` [``l2 = 0.01``]:
   Erhan et al. bound the input's norm, a weight decay keeps it bounded too;
3. one Adam step on the inputs [``lr = 0.1``, ``steps = 64``];
4. every ``blur_every`` steps [4] of the first three quarters a 3x3 Gaussian blur (sigma
   ``blur_sigma`` [0.5]) removes the high-frequency patterns gradient ascent otherwise
   produces (the last quarter climbs the objective itself);
5. the inputs are clipped to ``bounds`` (per channel; the report uses the range of the chain's
   images), so they stay values a preprocessed image can take.

The result is drawn by the report scaled to its own range, like the images.
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nchains.report.unit_outputs import unit_outputs

__all__ = ["ActMax", "activation_maximisation", "channel_bounds", "mean_activations", "top_activating"]

DEFAULT_STEPS = 64
DEFAULT_LR = 0.1
DEFAULT_L2 = 0.01
DEFAULT_BLUR_EVERY = 4
DEFAULT_BLUR_SIGMA = 0.5
#: Inputs per batch: at most 256, and at most 2**21 input values (13 ImageNet 224x224 images).
MAX_BATCH, MAX_VALUES = 256, 2 ** 21
#: Standard deviation of the starting noise (preprocessed inputs have about unit variance).
INIT_STD = 1.0


class ActMax(NamedTuple):
    """Result of :func:`activation_maximisation`.

    Attributes:
        images (Tensor[K, C, H, W]): the input found for each filter (CPU, model dtype).
        start (Tensor[K]): each filter's mean activation on its starting noise.
        final (Tensor[K]): its mean activation on the result.
    """

    images: torch.Tensor
    start: torch.Tensor
    final: torch.Tensor


def _check(name: str, value, low: float, integer: bool = False, high: float = math.inf):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (low <= value <= high) or not math.isfinite(value):
        kind = "an int" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} in [{low}, {high}], got {value!r}")


def channel_bounds(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(low, high)`` of ``images`` (Tensor[N, C, H, W]), each ``Tensor[C]``."""
    per = images.detach().transpose(0, 1).flatten(1)
    return per.min(1).values, per.max(1).values


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    t = torch.arange(-1, 2, dtype=x.dtype, device=x.device)
    k1 = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k1[:, None] * k1[None, :]) / k1.sum() ** 2
    c = x.shape[1]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3).contiguous(), groups=c)


def _objective(masked, targets: Sequence[Tuple[str, int]], x: torch.Tensor) -> torch.Tensor:
    """Row ``i``'s mean activation of filter ``targets[i]`` on ``x[i]``, ``Tensor[len(targets)]``."""
    outs = unit_outputs(masked, [layer for layer, _ in targets], x)
    rows: Dict[str, List[int]] = {}
    for i, (layer, _) in enumerate(targets):
        rows.setdefault(layer, []).append(i)
    gain = x.new_zeros(len(targets))
    for layer, idx in rows.items():
        r = torch.tensor(idx, device=x.device)
        f = torch.tensor([targets[i][1] for i in idx], device=x.device)
        gain = gain.index_add(0, r, outs[layer][r, f].flatten(1).mean(1))
    return gain


def activation_maximisation(masked, targets: Sequence[Tuple[str, int]], input_shape: Sequence[int], *,
                            steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, l2: float = DEFAULT_L2,
                            jitter: Optional[int] = None, blur_every: int = DEFAULT_BLUR_EVERY,
                            blur_sigma: float = DEFAULT_BLUR_SIGMA, bounds=None, seed: int = 0,
                            batch_size: Optional[int] = None, progress: bool = False) -> ActMax:
    """The input that maximises each target filter's mean activation (see the module docstring).

    All targets of a batch (all kept filters of a layer, or of several layers) are optimised in
    one batch: input ``i`` serves ``targets[i]``; one forward (up to the deepest layer named)
    and one backward per step.

    Args:
        masked (ScoredModel): the chain's masked model (``chain.apply(model)``).
        targets (sequence of (str, int)): ``(layer, filter)`` pairs, layers the chain computes.
        input_shape (sequence of 3 ints): ``[C, H, W]`` of the model's inputs.
        steps (int): gradient steps, in [0, 10^5].
        lr (float): Adam's learning rate, > 0.
        l2 (float): weight of the mean squared input, >= 0.
        jitter (int): largest random shift in pixels (default ``max(1, H // 28)``; 0: none).
        blur_every (int): blur every this many steps (0: never).
        blur_sigma (float): the blur's standard deviation in pixels, > 0.
        bounds: ``(low, high)``, floats or ``Tensor[C]``; None: unbounded.
        seed (int): seed of the starting noise and the jitter.
        batch_size (int): targets optimised together (more are done in chunks, in order);
            default: ``MAX_BATCH``, fewer for large inputs (``MAX_VALUES`` input values).
        progress (bool): a progress bar over the steps on stderr.

    Returns:
        ActMax, rows in the order of ``targets``.
    """
    c, h, w = (int(v) for v in input_shape)
    batch_size = max(1, min(MAX_BATCH, MAX_VALUES // (c * h * w))) if batch_size is None else batch_size
    for name, value, low, integer in (("steps", steps, 0, True), ("lr", lr, 1e-12, False), ("l2", l2, 0, False),
                                      ("blur_every", blur_every, 0, True), ("blur_sigma", blur_sigma, 1e-6, False),
                                      ("seed", seed, 0, True), ("batch_size", batch_size, 1, True)):
        _check(name, value, low, integer, 1e5 if name in ("steps", "blur_every") else math.inf)
    jitter = max(1, h // 28) if jitter is None else jitter
    _check("jitter", jitter, 0, True, max(h, w))
    targets = [(str(layer), int(f)) for layer, f in targets]
    if not targets:
        raise ValueError("targets must name at least one (layer, filter)")
    ref = masked.flat_scores
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (None, None) if bounds is None else (torch.as_tensor(b, dtype=ref.dtype).to(ref.device).reshape(-1, 1, 1)
                                                  for b in bounds)
    parts = []
    bar = tqdm(total=steps * -(-len(targets) // batch_size), desc="activation maximisation", unit="step",
               disable=not progress)
    for i in range(0, len(targets), batch_size):
        chunk = targets[i:i + batch_size]
        x0 = (INIT_STD * torch.randn(len(chunk), c, h, w, generator=gen, dtype=torch.float64)).to(ref.device, ref.dtype)
        if lo is not None:
            x0 = torch.maximum(torch.minimum(x0, hi), lo)
        parts.append(_ascend(masked, chunk, x0, steps, lr, l2, jitter, blur_every, blur_sigma, lo, hi, gen, bar))
    bar.close()
    return ActMax(*(torch.cat([p[j] for p in parts]) for j in range(3)))


def _ascend(masked, targets, x0, steps, lr, l2, jitter, blur_every, blur_sigma, lo, hi, gen, bar):
    """One batch of :func:`activation_maximisation`: ``(images, start, final)`` on the CPU."""
    with torch.no_grad():
        start = _objective(masked, targets, x0)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    blur_until = (3 * steps) // 4  # the last steps climb the objective itself, unblurred
    for step in range(steps):
        dy, dx = (torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist() if jitter else (0, 0))
        with torch.enable_grad():
            shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            gain = _objective(masked, targets, shifted) - l2 * x.pow(2).flatten(1).mean(1)
            opt.zero_grad(set_to_none=True)
            (-gain.sum()).backward()
        opt.step()
        with torch.no_grad():
            if blur_every and (step + 1) % blur_every == 0 and step < blur_until:
                x.copy_(_blur(x, blur_sigma))
            if lo is not None:
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        bar.update(1)
    with torch.no_grad():
        final = _objective(masked, targets, x)
    return x.detach().cpu(), start.cpu(), final.cpu()


def mean_activations(chain, masked, images: torch.Tensor, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
    """``{layer: Tensor[N, K]}``: each kept filter's mean activation on each image, in the chain
    (``K = len(chain.kept[layer])``, same order)."""
    with torch.no_grad():
        outs = unit_outputs(masked, layers, images)
    return {layer: outs[layer][:, chain.kept[layer]].flatten(2).mean(2).cpu() for layer in layers}


def top_activating(means: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Indices ``Tensor[K, min(k, N)]`` of the images with the largest mean activation of each
    filter (``means``: Tensor[N, K] of :func:`mean_activations`), strongest first; ties keep the
    lower image index."""
    _check("k", k, 1, True)
    order = torch.sort(-means.double(), dim=0, stable=True).indices
    return order[: min(k, means.shape[0])].T.contiguous()
