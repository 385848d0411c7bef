"""NeuroChains hyper-parameters, with the paper's defaults (NeuroChains, section 4.1)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional

# (lambda, lambda_gate) per model family, as in the paper; "other" follows ResNet.
FAMILY_DEFAULTS = {"vgg": (0.007, 2.0), "resnet": (0.0065, 0.9), "other": (0.0065, 0.9)}

#: Upper bound of ``steps``, ``finetune_steps`` and ``stop_window``: a million Adam steps is
#: days of work on any real model, so a larger number is a typo, not a request.
MAX_STEPS = 10**6
#: ``seed`` must lie in ``[0, MAX_SEED)``: ``torch.manual_seed`` takes 64-bit seeds; negative
#: ones are refused so that a seed has one spelling in a chain file.
MAX_SEED = 2**63

# (field, bound, None accepted): "ge0" means finite >= 0, "gt0" finite > 0.
_REALS = (("lam", "ge0", True), ("lam_gate", "ge0", True), ("temperature", "gt0", False),
          ("lr", "gt0", False), ("tau", "ge0", False), ("finetune_lr", "gt0", False),
          ("finetune_kl", "ge0", False), ("stop_delta", "ge0", True))
# (field, lowest, highest allowed value)
_INTS = (("steps", 0, MAX_STEPS), ("finetune_steps", 0, MAX_STEPS), ("stop_window", 1, MAX_STEPS),
         ("seed", 0, MAX_SEED - 1))


def _check_real(name: str, value: Any, bound: str, allow_none: bool) -> Optional[float]:
    """``value`` as a float when it is a finite real number within ``bound``; raises otherwise."""
    rule = f"a number {'>' if bound == 'gt0' else '>='} 0 (finite){' or None' if allow_none else ''}"
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {rule}, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be {rule}, got {v!r} (NaN and infinity are not accepted)")
    if v < 0 or (bound == "gt0" and v == 0):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return v


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int when it is an integer in ``[low, high]``; raises otherwise."""
    rule = f"an int >= {low} and <= {high}" if high != MAX_SEED - 1 else f"an int in [{low}, 2**63)"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {rule}, got {value!r} ({type(value).__name__})")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return int(value)


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
        """Checks every field's type, finiteness and range.

        Accepted: ``lam``, ``lam_gate``, ``tau``, ``finetune_kl``, ``stop_delta`` finite
        numbers >= 0 (``lam``, ``lam_gate``, ``stop_delta`` also None); ``temperature``,
        ``lr``, ``finetune_lr`` finite numbers > 0; ``steps``, ``finetune_steps`` ints in
        ``[0, MAX_STEPS]``; ``stop_window`` an int in ``[1, MAX_STEPS]``; ``seed`` an int in
        ``[0, 2**63)`` (what ``torch.manual_seed`` takes); ``finetune``, ``score_linear`` bools.
        Numbers are normalised to Python ``float``/``int`` (NumPy scalars become JSON-safe).

        Raises:
            TypeError: a field of the wrong type (names the field and the value).
            ValueError: a number that is NaN, infinite or outside its range.
        """
        for name, minimum, allow_none in _REALS:
            setattr(self, name, _check_real(name, getattr(self, name), minimum, allow_none))
        for name, low, high in _INTS:
            setattr(self, name, _check_int(name, getattr(self, name), low, high))
        for name in ("finetune", "score_linear"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

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
        """The config of :meth:`to_dict`'s output (missing fields take their defaults); raises
        TypeError/ValueError naming the first unknown, mistyped or out-of-range field."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict of NeuroChainsConfig fields, got {type(data).__name__}")
        return cls().replace(**data)
