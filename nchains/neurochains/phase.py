"""The optimisation loop of one extraction phase (scoring or fine-tuning): Adam steps whose
loss and KL stay on the model's device and are read back in batches.

Reading a loss (``float(loss)``) waits for the device to finish every queued kernel; one read
per step keeps a GPU idle between steps. So the loop stores each step's loss and KL in device
buffers and reads a window of them once every :func:`sync_interval` steps (every step on the
CPU, where a read costs nothing). The two decisions that need the values are taken on the
device meanwhile, step by step:

- early stop (the loss changed by less than ``stop_delta`` over ``stop_window`` steps): the
  condition is computed on the device after every step; the steps that run after it held but
  before the next read are undone (the parameters are restored to their value before the
  step), so the run stops at exactly the step, with exactly the parameters, of a loop that
  reads every step;
- a non-finite loss stops the run with a ValueError naming the step, at the next read.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["adam", "run_phase", "step", "sync_interval"]

#: Steps between host reads of the loss on an accelerator (CPU: every step).
ACCELERATOR_SYNC_STEPS = 10

LossFn = Callable[[], Tuple[torch.Tensor, torch.Tensor]]


def sync_interval(device: torch.device) -> int:
    """Steps between two reads of the loss buffers on ``device``: 1 on the CPU (no host sync to
    save), :data:`ACCELERATOR_SYNC_STEPS` elsewhere."""
    return 1 if torch.device(device).type == "cpu" else ACCELERATOR_SYNC_STEPS


def adam(params: List[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam for the flat score/gate tensors: the fused kernel where the device has one."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def step(opt: torch.optim.Optimizer, loss_fn: LossFn, grad_mask: Optional[torch.Tensor] = None
         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One iteration: zero grads, loss, backward, (mask the gradient of the first parameter),
    Adam step; returns ``(loss, kl)`` as detached 0-d tensors on the device (no host sync)."""
    opt.zero_grad(set_to_none=True)
    loss, kl = loss_fn()
    loss.backward()
    if grad_mask is not None:
        param = opt.param_groups[0]["params"][0]
        if param.grad is not None:
            param.grad.mul_(grad_mask)
    opt.step()
    return loss.detach(), kl.detach()


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


class _Log:
    """Per-step loss, KL and stop condition in device buffers (float64: a float32 loss converts
    exactly, so the stop rule compares the same numbers a host-side loop compares)."""

    def __init__(self, steps: int, device: torch.device, stop_delta: Optional[float], stop_window: int):
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.loss = torch.zeros(steps, dtype=dtype, device=device)
        self.kl = torch.zeros(steps, dtype=dtype, device=device)
        self.stop = torch.zeros(steps, dtype=dtype, device=device)  # 1 where the rule holds
        self.stopped = torch.zeros((), dtype=torch.bool, device=device)  # the rule held at an earlier step
        self.delta, self.window = stop_delta, stop_window
        self.read_to = 0

    def record(self, i: int, loss: torch.Tensor, kl: torch.Tensor) -> None:
        self.loss[i] = loss
        self.kl[i] = kl
        if self.delta is not None and i >= self.window:
            holds = (self.loss[i - self.window] - self.loss[i]).abs() < self.delta
            self.stop[i] = holds.to(self.stop.dtype)
            self.stopped |= holds

    def read(self, end: int) -> List[Tuple[float, float, bool]]:
        """``(loss, kl, stop)`` of the steps since the last read, up to ``end`` (one host sync)."""
        start, self.read_to = self.read_to, end
        rows = torch.stack([self.loss[start:end], self.kl[start:end], self.stop[start:end]], 1).tolist()
        return [(loss, kl, stop != 0.0) for loss, kl, stop in rows]


def run_phase(opt: torch.optim.Optimizer, loss_fn: LossFn, steps: int, stop_delta: Optional[float], stop_window: int,
              desc: str, progress: bool, grad_mask: Optional[torch.Tensor] = None,
              every: Optional[int] = None) -> List[float]:
    """Up to ``steps`` iterations of ``opt`` on ``loss_fn``, stopping once the loss changed by
    less than ``stop_delta`` over ``stop_window`` steps (the step where that first holds is the
    last one kept); returns the loss history.

    Args:
        opt: the optimizer (its parameters are restored when steps after the stop ran).
        loss_fn: returns ``(loss, kl)`` 0-d tensors; ``loss`` is differentiated.
        steps (int): maximum number of steps.
        stop_delta (float or None): early-stop threshold; None never stops early.
        stop_window (int): steps between the two losses compared.
        desc (str): name of the phase (progress bar, error messages).
        progress (bool): show a progress bar, updated at each read.
        grad_mask (Tensor): multiplies the first parameter's gradient before each step.
        every (int): steps between reads (default :func:`sync_interval` of the parameters' device).

    Raises:
        ValueError: when the loss becomes NaN or infinite (naming the step).
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    device = params[0].device
    every = every or sync_interval(device)
    log = _Log(steps, device, stop_delta, stop_window)
    history: List[float] = []
    bar = _progress(steps, desc, progress)
    try:
        for i in range(steps):
            undo = every > 1 and stop_delta is not None and i > stop_window
            before = [p.detach().clone() for p in params] if undo else None
            loss, kl = step(opt, loss_fn, grad_mask)
            if undo:  # a step after the stop (not yet read back) leaves the parameters as they were
                with torch.no_grad():
                    for p, b in zip(params, before):
                        p.copy_(torch.where(log.stopped, b, p))
            log.record(i, loss, kl)
            if (i + 1) % every and i + 1 < steps:
                continue
            for value, kl_value, stop in log.read(i + 1):
                history.append(value)
                if not math.isfinite(value):
                    raise ValueError(f"the {desc} loss became {value} (KL {kl_value}) at step {len(history)}: "
                                     "lower lr, lam or lam_gate, or check the model's outputs on these images")
                if bar is not None:
                    bar.update(1)
                if stop:
                    break
            if bar is not None:
                bar.set_postfix(loss=f"{history[-1]:.4f}", kl=f"{kl_value:.4f}")
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
    return history
