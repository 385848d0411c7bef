"""The benchmark tools run end to end (tiny sizes) and their two sides compute the same thing."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nchains import NeuroChainsConfig, ScoredModel, analyze
from nchains.models import zoo
from nchains.neurochains.extraction import scoring_loss

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def test_hook_baseline_and_scored_model_share_the_objective():
    """tools/neurochains_baseline.py (forward hooks on the original model) and the scored
    model give the same scoring loss, at the start and at random scores and gates."""
    sys.path.insert(0, str(TOOLS))
    try:
        from neurochains_baseline import BaselineConfig, HookedNeuroChains
    finally:
        sys.path.remove(str(TOOLS))
    model = zoo.default_model()
    images, _, _ = zoo.default_images(["sneaker", "bag"], per_class=3)
    cfg = NeuroChainsConfig().resolved("resnet")
    with torch.no_grad():
        target_logp = F.log_softmax(model(images), dim=1)
    graph = analyze(model, images[:1])
    sm = ScoredModel(graph)
    hk = HookedNeuroChains(model, images, BaselineConfig(**{k: getattr(cfg, k) for k in
                                                            BaselineConfig.__dataclass_fields__}))
    try:
        gen = torch.Generator().manual_seed(0)
        for trial in range(2):
            if trial:
                with torch.no_grad():
                    for name, s in sm.named_scores():
                        s.copy_(torch.rand(s.shape, generator=gen) * 1.5)
                        hk.scores[name].copy_(s)
                    for name, a in sm.named_gate_logits():
                        a.fill_(float(torch.randn((), generator=gen)) * 0.3)
                        hk.alphas[name].fill_(float(a))
            with torch.no_grad():
                ours = float(scoring_loss(sm, images, target_logp, cfg.lam, cfg.lam_gate)[0])
                theirs = float(hk.loss())
            assert abs(ours - theirs) <= 1e-5 * abs(theirs), (trial, ours, theirs)
    finally:
        hk.restore()


@pytest.mark.slow
def test_bench_extract_quick_runs_and_reports_both_sides():
    out = subprocess.run([sys.executable, str(TOOLS / "bench_extract.py"), "--quick", "--only", "shipped"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "baseline" in text and "nchains" in text and "targets:" in text
    assert "same loss step by step (alternating): yes" in text


@pytest.mark.slow
def test_bench_export_table():
    """tools/bench_export.py end to end on the shipped model: six rows (3 runtimes x 2
    batches), the target measured against the chain's own MAC ratio (the same in every row,
    whatever the artifacts pad), the exported artifacts' padded MACs shown beside it."""
    out = subprocess.run([sys.executable, str(TOOLS / "bench_export.py"), "--models", "fashion", "--reps", "2"],
                         capture_output=True, text=True, check=True, timeout=900).stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["fashion"]]
    assert [(r[1], r[2]) for r in rows] == [(rt, b) for b in ("1", "20")
                                          for rt in ("eager", "torchscript", "onnxruntime")]
    mmacs = lambda s: float(s.rstrip("M"))  # noqa: E731
    for r in rows:
        orig, chain_macs, art_macs, ratio = mmacs(r[5]), mmacs(r[6]), mmacs(r[7]), float(r[8])
        assert ratio == pytest.approx(orig / chain_macs, rel=0.05)
        assert float(r[12]) == pytest.approx(0.6 * ratio, abs=0.01)
        assert (art_macs > chain_macs) == (r[1] != "eager")  # exported artifacts are padded
        assert r[13] == ("yes" if float(r[11]) >= float(r[12]) else "no")
