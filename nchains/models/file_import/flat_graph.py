"""Pass 1 of the rebuild: an ``ExportedProgram`` (lifted graph) as one flat fx graph of
standard leaf modules and torch functions, each node remembering its chain of module calls."""

from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from nchains.models.file_import.aten_ops import _IDENTITY, _SUPPORTED, _TUPLE_OPS, _VIEW_OPS, _WEIGHTED, _bind, _first_arg, _opname
from nchains.models.file_import.convert_torchscript import _TS_META
from nchains.models.file_import.layers import _act_module, _Layers, _pool_module
from nchains.models.file_import.torch_functions import _TorchFunctions


class _Lifted:
    """A parameter, buffer or constant of the program (a placeholder of the lifted graph)."""

    def __init__(self, fqn: str, tensor: torch.Tensor):
        self.fqn, self.tensor = fqn, tensor


class _FirstOf:
    """The new node computing element 0 of a tuple-returning op (BN, pool with indices)."""

    def __init__(self, node: fx.Node):
        self.node = node


class _Flattener(_Layers, _TorchFunctions):
    """ExportedProgram (lifted graph) -> flat fx graph of standard leaf modules and torch
    functions (``self.g``); ``self.chain`` holds the module calls around every node."""

    def __init__(self, ep, source: str, from_torchscript: bool, root_type: str,
                 strip: str = "", types: Optional[Dict[str, str]] = None):
        self.ep, self.source, self.ts, self.strip = ep, source, from_torchscript, strip
        self.types = types or {}  # module path -> qualified type name (TorchScript)
        self.root_type = root_type
        self.g = fx.Graph()
        self.chain: Dict[fx.Node, Tuple[str, ...]] = {}
        self.calls: Dict[str, Tuple[str, str]] = {}  # call key -> (path, type name)
        self.leaves: Dict[str, nn.Module] = {}  # module path -> leaf module
        self.leaf_ids: Dict[str, tuple] = {}  # module path -> identity of what it computes
        self.attrs: Dict[str, torch.Tensor] = {}
        self.user_outputs: List[Any] = []
        self.hoisted: Dict[fx.Node, str] = {}  # node -> leaf call key it is moved out of
        self.synthetic: Dict[str, str] = {}  # weight fqn -> path of its functionally called layer

    # -- helpers --
    def _path(self, p: str) -> str:
        return p[len(self.strip):] if self.strip and p.startswith(self.strip) else p

    def _stack(self, node: fx.Node) -> List[Tuple[str, str, str]]:
        if self.ts:
            entries = (node.meta.get("custom") or {}).get(_TS_META, [])
        else:
            entries = [(k, v[0], v[1] if isinstance(v[1], str)
                        else f"{v[1].__module__}.{v[1].__qualname__}")
                       for k, v in (node.meta.get("nn_module_stack") or {}).items()]
        out = []
        for key, path, typ in entries:
            path = self._path(path)
            if path:
                out.append((key, path, self.types.get(path, typ)))
        return out

    def _where(self, node: fx.Node) -> str:
        stack = self._stack(node)
        return stack[-1][1] if stack else "(root)"

    def _unsupported(self, node: fx.Node, what: str) -> ValueError:
        return ValueError(f"--model {self.source!r}: unsupported operation {what} at module "
                          f"{self._where(node)!r}; {_SUPPORTED}")

    # -- pass 1: flat graph --
    def flatten(self) -> None:
        ep = self.ep
        sig = ep.graph_signature
        placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
        env: Dict[fx.Node, Any] = {}
        for spec, ph in zip(sig.input_specs, placeholders):
            kind = spec.kind.name
            if kind == "USER_INPUT":
                if spec.arg.__class__.__name__ == "ConstantArgument":
                    env[ph] = spec.arg.value
                else:
                    env[ph] = self.g.placeholder(ph.name)
                    self.chain[env[ph]] = ()
            elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                target = spec.target
                tensor = (ep.state_dict[target] if target in ep.state_dict
                          else ep.constants[target])
                env[ph] = _Lifted(self._path(target), tensor)
            else:
                raise ValueError(f"--model {self.source!r}: program input {spec.arg} of kind "
                                 f"{kind} is not supported (custom objects, tokens)")
        out = next(n for n in ep.graph.nodes if n.op == "output")
        live, todo = set(), [out]
        while todo:  # dead code (unused shape checks, BN statistics) is not converted
            n = todo.pop()
            if n not in live:
                live.add(n)
                todo.extend(n.all_input_nodes)
        nodes = [n for n in ep.graph.nodes if n.op == "call_function" and n in live]

        leaf_of = self._leaf_calls(nodes)
        for n in nodes:
            self._convert(n, env, leaf_of)

        results = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
        for spec, value in zip(sig.output_specs, results):
            kind = spec.kind.name
            if kind == "USER_OUTPUT":
                self.user_outputs.append(self._arg(env, value))
            elif kind == "USER_INPUT_MUTATION":
                continue  # the rebuilt model leaves its input alone; outputs are unchanged
            else:
                raise ValueError(f"--model {self.source!r}: the program writes {spec.target!r} "
                                 f"({kind}); BatchNorm was probably exported in training mode - "
                                 "call model.eval() before torch.export / torch.jit")
        flat_out = [o for o in self.user_outputs if isinstance(o, fx.Node)]
        self.g.output(tuple(flat_out))
        for n in reversed(list(self.g.nodes)):  # dead code: unused BN statistics and the like
            if n.op not in ("placeholder", "output") and not n.users:
                self.g.erase_node(n)

    def _leaf_calls(self, nodes: Sequence[fx.Node]) -> Dict[fx.Node, Tuple[str, str]]:
        """Main op node -> (call key, path) for every call of one standard layer."""
        direct: Dict[str, List[fx.Node]] = {}
        parents = set()
        for n in nodes:
            stack = self._stack(n)
            for key, path, typ in stack:
                self.calls.setdefault(key, (path, typ))
            parents.update(k for k, _, _ in stack[:-1])
            if stack:
                direct.setdefault(stack[-1][0], []).append(n)
        out = {}
        for key, members in direct.items():
            # view/size ops that only feed the layer's op (re-created aliases after
            # functionalisation) belong to the caller
            feeding = {n for n in members if (_opname(n) in _VIEW_OPS or _opname(n) == "sym_size"
                                              or _opname(n) in _IDENTITY)
                       and all(u in members for u in n.users)}
            mains = [n for n in members if n.target is not operator.getitem and n not in feeding]
            if key in parents or len(mains) != 1:
                continue
            m = mains[0]
            name = _opname(m)
            if name is None or not all(g.args[0] is m for g in members
                                       if g is not m and g not in feeding):
                continue
            if (name in _WEIGHTED or _act_module(name, _bind(m)) is not None
                    or _pool_module(name, _bind(m)) is not None):
                out[m] = (key, self.calls[key][0])
                for n in feeding:
                    self.hoisted[n] = key
        return out

    def _arg(self, env, a):
        def one(x):
            if not isinstance(x, fx.Node):
                return x
            v = env[x]
            if isinstance(v, _Lifted):
                if v.fqn not in self.attrs:
                    self.attrs[v.fqn] = v.tensor
                node = self.g.get_attr(v.fqn)
                self.chain[node] = None  # floating: placed where it is used
                return node
            if isinstance(v, _FirstOf):
                raise ValueError(f"--model {self.source!r}: the tuple result of {x.target} is "
                                 "used as a whole; not supported")
            return v
        return fx.node.map_aggregate(a, one)

    def _tensor(self, env, a) -> Optional[torch.Tensor]:
        v = env.get(a) if isinstance(a, fx.Node) else None
        return v.tensor if isinstance(v, _Lifted) else None

    def _convert(self, n: fx.Node, env, leaf_of) -> None:
        name = _opname(n)
        stack = self._stack(n)
        keys = tuple(k for k, _, _ in stack)
        if n in self.hoisted:
            keys = keys[:keys.index(self.hoisted[n])]
        if n.target is operator.getitem and isinstance(env.get(n.args[0]), _FirstOf):
            if n.args[1] == 0:
                env[n] = env[n.args[0]].node
            elif n.users:
                raise self._unsupported(n, f"output {n.args[1]} of {n.args[0].target}")
            return
        if name is not None and (name.startswith("_assert") or name.startswith("sym_constrain")):
            return
        if name in _IDENTITY:
            env[n] = env[n.args[0]]
            return
        if name == "dim" and isinstance(n.args[0].meta.get("val"), torch.Tensor):
            env[n] = n.args[0].meta["val"].dim()  # ranks are static in a program
            return
        if name is None:  # python operator on sizes
            new = self.g.call_function(n.target, self._arg(env, n.args), self._arg(env, n.kwargs))
            self.chain[new] = keys
            env[n] = new
            return
        b = _bind(n)
        self._keys = keys
        if n in leaf_of or name in _WEIGHTED:
            module = self._layer(n, name, b, env)
            if module is not None:
                key, path = leaf_of.get(n, (None, None))
                if key is not None:
                    keys = keys[:keys.index(key)]
                else:
                    path = self._synthetic_path(n, name, b, env)
                self._register_leaf(n, path, module, b, env)
                new = self.g.call_module(path, (self._arg(env, b[_first_arg(n)]),))
                self.chain[new] = keys
                env[n] = _FirstOf(new) if name in _TUPLE_OPS else new
                return
            if name in _WEIGHTED:
                raise self._unsupported(n, f"{n.target} with computed or missing weights/"
                                           "running statistics")
        target, args, kwargs = self._function(n, name, b, env)
        if target is None:  # identity (eval-mode dropout)
            env[n] = args
            return
        if isinstance(target, str):
            new = self.g.call_method(target, args, kwargs)
        else:
            new = self.g.call_function(target, args, kwargs)
        self.chain[new] = keys
        env[n] = _FirstOf(new) if name in _TUPLE_OPS else new
