"""keep_freed_memory: inside, large tensors freed and allocated again reuse memory (no page
faults), where by default each round maps and zeroes fresh pages."""

import resource
import statistics
import sys

import pytest
import torch

from nchains._memory import keep_freed_memory


def _faults_per_round(rounds: int = 5) -> float:
    """Median page faults of a round (the host may reclaim idle pages now and then)."""
    counts = []
    for _ in range(rounds):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.ones(64 * 1024 * 1024)  # 256 MiB: above glibc's largest mmap threshold
        b = a * 2
        del a, b
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return statistics.median(counts)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_memory_is_reused_inside():
    pages = 2 * 256 * 1024 * 1024 // 4096
    with keep_freed_memory(enabled=False):  # control: glibc maps and zeroes fresh pages each round
        assert _faults_per_round() > pages / 2
    for _ in range(2):  # the block can be entered again after it restored glibc's defaults
        with keep_freed_memory() as active:
            assert active
            _faults_per_round(3)  # the heap grows to its working size
            assert _faults_per_round() < pages / 20


def test_disabled_by_argument_or_environment(monkeypatch):
    with keep_freed_memory(enabled=False) as active:
        assert not active
    monkeypatch.setenv("NCHAINS_KEEP_MEMORY", "0")
    with keep_freed_memory() as active:
        assert not active
