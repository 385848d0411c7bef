"""Every metric's plot: a valid, non-blank PNG, with the title and axis labels set."""

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from nchains.metrics import (jaccard_matrix, lerf, plot_degradation, plot_jaccard, plot_prevalence, plot_roar,
                             plot_sanity)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(pixels[..., :3].std()) > 0.01  # something is drawn


def texts(fig):
    return [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes if ax.get_title()]


def test_prevalence(tmp_path):
    results = {"mct 90%": {"fraction": 0.0, "dead_overall": 0.4}, "greedy 90%": {"fraction": 0.6, "dead_overall": 0.4}}
    fig = plot_prevalence(results, path=tmp_path / "dead.png")
    check_png(tmp_path / "dead.png")
    (title, _, ylabel), = texts(fig)
    assert "Dead-neuron prevalence" in title and "dead" in ylabel
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(results)


def test_jaccard(tmp_path):
    gen = torch.Generator().manual_seed(0)
    paths = {n: {"a": torch.rand(4, 4, generator=gen) < 0.5, "b": torch.rand(6, generator=gen) < 0.5}
             for n in ("intgrad", "mct", "greedy")}
    fig = plot_jaccard(jaccard_matrix(paths, per_layer=True), path=str(tmp_path / "j.png"), labels={"a": "L1"})
    check_png(tmp_path / "j.png")
    titles = [t[0] for t in texts(fig)]
    assert "Jaccard similarity of paths (network)" in titles and "Jaccard similarity per layer" in titles
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["L1", "b"]


def test_degradation(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 1, 4, 4)
    results = {"a": lerf(net, x, torch.randn(2, 1, 4, 4), fractions=[0, 0.5, 1]),
               "b": lerf(net, x, torch.randn(2, 1, 4, 4), fractions=[0, 0.5, 1])}
    fig = plot_degradation(results, "logit", path=tmp_path / "lerf.png")
    check_png(tmp_path / "lerf.png")
    (title, xlabel, ylabel), = texts(fig)
    assert "LeRF, fill zero" in title and xlabel == "fraction of pixels removed" and "logit" in ylabel
    with pytest.raises(ValueError, match="quantity"):
        plot_degradation(results, "auc")


def test_degradation_legend_of_many_methods(tmp_path):
    """14 methods (an evaluate-paths run): 14 distinct colours, legend by AUC, beside the axes."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    results = {f"m{i}": lerf(net, x, torch.randn(2, 1, 4, 4, generator=gen), fractions=[0, 0.25, 0.5, 1])
               for i in range(14)}
    fig = plot_degradation(results, path=tmp_path / "lerf.png")
    check_png(tmp_path / "lerf.png")
    ax = fig.axes[0]
    colours = {tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
               for line in ax.get_lines()}
    assert len(ax.get_lines()) == 14 and len(colours) == 14
    legend = ax.get_legend()
    aucs = [float(t.get_text().rsplit("AUC ", 1)[1].rstrip(")")) for t in legend.get_texts()]
    assert aucs == sorted(aucs) and len(aucs) == 14
    expected = sorted(results, key=lambda n: results[n]["change"]["auc"])
    assert [t.get_text().split(" (")[0] for t in legend.get_texts()] == expected
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # covers no curve


def test_sanity(tmp_path):
    r = {"layers": ["fc", "conv2", "conv1"], "spearman": [0.9, 0.4, None], "spearman_abs": [0.8, 0.5, 0.1],
         "ssim": [0.7, 0.2, 0.0]}
    fig = plot_sanity({"gradient": r, "path": {**r, "spearman": [0.5, 0.2, 0.1]}}, path=tmp_path / "s.png")
    check_png(tmp_path / "s.png")
    titles = [t[0] for t in texts(fig)]
    assert len(titles) == 3 and all(t.startswith("Randomisation sanity check") for t in titles)
    assert all(ax.get_ylabel().endswith("to the original") for ax in fig.axes)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    figure_box = fig.bbox
    for ax in fig.axes:  # the y label fits in the figure (a long one was cut off at the left)
        box = ax.yaxis.label.get_window_extent(renderer)
        assert box.y0 >= figure_box.y0 and box.y1 <= figure_box.y1 and box.x0 >= figure_box.x0


def test_roar(tmp_path):
    r = {"fractions": [0, 0.5, 0.9], "train_size": 300, "epochs": 1,
         "methods": {"gradient": {"accuracy": [0.8, 0.5, 0.3], "auc": 0.5}, "random": {"accuracy": [0.8, 0.7, 0.6],
                                                                                      "auc": 0.65}}}
    fig = plot_roar(r, path=tmp_path / "roar.png")
    check_png(tmp_path / "roar.png")
    (title, xlabel, ylabel), = texts(fig)
    assert title.startswith("ROAR") and "removed" in xlabel and "accuracy" in ylabel
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["gradient (AUC 0.5)", "random (AUC 0.65)"]


def test_a_bad_path_is_refused():
    with pytest.raises(TypeError, match="path must be a str"):
        plot_prevalence({"a": {"fraction": 0.1}}, path=3)
    with pytest.raises(ValueError, match="non-empty"):
        plot_sanity({})
