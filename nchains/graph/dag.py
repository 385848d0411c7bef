"""The unit DAG of an analysed CNN: which conv and linear units feed which.

Rule: unit ``A`` is a *producer* of unit ``B`` (and ``B`` a *consumer* of ``A``) when a path
of the traced graph leads from ``A``'s output (its last node, after BN and activation) to
``B``'s input without passing through another unit. Every tensor op between units is walked
through: activations, elementwise arithmetic, standalone BatchNorm, pools (including spatial
means), flatten/reshape, residual adds (each operand is adjacent to every consumer of the
sum, so a block's last conv and its shortcut -- a downsample conv or the block's input --
feed the next block's convs) and channel concats (every branch feeds every consumer of the
concat). Shape queries (``x.size(0)``) are not data paths. The model input is adjacent to the
units it reaches the same way (:attr:`UnitDAG.inputs`); units whose output reaches the model
output are :attr:`UnitDAG.outputs`.

SSA steps between producer and consumer units of this DAG (pooling is skipped: it is walked
through); critical paths walk it from the logits down.

Example:
    >>> g = analyze(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> g.dag.consumers("layer1.0.conv2")
    ('layer1.1.conv1', 'layer2.0.conv1', 'layer2.0.downsample.0')
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Tuple

from torch import fx

from nchains.graph.classify import is_tensor

Node = fx.Node

__all__ = ["UnitDAG", "build_dag", "walk_up"]

#: Node kinds that only read sizes or hold constants: no unit's channels flow through them.
_NOT_DATA = ("shape", "constant")


class UnitDAG:
    """Producers and consumers of every unit (conv and linear units, by name), in topological
    order; built once per :class:`~nchains.graph.analysis.ModelGraph` (``graph.dag``).

    Attributes:
        order (tuple[str]): every unit, topologically sorted (graph order: producers first).
        inputs (tuple[str]): units the model input reaches without passing another unit.
        outputs (tuple[str]): units whose output reaches the model output without passing
            another unit (the classifier, typically).
    """

    def __init__(self, order: Tuple[str, ...], producers: Mapping[str, Tuple[str, ...]],
                 inputs: Tuple[str, ...], outputs: Tuple[str, ...]):
        self.order = order
        self.inputs = inputs
        self.outputs = outputs
        self._producers = dict(producers)
        rank = {n: i for i, n in enumerate(order)}
        consumers: Dict[str, List[str]] = {n: [] for n in order}
        for name in order:
            for p in self._producers[name]:
                consumers[p].append(name)
        self._consumers = {n: tuple(sorted(c, key=rank.__getitem__)) for n, c in consumers.items()}

    def __repr__(self) -> str:
        return f"UnitDAG(units={len(self.order)}, edges={len(self.edges())}, inputs={list(self.inputs)})"

    def __contains__(self, name: object) -> bool:
        return name in self._producers

    def _check(self, name: str) -> None:
        if name not in self._producers:
            raise ValueError(f"name must be a unit of the model (a conv or linear unit), got {name!r}")

    def producers(self, name: str) -> Tuple[str, ...]:
        """Units whose output reaches unit ``name``'s input directly (see the module's rule),
        in topological order; empty for a unit fed by the model input only."""
        self._check(name)
        return self._producers[name]

    def consumers(self, name: str) -> Tuple[str, ...]:
        """Units that unit ``name``'s output reaches directly, in topological order."""
        self._check(name)
        return self._consumers[name]

    def edges(self) -> List[Tuple[str, str]]:
        """Every ``(producer, consumer)`` pair, consumers in topological order."""
        return [(p, name) for name in self.order for p in self._producers[name]]


def walk_up(start: Iterable[Node], unit_of_last: Mapping[Node, str], passes: Callable[[Node], bool]
            ) -> Tuple[List[str], bool]:
    """Units first met walking up from ``start`` through the tensor inputs of nodes that
    ``passes``, and whether the model input was reached."""
    found, seen, stack, from_input = [], set(), list(start), False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in unit_of_last:
            found.append(unit_of_last[n])
        elif n.op == "placeholder":
            from_input = True
        elif passes(n):
            stack.extend(a for a in n.all_input_nodes if is_tensor(a))
    return found, from_input


def build_dag(gm: fx.GraphModule, units: Mapping[str, object], kinds: Mapping[Node, str]) -> UnitDAG:
    """The :class:`UnitDAG` of ``units`` (name -> ConvUnit or LinearUnit, each with ``input``,
    ``first`` and ``last`` nodes) in the traced graph ``gm``; ``kinds`` is every node's
    category (:func:`~nchains.graph.classify.classify`)."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    order = tuple(sorted(units, key=lambda name: position[units[name].first]))
    rank = {n: i for i, n in enumerate(order)}
    unit_of_last = {units[name].last: name for name in order}

    def passes(n: Node) -> bool:
        return kinds.get(n) not in _NOT_DATA

    producers, inputs = {}, []
    for name in order:
        found, from_input = walk_up([units[name].input], unit_of_last, passes)
        producers[name] = tuple(sorted(set(found), key=rank.__getitem__))
        if from_input:
            inputs.append(name)
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    found, _ = walk_up([a for a in out.all_input_nodes if is_tensor(a)], unit_of_last, passes)
    outputs = tuple(sorted(set(found), key=rank.__getitem__))
    return UnitDAG(order, producers, tuple(inputs), outputs)
