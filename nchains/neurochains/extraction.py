"""NeuroChains extraction (NeuroChains, sections 3-4.1).

Learns a score per filter and a sigmoid gate per gateable region on frozen weights, minimising
``KL(softmax(F(x)) || softmax(F_S(x))) + lam * sum|S| + lam_gate * sum(alpha)`` over the images
with Adam; thresholds scores (``|S| < tau`` removed) and gates (``G < 0.5`` removes the region);
fine-tunes the surviving scores on the KL alone when it exceeds ``finetune_kl``.
"""

from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nchains import ops
from nchains._util.tensors import check_images
from nchains._util.io import hash_model, hash_tensor
from nchains._util.memory import keep_freed_memory
from nchains._util.device import full_precision, model_device_dtype
from nchains.graph.analysis import ModelGraph, graph_for
from nchains.neurochains.chain import Chain
from nchains.neurochains.config import NeuroChainsConfig
from nchains.instrument.scored_model import ScoredModel
from nchains.neurochains.phase import adam as _adam, run_phase as _run_phase, step as _step  # noqa: F401 (tools)


def model_family(graph: ModelGraph) -> str:
    """The paper's model family, which picks the default ``lam``/``lam_gate``.

    ``"resnet"`` when a residual add (``graph.adds``) lies inside a gateable block region: the
    paper's ResNet blocks ``relu(branch(x) + x)``, gated whole. ``"vgg"`` for plain chains (no
    residual add, no concat), whether or not they group layers into gateable blocks.
    ``"other"`` otherwise: adds outside any gateable block (e.g. only downsampling joins), or
    channel concats (Inception, DenseNet).

    Args:
        graph (ModelGraph): the model's analysis.

    Returns:
        str: ``"resnet"``, ``"vgg"`` or ``"other"``.
    """
    add_nodes = {a.node for a in graph.adds}
    if not graph.concats and any(r.kind == "block" and add_nodes.intersection(r.nodes)
                                 for r in graph.regions.values()):
        return "resnet"
    if not graph.adds and not graph.concats:
        return "vgg"
    return "other"


def _check_images(images) -> torch.Tensor:
    return check_images(images)


def _kl(logits: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Mean over images of KL(softmax(original) || softmax(logits))."""
    return F.kl_div(F.log_softmax(logits, dim=1), target_logp, log_target=True, reduction="batchmean")


def scoring_loss(sm: ScoredModel, images: torch.Tensor, target_logp: torch.Tensor, lam: float, lam_gate: float):
    """The scoring phase's objective (Eq. 8): ``KL + lam * sum|S| + lam_gate * sum(alpha)``;
    returns ``(loss, kl.detach())``."""
    kl = _kl(sm(images), target_logp)
    loss = kl + lam * sm.flat_scores.abs().sum()
    if sm.flat_gate_logits.numel():
        loss = loss + lam_gate * sm.flat_gate_logits.sum()
    return loss, kl.detach()


def scoring_optimizer(sm: ScoredModel, lr: float) -> torch.optim.Adam:
    """The scoring phase's Adam over the flat scores and gate logits."""
    params = [sm.flat_scores] + ([sm.flat_gate_logits] if sm.flat_gate_logits.numel() else [])
    return _adam(params, lr)


def _threshold(sm: ScoredModel, graph: ModelGraph, tau: float) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    gates = {name: int(float(sm.gate(name).detach()) >= 0.5) for name, _ in sm.named_gate_logits()}
    kept_scores = {}
    for name, score in sm.named_scores():
        s = score.detach().clone()
        region = graph.layers[name].region if name in graph.layers else None
        if region is not None and gates.get(region, 1) == 0:
            s.zero_()
        else:
            s[s.abs() < tau] = 0
        kept_scores[name] = s
    return kept_scores, gates


def _finetune(sm: ScoredModel, images, target_logp, cfg: NeuroChainsConfig, progress: bool) -> List[float]:
    """Adam on the surviving (non-zero) hard scores, KL only; removed filters stay at 0."""
    flat = sm.net.hard_flat_scores
    mask = (flat != 0).to(flat.dtype)
    flat.requires_grad_(True)

    def loss_fn():
        kl = _kl(sm(images), target_logp)
        return kl, kl.detach()

    try:
        return _run_phase(_adam([flat], cfg.finetune_lr), loss_fn, cfg.finetune_steps, cfg.stop_delta,
                          cfg.stop_window, "fine-tune", progress, mask)
    finally:
        flat.requires_grad_(False)


def _metrics(sm: ScoredModel, images, target_logits, graph: ModelGraph, score_linear: bool) -> Dict[str, float]:
    with torch.no_grad():
        out = sm(images)
        target_logp = F.log_softmax(target_logits, dim=1)
        kl = float(_kl(out, target_logp))
        pred = target_logits.argmax(1)
        agreement = float((out.argmax(1) == pred).float().mean())
        p_orig = target_logp.exp().gather(1, pred[:, None])
        p_chain = F.softmax(out, dim=1).gather(1, pred[:, None])
        prob_drop = float((p_orig - p_chain).mean())
    return {"kl": kl, "agreement": agreement, "prob_drop": prob_drop}


def strongest_filters(sm: ScoredModel, images: torch.Tensor, kept: Dict[str, Sequence[int]],
                      classes: torch.Tensor) -> Dict[int, List[Tuple[str, int, float]]]:
    """Per class, the kept filter of every kept layer with the largest Taylor contribution
    ``sum |a * d y_c / d a|`` over the images of that class (batched, one backward per class).
    Each layer is ranked on its own: the result is not a connected path (critical paths are).

    Args:
        sm (ScoredModel): the chain in hard mode.
        images (Tensor[N, C, H, W]): the chain's images.
        kept (dict layer -> filter indices): the chain's kept filters.
        classes (Tensor[N]): class of each image (the original model's prediction).

    Returns:
        dict class -> [(layer, filter index, contribution)] in graph order.
    """
    layers = [name for name, idx in kept.items() if len(idx)]
    outputs: Dict[str, torch.Tensor] = {}
    hooks = []
    for name in layers:
        hooks.append(sm.unit(name).register_forward_hook(
            lambda mod, inp, out, name=name: outputs.__setitem__(name, out)))
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)  # so the graph reaches every unit output
            logits = sm(x)
            present = [n for n in layers if n in outputs]
            result = {}
            uniq = sorted(set(classes.tolist()))
            for k, c in enumerate(uniq):
                sel = classes == c
                y = logits[sel, c].sum()
                grads = torch.autograd.grad(y, [outputs[n] for n in present], retain_graph=k < len(uniq) - 1,
                                            allow_unused=True)
                row = []
                for name, grad in zip(present, grads):
                    if grad is None:
                        continue
                    a = outputs[name].detach()
                    contrib = ops.taylor_contributions(a, grad, absolute=True)[sel].sum(0)
                    idx = torch.as_tensor(list(kept[name]), dtype=torch.long)
                    best = int(torch.argmax(contrib[idx]))
                    row.append((name, int(idx[best]), float(contrib[idx[best]])))
                result[int(c)] = row
    finally:
        for h in hooks:
            h.remove()
    return result


def extract(model: nn.Module, images: torch.Tensor, config: Optional[NeuroChainsConfig] = None, *,
            class_names: Optional[Sequence[str]] = None, progress: Optional[bool] = None,
            model_spec: Optional[dict] = None, graph: Optional[ModelGraph] = None, **overrides) -> Chain:
    """Extract the local inference chain of ``model`` on ``images`` (NeuroChains).

    Args:
        model (nn.Module): a trained CNN (traceable by torch.fx); put in eval mode, never modified.
            On any device (the images are moved there), in any float dtype (the images' dtype).
        images (Tensor[N, C, H, W]): preprocessed images from one local region of data space.
        config (NeuroChainsConfig): hyper-parameters; defaults are the paper's.
        class_names (sequence of str): names of the model's output classes, for reports.
        progress (bool or None): show a progress bar with the loss; None (default): when stderr
            is a terminal.
        model_spec (dict): how to rebuild the model later (stored in the chain, used by the CLI);
            None records ``{"kind": "default"}`` when ``model`` has the shipped model's weights.
        graph (ModelGraph): ``nchains.analyze(model, images[:1])``, to reuse one analysis
            (checked to be this model's, at the images' shape); default: analysed here.
        **overrides: NeuroChainsConfig fields, e.g. ``lam=0.01, steps=100, seed=1``.

    Returns:
        Chain: kept filters and scores per layer, binarised gates per region, metrics measured
        on the final binarised, fine-tuned chain.

    Notes:
        The loss and KL stay on the model's device and are read back in batches
        (:mod:`nchains.neurochains.phase`): the early stop is decided there, at exactly the step a
        loop reading every step stops at; a NaN or infinite loss raises ValueError.
        While the scoring and fine-tune loops run, glibc keeps freed memory for reuse instead
        of unmapping and page-faulting it in again every step (:mod:`nchains._memory`; set
        ``NCHAINS_KEEP_MEMORY=0`` to turn it off); the heap is trimmed afterwards.

    Example:
        >>> chain = nchains.extract(model, images, steps=300, seed=0)
        >>> print(chain.summary())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    images = _check_images(images)
    if config is not None and not isinstance(config, NeuroChainsConfig):
        raise TypeError(f"config must be a NeuroChainsConfig or None, got {type(config).__name__}")
    cfg = (config or NeuroChainsConfig()).replace(**overrides)
    if progress is None:  # a bar is for people watching a terminal, not for logs and pipes
        progress = sys.stderr.isatty()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    images = images.to(model_device_dtype(model)[0])  # the hash and the chain do not depend on the device
    graph = graph_for(model, images.shape[1:], graph, example=images[:1])
    family = model_family(graph)
    cfg = cfg.resolved(family)
    with torch.no_grad():
        target_logits = model(images)
    target_logp = F.log_softmax(target_logits, dim=1)
    if class_names is not None and len(class_names) != target_logits.shape[1]:
        raise ValueError(f"class_names must have {target_logits.shape[1]} entries (one per output), "
                         f"got {len(class_names)}")

    with full_precision():  # its self-check compares exact computations (no TF32 convs)
        sm = ScoredModel(graph, score_linear=cfg.score_linear, temperature=cfg.temperature)
    run = _optimise(sm, graph, images, target_logp, cfg, progress)
    model_hash = hash_model(model)
    if model_spec is None:  # a chain of the shipped model knows it, so `nchains export` needs no --model
        from nchains.models.spec import spec_of_model_hash

        model_spec = spec_of_model_hash(model_hash)
    return _chain_of(sm, graph, images, target_logits, cfg, run, t0, family=family, model_hash=model_hash,
                     class_names=class_names, model_spec=model_spec)


def _optimise(sm: ScoredModel, graph: ModelGraph, images: torch.Tensor, target_logp: torch.Tensor,
              cfg: NeuroChainsConfig, progress: bool) -> Dict[str, object]:
    """Scoring phase, thresholds, hard switch and (when the KL asks for it) fine-tuning; leaves
    ``sm`` in hard eval mode and returns the gates, loss histories and the KL before fine-tuning."""
    sm.train()

    def loss_fn():
        return scoring_loss(sm, images, target_logp, cfg.lam, cfg.lam_gate)

    with keep_freed_memory():  # the loops free and reallocate the same large tensors every step
        history = _run_phase(scoring_optimizer(sm, cfg.lr), loss_fn, cfg.steps, cfg.stop_delta, cfg.stop_window,
                             "scoring", progress)
        kept_scores, gates = _threshold(sm, graph, cfg.tau)
        sm.set_hard(kept_scores, gates)
        finetune_history: List[float] = []
        with torch.no_grad():
            kl_after = float(_kl(sm(images), target_logp))
        if cfg.finetune and cfg.finetune_steps > 0 and kl_after > cfg.finetune_kl:
            finetune_history = _finetune(sm, images, target_logp, cfg, progress)
    sm.eval()
    return {"gates": gates, "history": history, "finetune_history": finetune_history, "kl_after": kl_after}


def _chain_of(sm: ScoredModel, graph: ModelGraph, images: torch.Tensor, target_logits: torch.Tensor,
              cfg: NeuroChainsConfig, run: Dict[str, object], t0: float, *, family: str, model_hash: str,
              class_names: Optional[Sequence[str]], model_spec: Optional[dict]) -> Chain:
    """The Chain of a finished extraction: kept filters and scores, metrics on the hard model,
    the strongest filter per class and layer."""
    gates, history, finetune_history = run["gates"], run["history"], run["finetune_history"]
    final = {name: sm.hard_score(name).detach().clone() for name, _ in sm.named_scores()}
    kept = {name: torch.nonzero(s != 0).flatten().tolist() for name, s in final.items()}
    kept_values = {name: [float(final[name][i]) for i in idx] for name, idx in kept.items()}
    metrics = _metrics(sm, images, target_logits, graph, cfg.score_linear)
    sizes = {name: int(s.numel()) for name, s in final.items()}
    metrics.update({
        "filters_kept": sum(len(v) for v in kept.values()),
        "filters_total": sum(sizes.values()),
        "layers_kept": sum(1 for v in kept.values() if v),
        "layers_total": len(kept),
        "regions_kept": sum(gates.values()),
        "regions_total": len(gates),
        "kl_before_finetune": run["kl_after"],
        "steps_run": len(history),
        "finetune_steps_run": len(finetune_history),
        "seconds": 0.0,
    })
    classes = target_logits.argmax(1)
    strongest = strongest_filters(sm, images, kept, classes)
    metrics["seconds"] = time.perf_counter() - t0
    return Chain(
        kept=kept, scores=kept_values, gates=gates, config=cfg.to_dict(), seed=cfg.seed,
        model_hash=model_hash, images_hash=hash_tensor(images), metrics=metrics,
        layer_sizes=sizes, labels={n: graph.label_of.get(n, n) for n in [*sizes, *gates]},
        regions={name: {"kind": r.kind, "layers": list(r.units)} for name, r in graph.regions.items()},
        input_shape=list(images.shape[1:]), family=family,
        classes=sorted(set(classes.tolist())), class_names=list(class_names) if class_names is not None else None,
        strongest_filters={str(c): [[layer, idx, contrib] for layer, idx, contrib in p]
                           for c, p in strongest.items()},
        history={"scoring": history, "finetune": finetune_history}, model_spec=model_spec,
    )
