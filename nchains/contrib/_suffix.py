"""What intgrad and ablation share: one segment per site, every segment's prefix from one
forward, and the rows (image, perturbation) of a site's suffix runs in bounded chunks."""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from nchains.graph.analysis import ModelGraph
from nchains.instrument.segment import Segment, segments, values_at
from nchains.instrument.taps import Site

__all__ = ["ROW_BUDGET", "chunks", "prefixes", "rows_per_chunk"]

#: Elements a chunk of suffix rows may compute (2**26: 256 MB of float32 activations) when
#: ``batch_size`` is None; the backward of intgrad roughly doubles it.
ROW_BUDGET = 2 ** 26


def prefixes(graph: ModelGraph, chosen: Sequence[Site], images: torch.Tensor
             ) -> List[Tuple[Segment, torch.Tensor, List[object]]]:
    """Per site: (its segment, its activation Tensor[N, *site shape], its frontier values).

    The prefix below every site runs once, in one forward of the model (no gradient)."""
    segs = segments(graph, [[s] for s in chosen])
    nodes: Dict[object, None] = {}
    for seg in segs:
        nodes.update(dict.fromkeys([seg.inputs[0].node, *seg.frontier_nodes]))
    order = list(nodes)
    with torch.no_grad():
        values = dict(zip(order, values_at(graph, order)(images)))
    return [(seg, values[seg.inputs[0].node], [values[n] for n in seg.frontier_nodes]) for seg in segs]


def rows_per_chunk(seg: Segment, total: int, batch_size: Optional[int]) -> int:
    """Rows per suffix run: ``batch_size``, or as many as :data:`ROW_BUDGET` allows (>= 1)."""
    if batch_size is not None:
        return min(total, batch_size)
    return max(1, min(total, ROW_BUDGET // seg.row_elements()))


def chunks(total: int, size: int, device) -> Iterator[torch.Tensor]:
    """LongTensor row indices ``[start, stop)`` of each chunk of ``size`` rows out of ``total``."""
    for start in range(0, total, size):
        yield torch.arange(start, min(total, start + size), device=device)
