"""Pass 2 of the rebuild: the flat graph nested into sub-modules along the original module
calls (a sub-``GraphModule`` per block, an ``nn.Sequential`` where one still is a chain)."""

from __future__ import annotations

import operator
import re
import sys
from typing import Dict, List, Tuple

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from nchains._util.paths import set_path
from nchains.models.file_import.flat_graph import _Flattener


def _short_type(type_name: str) -> str:
    name = re.sub(r"\W", "_", str(type_name).rsplit(".", 1)[-1])
    return name if name and not name[0].isdigit() else f"M{name}"


def _qualified(type_name: str) -> str:
    """``__torch__.m.___torch_mangle_3.Cls`` (TorchScript) -> ``m.Cls``."""
    atoms = str(type_name).split(".")
    return ".".join(a for a in atoms if a != "__torch__" and not a.startswith("___torch_mangle"))


def _is_sequential(type_name: str) -> bool:
    """Was the call an ``nn.Sequential`` (or a subclass such as torchvision's
    ``Conv2dNormActivation``)? Classes are only looked up among modules already imported."""
    name = _qualified(type_name)
    if name.rsplit(".", 1)[-1] == "Sequential":
        return True
    module, _, cls = name.rpartition(".")
    obj = getattr(sys.modules.get(module), cls, None) if module else None
    return isinstance(obj, type) and issubclass(obj, nn.Sequential)


class _Restart(Exception):
    pass


class _Rebuilder(_Flattener):
    """ExportedProgram (lifted graph) -> flat fx graph of standard leaf modules and torch
    functions -> nested modules following the original module calls."""

    # -- pass 2: nesting --
    def build(self) -> nn.Module:
        self.dissolved: set = set()
        for _ in range(len(self.calls) + 1):
            self.built: Dict[str, nn.Module] = {}
            try:
                nodes = [n for n in self.g.nodes if n.op not in ("output",)]
                outputs = [o for o in self.user_outputs if isinstance(o, fx.Node)]
                return self._build(None, 0, nodes, [], outputs)
            except _Restart:
                continue
        raise ValueError(f"--model {self.source!r}: could not rebuild the module hierarchy")

    def _eff(self, n: fx.Node) -> Tuple[str, ...]:
        return tuple(k for k in self.chain.get(n) or () if k not in self.dissolved)

    @staticmethod
    def _rel(target: str, path: str) -> str:
        if not path:
            return target
        if target.startswith(path + "."):
            return target[len(path) + 1:]
        return "_shared_" + target.replace(".", "_")

    def _build(self, key, depth, nodes, inputs, outputs) -> nn.Module:
        path, typ = self.calls[key] if key is not None else ("", self.root_type)
        g = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        mods: Dict[str, nn.Module] = {}
        attrs: Dict[str, torch.Tensor] = {}
        if key is None:
            for n in nodes:
                if n.op == "placeholder":
                    env[n] = g.placeholder(n.name)
        else:
            for i, a in enumerate(inputs):
                env[a] = g.placeholder("x" if len(inputs) == 1 else f"x{i}")

        def lookup(a: fx.Node) -> fx.Node:
            if a not in env:
                if a.op != "get_attr":
                    raise AssertionError(f"{a.name} used before it is computed at {path!r}")
                target = self._rel(a.target, path)
                attrs[target] = self.attrs[a.target]
                env[a] = g.get_attr(target)
            return env[a]

        done = set()
        members_of: Dict[str, List[fx.Node]] = {}
        for n in nodes:
            eff = self._eff(n)
            if n.op not in ("get_attr", "placeholder") and len(eff) > depth:
                members_of.setdefault(eff[depth], []).append(n)
        for n in nodes:
            if n.op in ("get_attr", "placeholder"):
                continue
            eff = self._eff(n)
            if len(eff) > depth:
                child = eff[depth]
                if child in done:
                    continue
                done.add(child)
                members = members_of[child]
                mset = set(members)
                c_in = list(dict.fromkeys(a for m in members for a in m.all_input_nodes
                                          if a not in mset and a.op != "get_attr"))
                c_out = [m for m in members if any(u not in mset for u in m.users)]
                if not c_out or any(a not in env for a in c_in):
                    self.dissolved.add(child)
                    raise _Restart()
                module = self._build(child, depth + 1, members, c_in, c_out)
                target = self._rel(self.calls[child][0], path)
                mods[target] = module
                call = g.call_module(target, tuple(env[a] for a in c_in))
                if len(c_out) == 1:
                    env[c_out[0]] = call
                else:
                    for j, o in enumerate(c_out):
                        env[o] = g.call_function(operator.getitem, (call, j))
                continue
            target = n.target
            if n.op == "call_module":
                target = self._rel(n.target, path)
                mods[target] = self.leaves[n.target]
            env[n] = g.create_node(n.op, target, fx.node.map_arg(n.args, lookup),
                                   fx.node.map_arg(n.kwargs, lookup), name=n.name)
        if key is None:
            result = [lookup(o) if isinstance(o, fx.Node) else o for o in self.user_outputs]
            g.output(pytree.tree_unflatten(result, self.out_spec))
        else:
            g.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
        module = self._assemble(g, mods, attrs, typ)
        return self._dedup(path, module) if key is not None else module

    def _assemble(self, g: fx.Graph, mods, attrs, typ: str) -> nn.Module:
        nodes = [n for n in g.nodes]
        chain = nodes[1:-1]
        if (_is_sequential(typ) and len(nodes) >= 3 and nodes[0].op == "placeholder"
                and not attrs and all(c.op == "call_module" and "." not in c.target
                                      and c.args == (prev,) and len(prev.users) == 1
                                      for prev, c in zip(nodes[:-2], chain))
                and nodes[-1].args[0] is chain[-1]):
            seq = nn.Sequential()
            for c in chain:
                seq.add_module(c.target, mods[c.target])
            return seq
        holder = nn.Module()
        for target, value in [*mods.items(), *attrs.items()]:
            set_path(holder, target, value)
        g.lint()
        return fx.GraphModule(holder, g, class_name=_short_type(typ))

    def _dedup(self, path: str, module: nn.Module) -> nn.Module:
        """One module object per path: a second call of the same block must compute the same
        graph over the same submodules."""
        old = self.built.get(path)
        if old is None:
            self.built[path] = module
            return module

        def ident(m):
            code = _structure(m.graph) if isinstance(m, fx.GraphModule) else type(m).__name__
            return (code, [(k, id(v)) for k, v in m.named_children()],
                    [(k, id(v)) for k, v in m.named_parameters(recurse=False)],
                    [(k, id(v)) for k, v in m.named_buffers(recurse=False)])
        if ident(old) != ident(module):
            raise ValueError(f"--model {self.source!r}: module {path!r} is called several times "
                             "with different computations; not supported")
        return old


def _structure(graph: fx.Graph) -> list:
    """The graph up to node names."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    return [(n.op, n.target, fx.node.map_arg((n.args, n.kwargs), lambda a: ("%", index[a])))
            for n in graph.nodes]
