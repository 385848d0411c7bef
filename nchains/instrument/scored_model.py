"""The scored model: frozen weights, a learnable score per filter and a gate per region.

:class:`ScoredModel` is rebuilt from a :class:`~nchains.analysis.ModelGraph` by rewriting a
copy of the traced fx graph: each unit's ``conv -> bn -> act`` chain becomes one call of a
scored-conv module (BatchNorm folded into the conv, :func:`nchains.ops.masked_conv2d` on the
hot path) and every block region's output is blended with its input by
:func:`nchains.ops.gate`. A "layer" region's gate is fused into the unit's
``masked_conv2d`` call. Semantics (DESIGN.md): the score multiplies the filter's output map
after BN and before the nonlinearity; ``G = sigmoid(alpha / T)``, ``out = G f(x) + (1 - G) x``.

Example:
    >>> g = analyze(torchvision.models.resnet50(), torch.randn(1, 3, 64, 64))
    >>> sm = ScoredModel(g)
    >>> logits = sm(x)                          # scores = 1, gates = 0.5
    >>> sm.set_hard({"layer1.0.conv1": mask}, {"layer1.1": 0})   # extracted chain
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import fx, nn

from nchains.instrument.fusion import plan_fusions
from nchains.instrument.rewrite_parts import _FlatParts, _gate_value, _keys, _out_of_place, _own_copy
from nchains.instrument.scored_units import _ScoredConv, _ScoredLinear, fold_bn64
from nchains.instrument.self_check import check_scored
from nchains._util.paths import fetch, missing, set_path
from nchains.graph.analysis import ConvUnit, LinearUnit, ModelGraph

try:
    from nchains import ops as _ops
except ImportError:  # compiled extension not built: same semantics, unfused
    from nchains.ops import _reference as _ops

__all__ = ["ScoredModel", "fold_bn64", "_out_of_place"]


class ScoredModel(nn.Module):
    """A CNN with frozen weights, a score per filter and a sigmoid gate per region.

    Args:
        graph (ModelGraph): result of :func:`nchains.analysis.analyze`.
        score_linear (bool): also score the neurons of hidden Linear layers (never the
            classifier).
        temperature (float): gate temperature ``T`` (> 0).
        fuse (bool): in the soft (scoring) graph, run each residual block's tail (the add of
            the shortcut, the ReLU after it and the block's gate) inside its last unit's
            fused op (:mod:`nchains._fusion`); same values, fewer passes. That unit's module
            then outputs the tail's result. The hard graph is never fused.
        check (bool): self-check once built (:func:`nchains.instrument.self_check.check_scored`):
            with scores 1 and every gate open, every unit's output and the logits must equal
            the original model's on a small random input (one extra forward of each), else a
            ValueError names the first diverging unit. Skip only where this graph was checked.

    Attributes:
        flat_scores (nn.Parameter): all scores, ``Tensor[sum C_out]``, init 1 (use
            :meth:`score` / :meth:`named_scores`).
        flat_gate_logits (nn.Parameter): ``alpha`` per region, ``Tensor[regions]``, init 0
            (use :meth:`gate_logit` / :meth:`named_gate_logits`).
        hard (bool): True after :meth:`set_hard`.

    The wrapped network always runs in eval mode (running BN statistics, no dropout),
    whatever :meth:`train` is called with; only scores and gate logits require grad.
    """

    def __init__(self, graph: ModelGraph, *, score_linear: bool = False, temperature: float = 0.2,
                 fuse: bool = True, check: bool = True):
        super().__init__()
        if not isinstance(graph, ModelGraph):
            raise TypeError(f"graph must be a ModelGraph from nchains.analysis.analyze, "
                            f"got {type(graph).__name__}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        gm = graph.graph_module
        linears = {n: u for n, u in graph.linears.items() if score_linear and not u.is_classifier}
        units: Dict[str, Union[ConvUnit, LinearUnit]] = {**graph.layers, **linears}
        self._score_keys = _keys(units)

        root = nn.Module()
        root.units = nn.ModuleDict()
        root.model = nn.Module()
        sizes, dtype, device = [], None, None
        for name, unit in units.items():
            key = self._score_keys[name]
            layer = gm.get_submodule(unit.first.target)
            if isinstance(unit, ConvUnit):
                bn = gm.get_submodule(unit.bn) if unit.bn else None
                root.units[key] = _ScoredConv(unit, unit.params(gm), bn, self.temperature)
            else:
                root.units[key] = _ScoredLinear(unit, layer)
            sizes.append(int(layer.weight.shape[0]))
            dtype, device = dtype or layer.weight.dtype, device or layer.weight.device
        if dtype is None:
            raise ValueError("graph has no conv filter (or hidden Linear neuron) to score")
        # One flat tensor for all scores and one for all gate logits: one optimizer tensor,
        # one L1 op, one gradient buffer each; each unit reads its slice (split in the graph).
        self._score_sizes = sizes
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        self._unit_index = {name: i for i, name in enumerate(units)}
        self._score_slices = {name: slice(offsets[i], offsets[i + 1]) for i, name in enumerate(units)}
        self._gate_index = {name: i for i, name in enumerate(graph.regions)}
        root.flat_scores = nn.Parameter(torch.ones(offsets[-1], dtype=dtype, device=device))
        root.flat_gate_logits = nn.Parameter(torch.zeros(len(graph.regions), dtype=dtype, device=device))
        self._template = self._rewrite(graph, root, units, fuse=False)
        self._soft_template = self._rewrite(graph, root, units, fuse=True) if fuse else self._template
        root.model.requires_grad_(False).eval()
        self.net = fx.GraphModule(root, copy.deepcopy(self._soft_template), class_name="ScoredNet")
        for attr in ("units", "model", "flat_scores", "flat_gate_logits"):
            setattr(self.net, attr, getattr(root, attr))
        self.net.register_buffer("hard_flat_scores", None)
        self.hard = False
        self.hard_gates: Dict[str, int] = {}
        if check:
            check_scored(self, graph)

    # ---- graph rewriting ------------------------------------------------------------

    def _rewrite(self, graph: ModelGraph, root: nn.Module, units: Dict[str, object], fuse: bool) -> fx.Graph:
        """Soft graph; nodes are tagged in ``meta`` (``nchains_unit``/``_region``/``_gate``)
        so :meth:`set_hard` can derive the hard graph from the unfused one. With ``fuse``, the
        residual tails of :func:`nchains._fusion.plan_fusions` (add, ReLU, block gate) run
        inside their unit's masked_conv2d call."""
        gm = graph.graph_module
        first = {u.first: u for u in units.values()}
        skipped = {n for u in units.values() for n in u.nodes[1:]}
        region_of = {n: r.name for r in graph.regions.values() for n in r.nodes}
        unit_gate, block_gate = {}, {}
        for r in graph.regions.values():
            u = graph.layers[r.units[0]]
            if len(r.units) == 1 and r.input is u.input and r.output is u.last:
                unit_gate[u.name] = r.name  # gate fused into the unit's masked_conv2d
            else:
                block_gate[r.output] = r
        tails = plan_fusions(graph, units, set(unit_gate)) if fuse else {}
        deferred = {u.first: u for u in units.values() if u.name in tails}
        tail_at = {tails[u.name].add: u for u in deferred.values()}
        for t in tails.values():  # a fused tail's block gate runs inside the unit's call
            if t.region is not None:
                block_gate.pop(t.output, None)
        new, env = fx.Graph(), {}
        scores = _FlatParts(new, "flat_scores", (self._score_sizes,))
        logits = _FlatParts(new, "flat_gate_logits", ())

        def tag(n: fx.Node, src: Optional[fx.Node], **extra) -> fx.Node:
            n.meta = {"nchains_region": region_of.get(src), **extra}
            return n

        def score_of(name: str) -> fx.Node:
            return scores[self._unit_index[name]]

        def logit_of(region: str) -> fx.Node:
            return logits[self._gate_index[region]]

        for node in gm.graph.nodes:
            if node in skipped or node in deferred or node in env:
                continue
            if node in tail_at:  # unit + add + act (+ gate) in one call, at the add
                u = tail_at[node]
                t = tails[u.name]
                logit = logit_of(t.region) if t.region is not None else None
                gate_input = env[t.block_input] if t.region is not None else None
                args = (env[u.input], score_of(u.name), logit, env[t.shortcut], gate_input, t.act)
                value = tag(new.call_module(f"units.{self._score_keys[u.name]}", args), u.first,
                            nchains_unit=u.name, nchains_gate=t.region, nchains_of=t.output.name)
                env[node] = env[t.output] = value
                continue
            if node in first:
                u = first[node]
                key = self._score_keys[u.name]
                args = [env[u.input], score_of(u.name)]
                gate = unit_gate.get(u.name)
                if gate is not None:
                    args.append(logit_of(gate))
                value = tag(new.call_module(f"units.{key}", tuple(args)), node,
                            nchains_unit=u.name, nchains_gate=gate, nchains_of=u.last.name)
                node = u.last
            else:
                value = new.node_copy(node, lambda n: env[n])
                if node.op in ("call_module", "get_attr"):
                    if missing(root.model, node.target):
                        value_of = (gm.get_submodule if node.op == "call_module"
                                    else partial(fetch, gm))
                        set_path(root.model, node.target, _own_copy(value_of(node.target)))
                    value.target = f"model.{node.target}"
                _out_of_place(value)
                tag(value, node)
            env[node] = value
            if node in block_gate:
                r = block_gate[node]
                gated = new.call_function(_ops.gate, (value, env[r.input], logit_of(r.name), self.temperature))
                env[node] = tag(gated, None, nchains_gate=r.name, nchains_of=node.name)
        return new

    def _harden(self, removed: set) -> fx.Graph:
        """Hard graph from the soft template: removed regions become the identity (their
        nodes are dropped), kept regions lose their blend, scores come from buffers."""
        new, env = fx.Graph(), {}
        scores = _FlatParts(new, "hard_flat_scores", (self._score_sizes,))
        for node in self._template.nodes:
            unit, gate = node.meta.get("nchains_unit"), node.meta.get("nchains_gate")
            if gate is not None and gate in removed:
                env[node] = env[node.args[0] if unit is not None else node.args[1]]
            elif node.meta.get("nchains_region") in removed and node.op != "get_attr":
                continue  # (constants may be shared; dead ones are eliminated below)
            elif unit is not None:
                env[node] = new.call_module(node.target, (env[node.args[0]], scores[self._unit_index[unit]]))
            elif gate is not None:
                env[node] = env[node.args[0]]
            elif node.meta.get("nchains_param"):
                continue
            else:
                env[node] = new.node_copy(node, lambda n: env[n])
        return new

    # ---- modes ------------------------------------------------------------------------

    def set_hard(self, kept_scores: Optional[Mapping[str, torch.Tensor]] = None,
                 gates: Optional[Mapping[str, Union[int, bool, torch.Tensor]]] = None
                 ) -> "ScoredModel":
        """Switch to the extracted chain.

        Removed regions (gate 0) are the identity and their convs are not run; kept regions
        (gate 1) are not blended; scores are fixed buffers (0 where a filter is removed).

        Args:
            kept_scores (dict layer -> Tensor[C_out]): final scores; layers left out keep
                their current learned scores.
            gates (dict region -> 0 or 1): regions left out are binarised from their
                current gate, kept when ``G >= 0.5``.

        Returns:
            self.
        """
        kept_scores, gates = dict(kept_scores or {}), dict(gates or {})
        for arg, given, known in (("kept_scores", kept_scores, self._score_slices),
                                  ("gates", gates, self._gate_index)):
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise ValueError(f"{arg} has unknown names {unknown[:5]}; expected names among "
                                 f"{list(known)[:5]}...")
        flat = self.net.flat_scores.detach().clone()
        for name, value in kept_scores.items():
            part = flat[self._score_slices[name]]
            value = torch.as_tensor(value).detach()
            if value.shape != part.shape:
                raise ValueError(f"kept_scores[{name!r}] must have shape {tuple(part.shape)}, "
                                 f"got {tuple(value.shape)}")
            part.copy_(value)
        hard_gates = {name: _gate_value(gates[name]) if name in gates
                      else int(self.gate(name).item() >= 0.5) for name in self._gate_index}
        self.net.hard_flat_scores = flat
        self.net.graph = self._harden({n for n, g in hard_gates.items() if g == 0})
        self.net.graph.eliminate_dead_code()  # needs the owning module for purity checks
        self.net.recompile()
        self.hard, self.hard_gates = True, hard_gates
        return self

    def soft(self) -> "ScoredModel":
        """Back to learnable scores and blended gates. Returns self."""
        self.net.graph = copy.deepcopy(self._soft_template)
        self.hard, self.hard_gates = False, {}
        return self

    def train(self, mode: bool = True) -> "ScoredModel":
        super().train(mode)
        self.net.model.eval()
        return self

    # ---- parameters -------------------------------------------------------------------

    @property
    def flat_scores(self) -> nn.Parameter:
        """All learnable scores in one ``Tensor[sum C_out]``, layers in graph order (init 1);
        :meth:`score` and :meth:`score_slice` give a layer's part."""
        return self.net.flat_scores

    @property
    def flat_gate_logits(self) -> nn.Parameter:
        """All gate logits ``alpha`` in one ``Tensor[regions]``, in graph order (init 0)."""
        return self.net.flat_gate_logits

    def score_slice(self, name: str) -> slice:
        """Where layer ``name``'s scores sit in :attr:`flat_scores` (and in its ``.grad``)."""
        if name not in self._score_slices:
            raise ValueError(f"name must be a scored layer, got {name!r}")
        return self._score_slices[name]

    def score(self, name: str) -> torch.Tensor:
        """Learnable scores ``Tensor[C_out]`` of layer ``name`` (a module path): a view of
        :attr:`flat_scores` (write to it under ``torch.no_grad()``)."""
        return self.net.flat_scores[self.score_slice(name)]

    def unit(self, name: str) -> nn.Module:
        """The scored-conv (or scored-linear) module of layer ``name``, e.g. for hooks; its
        output is the unit's output (after the activation, and the fused layer gate if any;
        in the soft graph of a ``fuse=True`` model, a residual tail's result where one is
        fused into the unit)."""
        self.score_slice(name)
        return self.net.units[self._score_keys[name]]

    def hard_score(self, name: str) -> torch.Tensor:
        """Fixed scores of layer ``name`` used in hard mode: a view of the flat buffer
        ``net.hard_flat_scores`` that the hard network reads."""
        if not self.hard:
            raise ValueError("hard_score needs hard mode; call set_hard first")
        return self.net.hard_flat_scores[self.score_slice(name)]

    def gate_logit(self, name: str) -> torch.Tensor:
        """0-d gate logit ``alpha`` of region ``name``: a view of :attr:`flat_gate_logits`."""
        if name not in self._gate_index:
            raise ValueError(f"name must be a gated region, got {name!r}")
        return self.net.flat_gate_logits[self._gate_index[name]]

    def gate(self, name: str) -> torch.Tensor:
        """Gate value ``G = sigmoid(alpha / T)`` of region ``name`` (differentiable)."""
        return torch.sigmoid(self.gate_logit(name) / self.temperature)

    def named_scores(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """``(layer name, Tensor[C_out])`` in graph order (views of :attr:`flat_scores`)."""
        for name, sl in self._score_slices.items():
            yield name, self.net.flat_scores[sl]

    def named_gate_logits(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """``(region name, 0-d alpha)`` in graph order (views of :attr:`flat_gate_logits`)."""
        for name, i in self._gate_index.items():
            yield name, self.net.flat_gate_logits[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the scored (or hard) network for ``x (Tensor[N, C, H, W])``."""
        return self.net(x)
