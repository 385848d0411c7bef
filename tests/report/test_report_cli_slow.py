"""``nchains report`` end to end on a chain of the shipped model (slow: the default analyses and
the activation maximisation of hundreds of filters of a real ResNet chain)."""

import json
import os
import re

import pytest

from nchains import cli

from _default_chain import default_chain

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_report_of_a_shipped_model_chain(tmp_path, capsys):
    _, images, chain = default_chain()
    path = tmp_path / "chain.json"
    chain.save(path)
    out = tmp_path / "report"
    # 8 steps: this 20-step chain keeps most of the model's filters (about 900 to maximise)
    assert cli.main(["report", str(path), "--out", str(out), "--steps", "8"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out / 'index.html'}" in captured.out
    assert "report: activation maximisation" in captured.err
    html = (out / "index.html").read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith(("data:", "#")) for r in refs)
    results = json.loads((out / "analyses.json").read_text())
    assert results["which"] == ["faithfulness", "quotient", "stability", "robustness", "magnitude"]
    for name in results["which"]:
        assert f"<h3>{name}</h3>" in html
    assert html.count('<circle class="filter"') > 0 and "Combine All" in html
    assert sorted(os.listdir(out)) == ["analyses.json", "index.html", "report.json"]
