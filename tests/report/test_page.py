"""The report as a user sees it: written all or nothing, self-contained (no external resource),
rendered by headless Chromium to a non-blank screenshot, with the expected sections and figures."""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

import nchains
from nchains.report.unit_outputs import computed_layers

from _analyses_chain import analyses_chain

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ("Chain graph", "The chain's images", "SMOE feature maps", "Kept filters", "Inference chain per class",
            "Metrics and analyses")


class _Refs(HTMLParser):
    """Every src/href attribute and CSS url(), and counts of elements."""

    def __init__(self):
        super().__init__()
        self.refs, self.counts, self.h2, self._in_h2 = [], {}, [], False

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "srcset", "action", "poster", "data"):
                self.refs.append(value or "")
            if name == "style":
                self.refs += re.findall(r"url\(\s*['\"]?([^)'\"]*)", value or "")
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        self._in_h2 = False if tag == "h2" else self._in_h2

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data.strip())
        self.refs += re.findall(r"url\(\s*['\"]?([^)'\"]*)", data) if "url(" in data else []


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    net, images, _, chain = analyses_chain()
    out = tmp_path_factory.mktemp("rep") / "report"
    path = nchains.report(chain, net, out, images=images, analyses="faithfulness,quotient", actmax_steps=4,
                          progress=False)
    with open(path, encoding="utf-8") as f:
        html = f.read()
    return chain, images, out, path, html


def test_page_is_self_contained_and_complete(written):
    chain, images, out, path, html = written
    assert sorted(os.listdir(out)) == ["analyses.json", "index.html", "report.json"]
    assert json.loads((out / "report.json").read_text()) == {"format": "nchains-report", "version": 1,
                                                            "files": ["index.html", "analyses.json"]}
    refs = _Refs()
    refs.feed(html)
    assert refs.refs, "no src/href at all: the parser saw nothing"
    external = [r for r in refs.refs if not (r.startswith("data:") or r.startswith("#"))]
    assert external == [], external[:5]
    assert "<script" not in html.lower() and "@import" not in html and "@font-face" not in html
    assert "@media print" in html
    assert refs.h2 == list(SECTIONS)
    layers = computed_layers(chain)
    filters = sum(len(chain.kept[l]) for l in layers)
    picks = len(chain.classes)
    # images + SMOE (input, each layer, Combine All per pick) + one strip per filter + two plots
    assert refs.counts["img"] == len(images) + picks * (len(layers) + 2) + filters + 2
    assert refs.counts["svg"] == 1 and html.count('<circle class="filter"') == filters
    for label in ("Combine All", chain.filter_label(layers[0], chain.kept[layers[0]][0]), "faithfulness", "quotient"):
        assert label in html


def test_an_existing_report_is_replaced_and_a_foreign_folder_refused(tmp_path):
    net, images, _, chain = analyses_chain()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="no nchains report.json in it; it holds 'notes.txt'"):
        nchains.report(chain, net, foreign, images=images, analyses=None, actmax_steps=0, progress=False)
    assert os.listdir(foreign) == ["notes.txt"]
    out = tmp_path / "report"
    nchains.report(chain, net, out, images=images, analyses="quotient", actmax_steps=0, progress=False)
    assert sorted(os.listdir(out)) == ["analyses.json", "index.html", "report.json"]
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="it holds 'notes.txt' besides an nchains report output"):
        nchains.report(chain, net, out, images=images, analyses=None, actmax_steps=0, progress=False)
    (out / "notes.txt").unlink()
    again = nchains.report(chain, net, out, images=images, analyses=None, actmax_steps=0, progress=False)
    assert sorted(os.listdir(out)) == ["index.html", "report.json"]  # the previous set replaced as a whole
    assert json.loads((out / "report.json").read_text())["files"] == ["index.html"]
    assert "Analyses not run" in open(again, encoding="utf-8").read()
    assert not [n for n in os.listdir(tmp_path) if "staging" in n or "old" in n]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (tools/setup.sh installs Debian's chromium)")
def test_chromium_renders_a_non_blank_page_with_the_figures(written, tmp_path):
    from PIL import Image

    chain, images, out, path, html = written
    shot = tmp_path / "screenshot.png"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    url = "file://" + os.path.abspath(path)
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,1600", url], check=True, timeout=180,
                   capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (1600, 1280)
    assert pixels.std() > 20, "screenshot is (nearly) blank"
    colours = len(np.unique(pixels.reshape(-1, 3)[::7].astype(np.uint8), axis=0))
    assert colours > 50, f"only {colours} colours on the screenshot"
    dom = subprocess.run([*base, "--dump-dom", url], check=True, timeout=180, capture_output=True, text=True).stdout
    refs = _Refs()
    refs.feed(dom)
    assert refs.h2 == list(SECTIONS)
    assert refs.counts.get("svg") == 1 and refs.counts.get("circle", 0) >= len(chain.kept["conv1"])
    assert dom.count("<title>") > 20 and "score" in dom
    pdf = tmp_path / "printed.pdf"  # printable: the print stylesheet lays it out on pages
    subprocess.run([*base, f"--print-to-pdf={pdf}", "--no-pdf-header-footer", url], check=True, timeout=180,
                   capture_output=True)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", data)) >= 2
