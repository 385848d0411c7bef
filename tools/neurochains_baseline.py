"""A plain, hook-based PyTorch reproduction of NeuroChains (paper sections 3-4.1).

This is the baseline that ``tools/bench_extract.py`` measures :func:`nchains.extract` against.
It deliberately uses nothing from ``nchains``: it is what a researcher would write from the
paper with forward hooks on an unmodified model.

* A score ``S[C_out]`` per conv filter multiplies the filter's map after BatchNorm and before
  the nonlinearity: a forward hook on the conv's BatchNorm (on the conv itself when it has
  none) returns ``out * S[None, :, None, None]``.
* A gate ``G = sigmoid(alpha / T)`` per shape-preserving region: a forward hook on every
  residual block whose output has its input's shape (torchvision ``BasicBlock`` /
  ``Bottleneck`` without a shape-changing downsample) returns ``G * out + (1 - G) * input``;
  in models without residual blocks (VGG-like), every ``conv[-bn][-act]`` unit whose output
  has its input's shape is gated the same way (hook on the unit's last module).
* Loss ``KL(p_orig || p_scored)`` (batchmean) ``+ lam * sum|S| + lam_gate * sum(alpha)``,
  Adam, frozen weights, model in eval mode.
* Thresholding: ``|S| < tau`` removed, ``G < 0.5`` removes the region (replaced by
  ``nn.Identity`` so it is not computed; its filters count as removed), kept regions are
  no longer blended; then the surviving scores are fine-tuned on the KL alone when the KL
  exceeds ``finetune_kl``.
* Early stop: a phase stops once the loss changed by less than ``stop_delta`` over the last
  ``stop_window`` steps (``stop_window=1`` is the paper's consecutive-step rule).

Metrics (KL, agreement of the arg-max with the original model) are measured on the final
binarised chain. The model is restored (hooks removed, blocks put back) before returning.

Usage (standalone, on the shipped Fashion-MNIST model)::

    python tools/neurochains_baseline.py --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:  # residual blocks are recognised by type; torchvision is optional
    from torchvision.models.resnet import BasicBlock, Bottleneck
    _RESIDUAL_TYPES: tuple = (BasicBlock, Bottleneck)
except ImportError:  # pragma: no cover
    _RESIDUAL_TYPES = ()

_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish)

# (lam, lam_gate) of the paper: VGG-19 and ResNet-50.
PAPER_LAMBDAS = {"vgg": (0.007, 2.0), "resnet": (0.0065, 0.9)}


@dataclass
class BaselineConfig:
    """Hyper-parameters; defaults are the paper's (section 4.1) with a 20-step stop window."""

    lam: Optional[float] = None        # None: paper value for the family
    lam_gate: Optional[float] = None
    temperature: float = 0.2
    lr: float = 0.005
    steps: int = 300
    tau: float = 0.1
    finetune: bool = True
    finetune_lr: float = 0.01
    finetune_steps: int = 50
    finetune_kl: float = 0.1
    stop_delta: Optional[float] = 0.02
    stop_window: int = 20
    seed: int = 0


@dataclass
class BaselineResult:
    kept: Dict[str, List[int]]
    scores: Dict[str, torch.Tensor]
    gates: Dict[str, int]
    metrics: Dict[str, float]
    history: Dict[str, List[float]] = field(default_factory=dict)
    step_times: Dict[str, List[float]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- discovery


def _discover(model: nn.Module, x: torch.Tensor):
    """One probe forward pass with recording hooks.

    Returns ``(score_sites, regions, family)``: ``score_sites`` maps each conv name to the
    module whose output gets the score (its BatchNorm, or the conv); ``regions`` maps a region
    name to ``(module to hook, module whose input is the region input or None, names of the
    modules that the identity replaces when the region is removed)``.
    """
    names = {m: n for n, m in model.named_modules()}
    calls: List[tuple] = []  # (module, input tensor, output tensor) of leaf modules in call order
    shapes: Dict[nn.Module, tuple] = {}

    def leaf_hook(m, inp, out):
        calls.append((m, inp[0] if inp else None, out))

    def block_hook(m, inp, out):
        shapes[m] = (tuple(inp[0].shape), tuple(out.shape))

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d) + _ACTS):
            hooks.append(m.register_forward_hook(leaf_hook))
        if _RESIDUAL_TYPES and isinstance(m, _RESIDUAL_TYPES):
            hooks.append(m.register_forward_hook(block_hook))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    n_calls: Dict[nn.Module, int] = {}
    for m, _, _ in calls:
        n_calls[m] = n_calls.get(m, 0) + 1

    # conv -> BN (the BN consuming the conv's output) -> act (consuming the BN/conv output)
    score_sites: Dict[str, nn.Module] = {}
    unit_last: Dict[str, nn.Module] = {}
    unit_modules: Dict[str, List[str]] = {}
    unit_shapes: Dict[str, tuple] = {}
    for i, (m, inp, out) in enumerate(calls):
        if not isinstance(m, nn.Conv2d):
            continue
        name = names[m]
        if name in score_sites:
            raise ValueError(f"conv {name!r} is called more than once; the hook baseline "
                             "scores one call per module")
        site, cur = m, out
        nxt = calls[i + 1] if i + 1 < len(calls) else None
        if nxt is not None and isinstance(nxt[0], nn.BatchNorm2d) and nxt[1] is cur:
            site, cur = nxt[0], nxt[2]
            nxt = calls[i + 2] if i + 2 < len(calls) else None
        last = site
        if nxt is not None and isinstance(nxt[0], _ACTS) and nxt[1] is cur:
            last, cur = nxt[0], nxt[2]
        score_sites[name] = site
        unit_last[name] = last
        unit_modules[name] = [names[u] for u in dict.fromkeys((m, site, last))]
        unit_shapes[name] = (tuple(inp.shape), tuple(cur.shape))

    regions: Dict[str, tuple] = {}
    blocks = [m for m in model.modules() if _RESIDUAL_TYPES and isinstance(m, _RESIDUAL_TYPES)]
    if blocks:
        family = "resnet"
        for b in blocks:
            if b in shapes and shapes[b][0] == shapes[b][1]:
                regions[names[b]] = (b, None, [names[b]])
    else:
        family = "vgg"
        for name, (si, so) in unit_shapes.items():
            mods = [model.get_submodule(u) for u in unit_modules[name]]
            if si == so and all(n_calls[u] == 1 for u in mods):  # shared modules can't be swapped
                regions[name] = (unit_last[name], mods[0], unit_modules[name])
    return score_sites, regions, family


# ---------------------------------------------------------------------------- training


def _kl(logits, target_logp):
    return F.kl_div(F.log_softmax(logits, dim=1), target_logp, log_target=True, reduction="batchmean")


def _phase(params, loss_fn, steps, lr, stop_delta, stop_window, grad_masks=None):
    opt = torch.optim.Adam(params, lr=lr)
    history, times = [], []
    t_prev = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        if grad_masks is not None:
            for p, mask in zip(params, grad_masks):
                if p.grad is not None:  # None for scores inside removed regions
                    p.grad.mul_(mask)
        opt.step()
        value = float(loss.detach())
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
        history.append(value)
        if (stop_delta is not None and len(history) > stop_window
                and abs(history[-1 - stop_window] - value) < stop_delta):
            break
    return history, times


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


class HookedNeuroChains:
    """Scores and gates installed on ``model`` with forward hooks (the scoring phase).

    ``loss()`` is one evaluation of Eq. (8); ``harden(tau)`` thresholds and binarises
    (removed regions swapped for ``nn.Identity``); ``restore()`` removes every hook and puts
    the model back. :func:`neurochains_baseline` is the whole algorithm on top of it.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, cfg: BaselineConfig):
        self.model, self.images, self.cfg = model, images, cfg
        model.eval()
        self._frozen = [(p, p.requires_grad) for p in model.parameters()]
        model.requires_grad_(False)
        self.score_sites, self.regions, self.family = _discover(model, images)
        lam0, lamg0 = PAPER_LAMBDAS[self.family]
        self.lam = lam0 if cfg.lam is None else cfg.lam
        self.lam_gate = lamg0 if cfg.lam_gate is None else cfg.lam_gate
        self.T = T = cfg.temperature
        with torch.no_grad():
            self.target_logits = model(images)
        self.target_logp = F.log_softmax(self.target_logits, dim=1)

        ref = next(model.parameters())
        self.scores = {n: torch.ones(site.weight.shape[0] if isinstance(site, nn.Conv2d) else site.num_features,
                                     dtype=ref.dtype, device=ref.device, requires_grad=True)
                       for n, site in self.score_sites.items()}
        self.alphas = {n: torch.zeros((), dtype=ref.dtype, device=ref.device, requires_grad=True)
                       for n in self.regions}
        self._hooks, self._gate_hooks, self._swapped = [], {}, {}
        region_inputs: Dict[str, torch.Tensor] = {}

        def score_hook(s):
            return lambda m, inp, out: out * s[None, :, None, None]

        def gate_hook(name, a):
            def hook(m, inp, out):
                g = torch.sigmoid(a / T)
                x = inp[0] if name not in region_inputs else region_inputs.pop(name)
                return g * out + (1 - g) * x
            return hook

        def remember_input(name):
            return lambda m, inp: region_inputs.__setitem__(name, inp[0])

        try:
            for n, site in self.score_sites.items():
                self._hooks.append(site.register_forward_hook(score_hook(self.scores[n])))
            for n, (m, entry, _) in self.regions.items():
                hs = [m.register_forward_hook(gate_hook(n, self.alphas[n]))]
                if entry is not None:  # layer gate: the region's input is the conv's input
                    hs.append(entry.register_forward_pre_hook(remember_input(n)))
                self._gate_hooks[n] = hs
        except BaseException:
            self.restore()
            raise
        self.score_list, self.alpha_list = list(self.scores.values()), list(self.alphas.values())

    def kl(self) -> torch.Tensor:
        return _kl(self.model(self.images), self.target_logp)

    def loss(self) -> torch.Tensor:
        """``KL + lam * sum|S| + lam_gate * sum(alpha)`` on the soft (scoring-phase) model."""
        loss = self.kl() + self.lam * sum(s.abs().sum() for s in self.score_list)
        if self.alpha_list:
            loss = loss + self.lam_gate * sum(self.alpha_list)
        return loss

    def harden(self, tau: float) -> Dict[str, int]:
        """Binarise gates (G < 0.5: region replaced by the identity, not computed; else no
        blend) and zero scores with ``|S| < tau`` or inside removed regions."""
        gates = {n: int(float(torch.sigmoid(a.detach() / self.T)) >= 0.5) for n, a in self.alphas.items()}
        for n, hs in self._gate_hooks.items():
            for h in hs:
                h.remove()
            if gates[n] == 0:
                for sub in self.regions[n][2]:
                    self._swapped[sub] = self.model.get_submodule(sub)
                    _set_module(self.model, sub, nn.Identity())
        self._gate_hooks.clear()
        removed_units = {c for n, g in gates.items() if g == 0 for c in self.score_sites
                         if c == n or c.startswith(n + ".")}
        with torch.no_grad():
            for n, s in self.scores.items():
                s.requires_grad_(False)
                if n in removed_units:
                    s.zero_()
                else:
                    s[s.abs() < tau] = 0
        return gates

    def restore(self) -> None:
        """Remove every hook, put swapped regions back, restore requires_grad."""
        for h in self._hooks:
            h.remove()
        for hs in self._gate_hooks.values():
            for h in hs:
                h.remove()
        self._hooks, self._gate_hooks = [], {}
        for n, m in self._swapped.items():
            _set_module(self.model, n, m)
        self._swapped = {}
        for p, rg in self._frozen:
            p.requires_grad_(rg)


def neurochains_baseline(model: nn.Module, images: torch.Tensor,
                         config: Optional[BaselineConfig] = None, **overrides) -> BaselineResult:
    """Extract a NeuroChains sub-network of ``model`` on ``images`` with plain forward hooks.

    Args:
        model (nn.Module): trained CNN; frozen and put in eval mode; restored on return.
        images (Tensor[N, C, H, W]): preprocessed images of one local region.
        config (BaselineConfig): hyper-parameters; ``overrides`` replace single fields.

    Returns:
        BaselineResult with kept filter indices per conv, final scores, binarised gates,
        metrics (``filters_kept``, ``kl``, ``agreement``, ``steps_run``...) and per-step times.
    """
    cfg = dataclasses.replace(config or BaselineConfig())
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown BaselineConfig field {k!r}")
        setattr(cfg, k, v)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    hk = HookedNeuroChains(model, images, cfg)
    try:
        history, times = _phase(hk.score_list + hk.alpha_list, hk.loss, cfg.steps, cfg.lr,
                                cfg.stop_delta, cfg.stop_window)
        gates = hk.harden(cfg.tau)
        with torch.no_grad():
            kl_after = float(hk.kl())

        ft_history, ft_times = [], []
        if cfg.finetune and cfg.finetune_steps > 0 and kl_after > cfg.finetune_kl:
            masks = [(s != 0).to(s.dtype) for s in hk.score_list]
            for s in hk.score_list:
                s.requires_grad_(True)
            ft_history, ft_times = _phase(hk.score_list, hk.kl, cfg.finetune_steps, cfg.finetune_lr,
                                          cfg.stop_delta, cfg.stop_window, masks)
            for s in hk.score_list:
                s.requires_grad_(False)

        with torch.no_grad():
            out = model(images)
            kl = float(_kl(out, hk.target_logp))
            agreement = float((out.argmax(1) == hk.target_logits.argmax(1)).float().mean())
    finally:
        hk.restore()

    scores = hk.scores
    kept = {n: torch.nonzero(s).flatten().tolist() for n, s in scores.items()}
    metrics = {
        "filters_kept": sum(len(v) for v in kept.values()),
        "filters_total": sum(s.numel() for s in scores.values()),
        "regions_kept": sum(gates.values()),
        "regions_total": len(gates),
        "kl": kl,
        "kl_before_finetune": kl_after,
        "agreement": agreement,
        "steps_run": len(history),
        "finetune_steps_run": len(ft_history),
        "lam": hk.lam,
        "lam_gate": hk.lam_gate,
        "seconds": time.perf_counter() - t0,
    }
    return BaselineResult(kept=kept, scores={n: s.detach() for n, s in scores.items()}, gates=gates,
                          metrics=metrics, history={"scoring": history, "finetune": ft_history},
                          step_times={"scoring": times, "finetune": ft_times})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="NeuroChains hook baseline on the shipped model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--classes", nargs=2, default=["sneaker", "ankle-boot"])
    parser.add_argument("--per-class", type=int, default=10)
    args = parser.parse_args(argv)
    from nchains.models import zoo  # only to load the shipped model and images

    model = zoo.default_model()
    x, _, _ = zoo.default_images(args.classes, per_class=args.per_class)
    res = neurochains_baseline(model, x, steps=args.steps)
    m = res.metrics
    t = res.step_times["scoring"][1:] or res.step_times["scoring"]
    print(f"filters kept {m['filters_kept']}/{m['filters_total']}, regions kept "
          f"{m['regions_kept']}/{m['regions_total']}, KL {m['kl']:.4f}, agreement {m['agreement']:.2f}, "
          f"steps {m['steps_run']}+{m['finetune_steps_run']}, "
          f"{1e3 * statistics.median(t):.1f} ms/iter, {m['seconds']:.1f} s")


if __name__ == "__main__":
    main()
