"""The README's Python API snippet runs as a script and prints what it computes.

The snippet is run as written except that every ``nchains.extract(...)`` call gets
``steps=20, finetune_steps=5`` appended (the paper's 300 steps take about a minute per
extraction on 2 cores); its printed figures are then recomputed here from what it saved.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nchains
from nchains import zoo

README = Path(__file__).resolve().parents[1] / "README.md"
_FAST = ", steps=20, finetune_steps=5"


def _python_api_snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "README's Python API section has no ```python block"
    return found.group(1)


def _with_fast_extract(code: str) -> str:
    """Appends the fast overrides inside each ``nchains.extract(...)`` call (parentheses matched)."""
    out, pos = [], 0
    while True:
        start = code.find("nchains.extract(", pos)
        if start < 0:
            return "".join(out) + code[pos:]
        depth, i = 0, start + len("nchains.extract")
        for i in range(i, len(code)):
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            if depth == 0:
                break
        out.append(code[pos:i] + _FAST + ")")
        pos = i + 1


def test_fast_override_insertion():
    assert _with_fast_extract("a = nchains.extract(m, f(x), k=g(1))\n") == \
        f"a = nchains.extract(m, f(x), k=g(1){_FAST})\n"


@pytest.mark.slow  # a subprocess and three extractions: ~1 min idle, several on a loaded 2-core machine
def test_python_api_snippet_prints_what_it_computes(tmp_path):
    code = _with_fast_extract(_python_api_snippet())
    assert code.count(_FAST) == 2
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()

    chain = nchains.Chain.load(tmp_path / "chain.json")
    assert chain.model_spec == {"kind": "default"}
    m = chain.metrics
    assert any(line.startswith(f"filters kept {m['filters_kept']}/{m['filters_total']}") for line in out)
    assert f"Inference chain: {m['filters_kept']}/{m['filters_total']} filters, " \
           f"{m['layers_kept']}/{m['layers_total']} layers" in out
    for c in chain.classes:
        assert any(line.startswith(f"{zoo.FASHION_CLASSES[c]}: ") for line in out), out

    model = zoo.default_model()
    images, _, _ = zoo.default_images(["sneaker", "ankle-boot"], per_class=10)
    with torch.no_grad():
        agree = (chain.apply(model)(images).argmax(1) == model(images).argmax(1)).float().mean().item()
    assert f"masked model agrees with the original on {agree:.0%} of the chain's images" in out

    jaccard = next(line for line in out if line.startswith("Jaccard index with the bag/sandal chain: "))
    shared = next(line for line in out if line.startswith("filters both chains keep: "))
    other = nchains.extract(model, zoo.default_images(["bag", "sandal"])[0], steps=20, finetune_steps=5)
    assert float(jaccard.rsplit(" ", 1)[1]) == pytest.approx(chain.jaccard(other), abs=0.02)
    both = sum(len(v) for v in chain.shared(other).values())
    assert abs(int(shared.rsplit(" ", 1)[1]) - both) <= max(2, 0.05 * both)
