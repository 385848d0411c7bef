"""run_analyses / plot_analyses: every analysis in one JSON-serialisable dict, one valid, non-blank
PNG per analysis with the expected title; the fidelity sweep on a short schedule."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import nchains
from nchains.neurochains.analyses import ANALYSES, DEFAULT_ANALYSES, figures, plot_analyses, run_analyses
from nchains.neurochains.analyses.plots import svg_text
from nchains.neurochains.analyses.run import parse_which

from _analyses_chain import analyses_chain, held_out_digits

pytestmark = pytest.mark.usefixtures("one_thread")

TITLES = {"fidelity": "Fidelity vs size: probability drop", "faithfulness": "Faithfulness: damage of removing",
          "quotient": "Quotient metric Q(p, q)", "stability": "Stability: test fidelity",
          "robustness": "Robustness of the original model", "magnitude": "Magnitude baseline vs NeuroChains"}


@pytest.fixture(scope="module")
def results():
    net, images, labels, chain = analyses_chain()
    return run_analyses(chain, net, images, which="all", labels=labels, pool=held_out_digits(100), ks=[5, 10],
                        sweep=[0.01, 0.05], sweep_steps=3, sweep_finetune_steps=0, pgd_steps=2)


def test_all_analyses_in_one_json_dict(results):
    assert results["which"] == list(ANALYSES) and results["skipped"] == {}
    assert set(ANALYSES) <= set(results)
    text = json.dumps(results, allow_nan=False)
    assert json.loads(text) == results
    _, _, _, chain = analyses_chain()
    assert results["chain"]["filters_kept"] == chain.metrics["filters_kept"] == 180
    assert results["chain"]["images"] == 12


def test_fidelity_sweep_points_are_the_extractions(results):
    net, images, _, chain = analyses_chain()
    fid = results["fidelity"]
    assert [p["lam"] for p in fid["points"]] == [0.01, 0.05] and fid["steps"] == 3
    other = nchains.extract(net, images, steps=3, finetune_steps=0, lam=0.05, lam_gate=chain.config["lam_gate"],
                            seed=chain.seed, progress=False)
    point = fid["points"][1]
    assert point["filters_kept"] == other.metrics["filters_kept"]
    assert point["kl"] == pytest.approx(other.metrics["kl"], abs=1e-5)
    assert point["agreement"] == pytest.approx(other.metrics["agreement"])
    assert fid["operating_point"]["kl"] == pytest.approx(results["chain"]["kl"])


def test_plots_are_non_blank_pngs_with_titles(results, tmp_path):
    paths = plot_analyses(results, tmp_path / "plots")
    assert sorted(paths) == sorted(ANALYSES)
    for name, path in paths.items():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
            pixels = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32)).flatten()
        assert pixels.std() > 10  # not a blank page
        assert (pixels < 128).float().mean() > 0.005  # axes, text and marks
    for name, fig in figures(results).items():
        assert fig.axes[0].get_title().startswith(TITLES[name]), (name, fig.axes[0].get_title())
    svg = svg_text(figures(results)["quotient"])  # for pages that inline their figures
    assert svg.startswith("<?xml") and "<svg" in svg and svg.rstrip().endswith("</svg>")


def test_stability_without_pool_is_skipped_under_all_but_refused_by_name():
    net, images, _, chain = analyses_chain()
    res = run_analyses(chain, net, images, which="all", pgd_steps=1, finetune_baseline=False)
    assert "stability" not in res and "held-out pool" in res["skipped"]["stability"]
    res = run_analyses(chain, net, images, which=DEFAULT_ANALYSES, pgd_steps=1, finetune_baseline=False)
    assert "held-out pool" in res["skipped"]["stability"] and "quotient" in res
    with pytest.raises(ValueError, match="held-out pool"):
        run_analyses(chain, net, images, which="stability")


def test_which():
    assert parse_which("all") == ANALYSES[1:]
    assert parse_which("quotient, faithfulness") == ("faithfulness", "quotient")
    assert parse_which(["fidelity"]) == ("fidelity",)
    for bad, match in (("quotient,typo", "which must be 'all' or names"), ("", "which must be 'all' or names"),
                       ("quotient,quotient", "must not repeat")):
        with pytest.raises(ValueError, match=match):
            parse_which(bad)
    with pytest.raises(ValueError, match="format 'nchains.analyses'"):
        figures({"quotient": {}})


def test_device_and_dtype_follow_the_model():
    from nchains._util.io import hash_model

    net, images, labels, chain = analyses_chain()
    net64 = copy.deepcopy(net).double()
    chain64 = dataclasses.replace(chain, model_hash=hash_model(net64))  # the same chain of the float64 copy
    res = run_analyses(chain64, net64, images, which="quotient,faithfulness")  # float32 images, float64 model
    ref = run_analyses(chain, net, images, which="quotient,faithfulness")
    # rel 1e-3: one image's Q has a tiny denominator (the original's top two classes nearly tie)
    assert res["quotient"]["q"] == pytest.approx(ref["quotient"]["q"], rel=1e-3, abs=1e-6)
    assert [r["damage"] for r in res["faithfulness"]["filters"]] == pytest.approx(
        [r["damage"] for r in ref["faithfulness"]["filters"]], abs=1e-5)
