"""Keeping freed memory in the process while an optimisation loop runs (glibc).

Every scoring iteration allocates and frees the same large tensors (activations, their
gradients, convolution workspaces). glibc serves blocks above its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and unmaps them at ``free``, so each iteration page-faults them
in again and the kernel zeroes every page: on torchvision ResNet-50 at 224x224 with 20 images
that is ~78,000 faults (~300 MiB zeroed) per iteration (``tools/bench_extract.py``, column
``flt/it``). Inside :func:`keep_freed_memory` glibc serves every block from its heap and keeps
freed memory for reuse; on exit the heap is trimmed, so the memory returns to the system, and
glibc's limits are set to where its own adaptive rule takes them in a process that frees large
blocks. (Any ``mallopt`` of these limits switches that rule off for good; leaving glibc's
static defaults instead would send every block above 128 KiB to a fresh ``mmap`` for the rest of
the process: inference after an extraction in the same process ran 1.5-2.5x slower.)
Elsewhere (another libc or OS) it does nothing.

Set ``NCHAINS_KEEP_MEMORY=0`` to turn it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from typing import Iterator, Optional

# mallopt parameters (malloc.h) and the values restored on exit: glibc's default mmap count and
# the ceiling of its adaptive thresholds (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; the trim
# threshold follows at twice the mmap threshold).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_ADAPTED_MMAP_THRESHOLD = 32 * 1024 * 1024
_ADAPTED_TRIM_THRESHOLD = 2 * _ADAPTED_MMAP_THRESHOLD
_KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc has both
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, glibc keeps freed memory for reuse instead of unmapping it.

    Yields True when the setting is active (glibc, enabled, ``NCHAINS_KEEP_MEMORY`` not 0).
    Not reentrant-safe across threads: meant for the one optimisation loop that runs.
    """
    libc = _glibc() if enabled and os.environ.get("NCHAINS_KEEP_MEMORY", "1") != "0" else None
    if libc is None or not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD)):
        yield False
        return
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, _ADAPTED_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _ADAPTED_TRIM_THRESHOLD)
        libc.malloc_trim(0)
