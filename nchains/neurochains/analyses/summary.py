"""One line per analysis of :func:`~.run.run_analyses`'s results, for people (``nchains analyze``
prints them; a report can show them under its figures)."""

from __future__ import annotations

from typing import Any, Dict, List

from nchains.neurochains.analyses.plots import fmt

__all__ = ["summary_lines"]


def _fidelity(r: Dict[str, Any]) -> str:
    pts = ", ".join(f"lam {p['lam']:.3g}: {p['filters_kept']} filters, prob drop {p['prob_drop']:.3f}"
                    for p in r["points"])
    op = r["operating_point"]
    return (f"fidelity vs size ({r['steps']} steps): {pts}; operating point lam {op['lam']:.3g}: "
            f"{op['filters_kept']} filters, prob drop {op['prob_drop']:.3f}")


def _faithfulness(r: Dict[str, Any]) -> str:
    rows = r["filters"]
    if not rows:
        return "faithfulness: no kept filter to remove"
    worst = max(rows, key=lambda row: row["damage"])
    return (f"faithfulness: {len(rows)} filters removed one at a time; Spearman(score, damage) "
            f"{fmt(r['spearman'])}; largest damage {worst['damage']:.3f} ({worst['label']}, score "
            f"{worst['score']:.2f})")


def _quotient(r: Dict[str, Any]) -> str:
    negative = sum(r["changed"])
    return f"quotient Q(p, q): median {fmt(r['median'])}, {negative}/{r['images']} negative (class changed)"


def _stability(r: Dict[str, Any]) -> str:
    pairs = list(zip(r["ks"], r["fidelity"]))
    shown = pairs if len(pairs) <= 4 else [pairs[0], pairs[len(pairs) // 2], pairs[-1]]
    text = ", ".join(f"K={k}: {fmt(v)}" for k, v in shown)
    return (f"stability: test fidelity {text} on {r['pool_size']} held-out images ({r['pool']}; "
            f"whole pool {fmt(r['pool_agreement'])})")


def _robustness(r: Dict[str, Any]) -> str:
    m = r["means"]

    def three(who):
        return " / ".join(f"{m[who][k]:.2f}" for k in ("clean", "fgsm", "pgd"))

    text = (f"robustness (eps {r['eps']:g}, PGD {r['steps']} steps): P(true class) clean / FGSM / PGD: "
            f"original {three('original')}, chain {three('chain')}")
    if "chain_white_box" in m:
        text += f" (attacks on the chain itself: {three('chain_white_box')})"
    return text


def _magnitude(r: Dict[str, Any]) -> str:
    nc, mg = r["neurochains"], r["magnitude"]
    text = (f"magnitude baseline ({r['filters_kept']} filters, {r['overlap']} shared): KL {mg['kl']:.3g}, "
            f"agreement {mg['agreement']:.2f}")
    if "magnitude_finetuned" in r:
        ft = r["magnitude_finetuned"]
        text += f"; fine-tuned KL {ft['kl']:.3g}, agreement {ft['agreement']:.2f}"
    return text + f"; NeuroChains KL {nc['kl']:.3g}, agreement {nc['agreement']:.2f}"


_LINES = {"fidelity": _fidelity, "faithfulness": _faithfulness, "quotient": _quotient, "stability": _stability,
          "robustness": _robustness, "magnitude": _magnitude}


def summary_lines(results: Dict[str, Any]) -> List[str]:
    """The chain's size and fidelity, then one line per analysis present, then the skipped ones."""
    c = results["chain"]
    lines = [f"chain: {c['filters_kept']}/{c['filters_total']} filters, {c['layers_kept']}/{c['layers_total']} "
             f"layers; on its {c['images']} images KL {c['kl']:.4f}, agreement {c['agreement']:.3f}, "
             f"prob drop {c['prob_drop']:.4f}"]
    lines += [_LINES[name](results[name]) for name in _LINES if name in results]
    lines += [f"{name}: skipped ({why})" for name, why in results.get("skipped", {}).items()]
    return lines
