"""The report's sections, each from computed data to HTML (:mod:`.html` assembles the page)."""

from __future__ import annotations

import base64
from html import escape
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from nchains.report.html import figure, metrics_rows, section, table
from nchains.report.pictures import display_image, overlay, png_uri, strip

__all__ = ["analyses_section", "filters_section", "graph_section", "images_section", "paths_section",
           "pick_per_class", "smoe_section"]


def _name(chain, c: int) -> str:
    return chain.class_name(int(c))


def graph_section(svg: str, chain, edges_per_filter: Optional[int]) -> str:
    m = chain.metrics
    intro = (f"{m.get('filters_kept')}/{m.get('filters_total')} filters and {m.get('layers_kept')}/"
             f"{m.get('layers_total')} layers kept. Columns are layers in graph order, circles the kept filters "
             "coloured by score (colour bar), grey boxes the layers the chain skips. Edges: the "
             + (f"{edges_per_filter} strongest incoming" if edges_per_filter else "all")
             + " connections of each filter, width by Σ|W| over the kernel. Hover for labels, scores and weights.")
    return section("graph", "Chain graph", f'<div class="scroll">{svg}</div>', intro)


def images_section(chain, images: torch.Tensor, p_logits: torch.Tensor, q_logits: torch.Tensor) -> str:
    p, q = p_logits.softmax(1), q_logits.softmax(1)
    figs, disagree = [], 0
    for i in range(len(images)):
        a, b = int(p[i].argmax()), int(q[i].argmax())
        disagree += a != b
        cls = ' class="bad"' if a != b else ""
        cap = (f"#{i}<br>original: {escape(_name(chain, a))} {float(p[i, a]):.2f}<br>"
               f"<span{cls}>chain: {escape(_name(chain, b))} {float(q[i, b]):.2f}</span>")
        figs.append(figure(png_uri(display_image(images[i])), cap, title=f"image {i}: original {_name(chain, a)}, "
                           f"chain {_name(chain, b)}", caption_html=True))
    intro = (f"The {len(images)} images the chain was extracted on, with the original model's and the chain's "
             f"predicted class and probability; the chain disagrees on {disagree}.")
    return section("images", "The chain's images", f'<div class="grid">{"".join(figs)}</div>', intro)


def smoe_section(chain, images: torch.Tensor, picks: Sequence[Tuple[int, int]], maps: Dict[str, torch.Tensor],
                 layers: Sequence[str]) -> str:
    """``picks``: ``(image index, class)`` of :func:`pick_per_class`; ``maps[layer][row]`` is the
    map of ``picks[row]``."""
    rows = []
    for row, (i, c) in enumerate(picks):
        base = display_image(images[i])
        cells = [figure(png_uri(base), "input", title=f"image {i}")]
        for layer in [*layers, "combined"]:
            heat = maps[layer][row].numpy()
            label = "Combine All" if layer == "combined" else chain.label(layer)
            cells.append(figure(png_uri(overlay(base, heat)), label, title=f"SMOE scale map, {label}, image {i}"))
        rows.append(f"<h3>{escape(_name(chain, c))} (image #{i})</h3>"
                    f'<div class="grid">{"".join(cells)}</div>')
    intro = ("SMOE scale (Mundhenk et al. 2019) of each layer the chain computes, over its kept filters: per pixel "
             "mean · log2(mean / geometric mean) of the activations, gamma-CDF normalised, upsampled and overlaid "
             "(red high); Combine All is their mean. One image per class, in the chain.")
    return section("smoe", "SMOE feature maps", "".join(rows), intro)


def filters_section(chain, layers, results: Dict[str, Any], images: torch.Tensor, params: Dict[str, Any]) -> str:
    """``results[layer]``: ``(ActMax, means Tensor[N, K], top Tensor[K, k])``."""
    thumbs = [display_image(images[i]) for i in range(len(images))]
    parts = []
    for layer in layers:
        act, means, top = results[layer]
        figs = []
        for j, f in enumerate(chain.kept[layer]):
            pic = display_image(act.images[j])
            tops = [thumbs[int(t)] for t in top[j]]
            label = chain.filter_label(layer, f)
            best = ", ".join(f"#{int(t)} ({float(means[int(t), j]):.3g})" for t in top[j])
            score = chain.scores[layer][j]
            figs.append(figure(png_uri(strip([pic, *tops]), max_size=80), f"{label} · {score:.3f}",
                               title=f"{label}: score {score:.3f}; activation maximisation {float(act.start[j]):.3g} → "
                                     f"{float(act.final[j]):.3g}; top images {best}"))
        parts.append(f"<h3>{escape(chain.label(layer))} <span class=\"note\">({escape(layer)}, "
                     f"{len(figs)} filters)</span></h3><div class=\"grid\">{''.join(figs)}</div>")
    intro = (f"Each kept filter: left, the input that maximises its mean activation in the chain (Erhan et al. 2009; "
             f"Adam, {params['steps']} steps, lr {params['lr']}, L2 {params['l2']}, jitter {params['jitter']} px, "
             f"3x3 Gaussian blur σ {params['blur_sigma']} every {params['blur_every']} steps, clipped to the images' "
             f"range; all filters of a layer in one batch); right, its {params['top_k']} top-activating images among "
             "the chain's images. Label · score; hover for activations.")
    return section("filters", "Kept filters", "".join(parts), intro)


def paths_section(chain) -> str:
    rows = []
    for c, strongest in chain.strongest_filters.items():
        for layer, idx, contrib in strongest:
            rows.append((_name(chain, int(c)), chain.filter_label(layer, idx), f"{contrib:.4g}"))
    body = f"<pre>{escape(chain.describe())}</pre>"
    if rows:
        body += table(("class", "strongest filter", "Taylor contribution"), rows, (False, False, True))
    intro = ("Per class, the kept filter with the largest Taylor contribution in each kept layer (each layer "
             "ranked on its own: consecutive filters need not be connected).")
    return section("chains", "Inference chain per class", body, intro)


def analyses_section(chain, results: Optional[Dict[str, Any]], pngs: Dict[str, bytes], note: str) -> str:
    parts = [table(("metric", "value"), metrics_rows(chain.metrics), (False, True))]
    if results is not None:
        from nchains.neurochains.analyses.summary import summary_lines

        parts.append("<h3>Analyses</h3><pre>" + escape("\n".join(summary_lines(results))) + "</pre>")
    for name, data in pngs.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(f'<div class="plots"><h3>{escape(name)}</h3><img src="{uri}" alt="{escape(name)} plot" '
                     f'title="{escape(name)}"></div>')
    return section("analyses", "Metrics and analyses", "".join(parts), note)


def pick_per_class(chain, p_logits: torch.Tensor) -> List[Tuple[int, int]]:
    """``(image index, class)``: for each class of the chain's region the first image the original
    model predicts as it (classes it predicts on none of the images are left out)."""
    pred = p_logits.argmax(1)
    picks = []
    for c in chain.classes or [int(pred[0])]:
        hit = torch.nonzero(pred == int(c)).flatten()
        if len(hit):
            picks.append((int(hit[0]), int(c)))
    return picks
