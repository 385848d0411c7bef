"""The figures' common parts: matplotlib figures drawn by the Agg canvas (no display, no pyplot
state shared with the caller), one figure shape, number formatting, and PNG rendering to bytes
(written atomically by the callers)."""

from __future__ import annotations

import io
from typing import Optional

__all__ = ["fmt", "new_figure", "png_bytes", "svg_text"]


def new_figure(panels: int = 1, width: float = 5.2, height: float = 3.8):
    """``(figure, axes)``: one row of ``panels`` axes (a single Axes when ``panels == 1``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, whatever pyplot's current backend is
    axes = fig.subplots(1, panels)
    return fig, axes


def fmt(value: Optional[float], digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits, "n/a" for None."""
    return "n/a" if value is None else f"{value:.{digits}g}"


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def svg_text(fig) -> str:
    """The figure as an SVG document (text), e.g. to inline in an HTML page."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    return buf.getvalue()
