"""keep_freed_memory: inside, large tensors freed and allocated again reuse memory (no page
faults), where by default each round maps and zeroes fresh pages."""

import resource
import statistics
import subprocess
import sys
import textwrap

import pytest
import torch

from nchains._util.memory import keep_freed_memory


def _faults_per_round(rounds: int = 5, numel: int = 64 * 1024 * 1024) -> float:
    """Median page faults of a round (the host may reclaim idle pages now and then). The
    default size, 256 MiB, is above glibc's largest mmap threshold."""
    counts = []
    for _ in range(rounds):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = torch.ones(numel)
        b = a * 2
        del a, b
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return statistics.median(counts)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_memory_is_reused_inside():
    pages = 2 * 256 * 1024 * 1024 // 4096
    with keep_freed_memory(enabled=False):  # control: glibc maps and zeroes fresh pages each round
        assert _faults_per_round() > pages / 2
    for _ in range(2):  # the block can be entered again after it restored glibc's limits
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_mid_sized_blocks_are_reused_after_the_block():
    """After keep_freed_memory, 4 MiB tensors allocated again and again come from the heap.
    mallopt switches glibc's adaptive mmap threshold off for good; restoring the 128 KiB static
    default instead would map and zero every such block afresh (2048 faults a round here) for the
    rest of the process. glibc's state is per process: this runs in a fresh interpreter. The
    fewest faults of several rounds is taken (the host reclaims idle pages now and then)."""
    code = textwrap.dedent("""
        from nchains._util.memory import keep_freed_memory
        from tests._util.test_memory import _faults_per_round
        with keep_freed_memory() as active:
            assert active
        _faults_per_round(2, numel=1024 * 1024)
        print(min(_faults_per_round(1, numel=1024 * 1024) for _ in range(7)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    pages = 2 * 4 * 1024 * 1024 // 4096
    assert float(out.stdout.split()[-1]) < pages / 10, out.stdout
