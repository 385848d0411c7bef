"""The report page: one self-contained HTML document (inline CSS, inline SVG, ``data:`` PNGs;
no script, no external stylesheet, font or URL), laid out for a laptop screen and for print.

Each ``*_section`` function returns the HTML of one ``<section>``; :func:`page` wraps them.
Everything interpolated is escaped here.
"""

from __future__ import annotations

from html import escape
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["figure", "page", "section", "table"]

CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1280px; padding: 16px 24px 48px; color: #1b1b1b; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin: 0.2em 0; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 4px;
     margin-top: 1.6em; } h3 { font-size: 1.02em; margin: 1em 0 0.4em; }
p.lead { color: #444; margin-top: 0; } .note { color: #555; font-size: 0.9em; }
nav a { margin-right: 1em; color: #2457a6; text-decoration: none; }
svg.chain-graph { max-width: 100%; height: auto; }
.scroll { overflow-x: auto; border: 1px solid #e3e3e3; padding: 6px; background: #fcfcfc; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; text-align: center; font-size: 0.78em; }
figure img { image-rendering: pixelated; border: 1px solid #ccc; display: block; margin: 0 auto 2px; }
figcaption { max-width: 170px; }
.bad { color: #b00020; font-weight: bold; }
table { border-collapse: collapse; font-size: 0.88em; margin: 6px 0; }
th, td { border: 1px solid #d6d6d6; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 0.85em; white-space: pre-wrap; }
.plots img { max-width: 100%; height: auto; border: 1px solid #ddd; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  nav { display: none; }
  .scroll { overflow: visible; border: none; }
  svg.chain-graph { max-width: 100%; height: auto; }
  section { break-before: auto; } h2 { break-after: avoid; }
  figure, table, .plots img { break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
}
"""


def figure(src: str, caption: str, title: str = "", width: Optional[int] = None, caption_html: bool = False) -> str:
    """``<figure>`` with one ``data:`` image; ``caption`` is text unless ``caption_html``."""
    size = f' width="{int(width)}"' if width else ""
    cap = caption if caption_html else escape(caption)
    return (f'<figure><img src="{escape(src)}" alt="{escape(title or caption)}" title="{escape(title or caption)}"{size}>'
            f"<figcaption>{cap}</figcaption></figure>")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] = ()) -> str:
    """An HTML table; cells are escaped, numeric columns right-aligned."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = ' class="num"' if i < len(numeric) and numeric[i] else ""
            cells.append(f"<td{cls}>{escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section(anchor: str, heading: str, body: str, intro: str = "") -> str:
    """``<section id=anchor>`` with an ``<h2>``, an optional intro paragraph and ``body`` (HTML)."""
    p = f'<p class="note">{escape(intro)}</p>' if intro else ""
    return f'<section id="{escape(anchor)}"><h2>{escape(heading)}</h2>{p}{body}</section>'


def page(title: str, lead: str, sections: List[Tuple[str, str, str]], footer: str = "") -> str:
    """The whole document. ``sections`` are ``(anchor, heading, html)``, linked from a nav bar."""
    nav = " ".join(f'<a href="#{escape(a)}">{escape(h)}</a>' for a, h, _ in sections)
    body = "\n".join(html for _, _, html in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{escape(title)}</h1><p class=\"lead\">{escape(lead)}</p><nav>{nav}</nav></header>\n"
            f"{body}\n<footer><p class=\"note\">{escape(footer)}</p></footer></body></html>\n")


def metrics_rows(metrics: Dict[str, Any]) -> List[Tuple[str, str]]:
    """``(name, value)`` of the chain's metrics, numbers formatted (lists summarised)."""
    rows = []
    for k, v in metrics.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, tuple)):
            v = f"{len(v)} values"
        elif isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        rows.append((k, str(v)))
    return rows
