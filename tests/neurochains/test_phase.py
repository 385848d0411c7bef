"""The extraction loop reads the loss back in batches yet stops at exactly the step, with exactly
the parameters, of a loop that reads every step (the implementation before batching, kept here
as the reference); a non-finite loss stops the run with a ValueError naming the step."""

import dataclasses
import math
from typing import List, Optional

import pytest
import torch

import nchains
from nchains.neurochains import extraction, phase
from _models import random_digits_net


def reference_run_phase(opt, loss_fn, steps: int, stop_delta: Optional[float], stop_window: int, desc: str,
                        progress: bool, grad_mask=None) -> List[float]:
    """The loop as it was before batching: two host reads per step, the stop rule on floats."""
    history: List[float] = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, kl = loss_fn()
        loss.backward()
        if grad_mask is not None:
            param = opt.param_groups[0]["params"][0]
            if param.grad is not None:
                param.grad.mul_(grad_mask)
        opt.step()
        value = float(loss.detach())
        float(kl)
        history.append(value)
        if stop_delta is not None and len(history) > stop_window \
                and abs(history[-1 - stop_window] - value) < stop_delta:
            break
    return history


def _comparable(chain: nchains.Chain) -> dict:
    d = dataclasses.asdict(chain)
    d["metrics"] = {k: v for k, v in d["metrics"].items() if k != "seconds"}
    return d


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    model = random_digits_net()
    return model, torch.randn(8, 1, 8, 8)


# small lambdas: the loss falls slowly enough that stop_delta picks a step in mid-run (23, a
# prime) for scoring; fine-tuning stops at its first chance
KW = dict(steps=60, stop_window=5, stop_delta=0.00295, finetune_kl=0.0, finetune_steps=40, seed=2,
          lam=0.0005, lam_gate=0.0005)


@pytest.fixture(scope="module")
def reference_chain(digits):
    model, images = digits
    mp = pytest.MonkeyPatch()
    mp.setattr(extraction, "_run_phase", reference_run_phase)
    try:
        return nchains.extract(model, images, progress=False, **KW)
    finally:
        mp.undo()


def test_reference_run_stops_early_in_both_phases(reference_chain):
    m = reference_chain.metrics
    assert 0 < m["steps_run"] < KW["steps"]
    assert 0 < m["finetune_steps_run"] < KW["finetune_steps"]


@pytest.mark.parametrize("every", [1, 3, 7])
def test_batched_reads_give_the_same_chain(digits, reference_chain, every, monkeypatch):
    model, images = digits
    reads = []
    log_read = phase._Log.read

    def counting_read(self, end):
        reads.append(end - self.read_to)
        return log_read(self, end)

    monkeypatch.setattr(phase, "sync_interval", lambda device: every)
    monkeypatch.setattr(phase._Log, "read", counting_read)
    chain = nchains.extract(model, images, progress=False, **KW)
    assert _comparable(chain) == _comparable(reference_chain)
    steps = chain.metrics["steps_run"] + chain.metrics["finetune_steps_run"]
    # one read per `every` steps (each phase's last read may hold fewer, or steps past the stop)
    assert len(reads) <= math.ceil(chain.metrics["steps_run"] / every) + math.ceil(
        chain.metrics["finetune_steps_run"] / every)
    assert sum(reads) >= steps and all(r <= every for r in reads)


def _quadratic(target: torch.Tensor, poison_at: Optional[int] = None):
    x = torch.zeros_like(target, requires_grad=True)
    calls = [0]

    def loss_fn():
        calls[0] += 1
        loss = ((x - target) ** 2).sum()
        if poison_at is not None and calls[0] >= poison_at:
            loss = loss * float("nan")
        return loss, loss.detach()

    return x, phase.adam([x], 0.1), loss_fn


@pytest.mark.parametrize("every", [1, 4])
def test_non_finite_loss_stops_the_run_naming_the_step(every):
    x, opt, loss_fn = _quadratic(torch.arange(5.0), poison_at=6)
    with pytest.raises(ValueError, match=r"the scoring loss became nan .* at step 6"):
        phase.run_phase(opt, loss_fn, 30, None, 3, "scoring", False, every=every)


@pytest.mark.parametrize("every", [2, 5, 8])
def test_parameters_after_an_early_stop_are_those_of_the_stop_step(every):
    target = torch.linspace(-1, 1, 7)
    x_ref, opt, loss_fn = _quadratic(target)
    ref = reference_run_phase(opt, loss_fn, 200, 0.05, 3, "scoring", False)
    x, opt, loss_fn = _quadratic(target)
    got = phase.run_phase(opt, loss_fn, 200, 0.05, 3, "scoring", False, every=every)
    assert len(ref) < 200 and len(ref) % every  # stopped early, between two reads
    assert got == ref
    assert torch.equal(x, x_ref)
