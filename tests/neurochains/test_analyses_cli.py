"""`nchains analyze` as a user runs it: --json prints the numbers run_analyses computes on the
chain's own images (rebuilt from the chain file, with their labels); --out writes results.json
and a PNG per analysis, and replaces an earlier output as a whole."""

from __future__ import annotations

import json

import pytest

from nchains import cli
from nchains.neurochains.analyses import run_analyses

from _analyses_cli_chain import cli_chain, write_chain

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv, capsys):
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_json_is_run_analyses_on_the_chains_images(tmp_path, capsys):
    path = write_chain(tmp_path)
    out, err = _run(["analyze", path, "--which", "quotient,faithfulness,robustness", "--pgd-steps", "2", "--json",
                     "--quiet"], capsys)
    assert err == ""
    got = json.loads(out)
    assert got["which"] == ["faithfulness", "quotient", "robustness"]
    model, images, chain = cli_chain()
    ref = run_analyses(chain, model, images, which="quotient,faithfulness")
    assert got["quotient"]["q"] == pytest.approx(ref["quotient"]["q"], rel=1e-6)
    assert got["faithfulness"]["spearman"] == pytest.approx(ref["faithfulness"]["spearman"], abs=1e-9)
    assert got["robustness"]["labels"] == "given"  # the shipped sample's ground truth
    lo, hi = got["robustness"]["bounds"]  # pixels 0 and 1 after the Fashion-MNIST normalisation
    assert lo[0][0][0] == pytest.approx(-0.2860 / 0.3530) and hi[0][0][0] == pytest.approx(0.7140 / 0.3530)


def test_out_writes_results_and_pngs_all_or_nothing(tmp_path, capsys):
    path = write_chain(tmp_path)
    out_dir = tmp_path / "analysis"
    out, _ = _run(["analyze", path, "--which", "quotient,stability", "--ks", "5,10", "--out", out_dir], capsys)
    assert sorted(p.name for p in out_dir.iterdir()) == ["quotient.png", "results.json", "stability.png"]
    results = json.loads((out_dir / "results.json").read_text())
    assert results["stability"]["pool_size"] == 996 and results["stability"]["excluded"] == 4
    assert out.splitlines()[0].startswith("chain: ")
    assert any(line.startswith("stability: test fidelity K=5: ") for line in out.splitlines())
    assert out.splitlines()[-1].startswith(f"wrote {out_dir / 'results.json'}")
    _run(["analyze", path, "--which", "quotient", "--out", out_dir, "--quiet"], capsys)  # an earlier output
    assert sorted(p.name for p in out_dir.iterdir()) == ["quotient.png", "results.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
