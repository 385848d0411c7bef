"""NeuroChains hyper-parameters, with the paper's defaults (NeuroChains, section 4.1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

# (lambda, lambda_gate) per model family, as in the paper; "other" follows ResNet.
FAMILY_DEFAULTS = {"vgg": (0.007, 2.0), "resnet": (0.0065, 0.9), "other": (0.0065, 0.9)}


@dataclass
class NeuroChainsConfig:
    """Every knob of :func:`nchains.extract`.

    Attributes:
        lam: weight of the L1 penalty on filter scores; None picks the paper's value for the
            model family (VGG 0.007, ResNet and others 0.0065).
        lam_gate: weight of the penalty ``sum(alpha)`` on gate logits; None picks VGG 2,
            ResNet and others 0.9.
        temperature: gate temperature T in ``G = sigmoid(alpha / T)``.
        lr: Adam learning rate of the scoring phase.
        steps: iterations of the scoring phase.
        tau: filters with ``|score| < tau`` are removed after the scoring phase.
        finetune: fine-tune the surviving scores (KL only) when the KL exceeds ``finetune_kl``.
        finetune_lr, finetune_steps: Adam learning rate and iterations of that phase.
        finetune_kl: KL threshold that triggers fine-tuning.
        stop_delta: stop a phase early when the loss changed by less than this over the last
            ``stop_window`` steps; None disables early stopping.
        stop_window: steps over which the loss change is measured. The paper compares
            consecutive steps (``stop_window=1``), which on small networks stops at once: the
            L1 term there falls by ``lam * lr * filters`` per step, under 0.02 below ~600
            filters. 20 steps keeps the paper's threshold meaningful at every size.
        score_linear: also score hidden Linear neurons (the classifier is never pruned).
        seed: seed of everything random in the extraction; same seed, same chain.
    """

    lam: Optional[float] = None
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
    score_linear: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first field outside its accepted range."""
        def positive(name, allow_none=False, strict=True):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (v <= 0 if strict else v < 0):
                raise ValueError(f"{name} must be a number {'>' if strict else '>='} 0"
                                 f"{' or None' if allow_none else ''}, got {v!r}")
        positive("lam", allow_none=True, strict=False)
        positive("lam_gate", allow_none=True, strict=False)
        positive("temperature")
        positive("lr")
        positive("finetune_lr")
        positive("tau", strict=False)
        positive("finetune_kl", strict=False)
        positive("stop_delta", allow_none=True, strict=False)
        if isinstance(self.stop_window, bool) or not isinstance(self.stop_window, int) or self.stop_window < 1:
            raise ValueError(f"stop_window must be an int >= 1, got {self.stop_window!r}")
        for name in ("steps", "finetune_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("finetune", "score_linear"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def replace(self, **overrides: Any) -> "NeuroChainsConfig":
        """A copy with ``overrides`` applied; unknown names raise ValueError listing the fields."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown NeuroChainsConfig field(s) {unknown}; accepted: {sorted(fields)}")
        return dataclasses.replace(self, **overrides)

    def resolved(self, family: str) -> "NeuroChainsConfig":
        """A copy with ``lam``/``lam_gate`` filled in from the family defaults."""
        lam, lam_gate = FAMILY_DEFAULTS.get(family, FAMILY_DEFAULTS["other"])
        return self.replace(lam=lam if self.lam is None else self.lam,
                            lam_gate=lam_gate if self.lam_gate is None else self.lam_gate)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "NeuroChainsConfig":
        return cls().replace(**data)
