"""aten ops that become standard layer modules (``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.Linear``, activations, pooling), holding the program's own tensors."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import fx, nn

from nchains.models.file_import.aten_ops import _pair


def _act_module(name: str, b: Dict[str, Any]) -> Optional[nn.Module]:
    if name == "relu":
        return nn.ReLU()
    if name == "relu6" or (name == "hardtanh" and (b["min_val"], b["max_val"]) == (0, 6)):
        return nn.ReLU6()
    if name == "hardtanh":
        return nn.Hardtanh(b["min_val"], b["max_val"])
    if name == "elu" and b["scale"] == 1 and b["input_scale"] == 1:
        return nn.ELU(b["alpha"])
    simple = {"silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hardswish": nn.Hardswish,
              "hardsigmoid": nn.Hardsigmoid, "mish": nn.Mish, "selu": nn.SELU}
    if name in simple:
        return simple[name]()
    if name == "gelu":
        return nn.GELU(approximate=b["approximate"])
    if name == "leaky_relu":
        return nn.LeakyReLU(b["negative_slope"])
    if name == "celu":
        return nn.CELU(b["alpha"])
    if name == "softplus":
        return nn.Softplus(b["beta"], b["threshold"])
    return None


def _pool_module(name: str, b: Dict[str, Any]) -> Optional[nn.Module]:
    if name in ("max_pool2d", "max_pool2d_with_indices"):
        return nn.MaxPool2d(_pair(b["kernel_size"]), _pair(b["stride"]) if b["stride"] else None,
                            _pair(b["padding"]), _pair(b["dilation"]), ceil_mode=b["ceil_mode"])
    if name == "avg_pool2d":
        return nn.AvgPool2d(_pair(b["kernel_size"]), _pair(b["stride"]) if b["stride"] else None,
                            _pair(b["padding"]), b["ceil_mode"], b["count_include_pad"],
                            b["divisor_override"])
    if name in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d"):
        return nn.AdaptiveAvgPool2d(_pair(b["output_size"]))
    if name == "adaptive_max_pool2d":
        return nn.AdaptiveMaxPool2d(_pair(b["output_size"]))
    if name in ("dropout", "feature_dropout"):
        return (nn.Dropout2d if name == "feature_dropout" else nn.Dropout)(b["p"])
    if name == "flatten":
        return nn.Flatten(b["start_dim"], b["end_dim"])
    return None


def _param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def _buffer(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if isinstance(t, nn.Parameter) else t


class _Layers:
    """Layer modules of :class:`~nchains._model_import.flat_graph._Flattener` (a mixin: uses
    its ``source``, ``calls``, ``attrs``, ``leaves``, ``leaf_ids``, ``synthetic``,
    ``_tensor``, ``_where`` and ``_unsupported``)."""

    def _layer(self, n, name, b, env) -> Optional[nn.Module]:
        t = lambda a: self._tensor(env, a)  # noqa: E731
        if name in ("conv2d", "convolution", "_convolution"):
            w = t(b["weight"])
            if w is None or w.dim() != 4 or (b["bias"] is not None and t(b["bias"]) is None):
                return None
            if name != "conv2d" and (b["transposed"] or any(_pair(b["output_padding"]))):
                raise self._unsupported(n, "transposed convolution")
            groups = b["groups"]
            padding = b["padding"] if isinstance(b["padding"], str) else _pair(b["padding"])
            m = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]),
                          stride=_pair(b["stride"]), padding=padding,
                          dilation=_pair(b["dilation"]), groups=groups,
                          bias=b["bias"] is not None, device="meta")
            m.weight = _param(w)
            if b["bias"] is not None:
                m.bias = _param(t(b["bias"]))
            return m
        if name in ("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"):
            if b.get("training", False):
                raise ValueError(f"--model {self.source!r}: BatchNorm at module "
                                 f"{self._where(n)!r} runs in training mode (batch statistics); "
                                 "call model.eval() before torch.export / torch.jit")
            rm, rv, w, bias = (t(b[k]) for k in ("running_mean", "running_var", "weight", "bias"))
            if (rm is None or rv is None or (b["weight"] is not None and w is None)
                    or (b["bias"] is not None and bias is None)):
                return None
            val = b["input"].meta.get("val")
            rank = val.dim() if isinstance(val, torch.Tensor) else 4
            cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 5: nn.BatchNorm3d}.get(rank,
                                                                               nn.BatchNorm2d)
            m = cls(rm.numel(), eps=b["eps"], momentum=b["momentum"],
                    affine=w is not None or bias is not None, device="meta")
            if m.affine:
                m.weight = _param(w if w is not None else torch.ones_like(rm))
                m.bias = _param(bias if bias is not None else torch.zeros_like(rm))
            m.running_mean, m.running_var = _buffer(rm), _buffer(rv)
            m.num_batches_tracked = torch.tensor(0, dtype=torch.long)
            return m
        if name == "linear":
            w = t(b["weight"])
            if w is None or w.dim() != 2 or (b["bias"] is not None and t(b["bias"]) is None):
                return None
            m = nn.Linear(w.shape[1], w.shape[0], bias=b["bias"] is not None, device="meta")
            m.weight = _param(w)
            if b["bias"] is not None:
                m.bias = _param(t(b["bias"]))
            return m
        act = _act_module(name, b)
        return act if act is not None else _pool_module(name, b)

    def _synthetic_path(self, n, name, b, env) -> str:
        """Path of a layer without a module call of its own: its weight's owner when that path
        is free (``layer1.0.conv1.weight`` -> ``layer1.0.conv1``), else next to the weight
        (``block.weight`` -> ``block.weight_conv2d``)."""
        fqn = env[b["weight"] if b.get("weight") is not None else b["running_mean"]].fqn
        if fqn not in self.synthetic:
            owner = fqn.rpartition(".")[0]
            taken = {p for p, _ in self.calls.values()} | set(self.attrs) | set(self.leaves)
            free = owner and owner not in taken and not any(
                p.startswith(owner + ".") or owner.startswith(p + ".") for p in taken)
            self.synthetic[fqn] = owner if free else f"{fqn}_{name}"
        return self.synthetic[fqn]

    def _register_leaf(self, n, path, module, b, env) -> None:
        tensors = [self._tensor(env, v) for v in b.values() if isinstance(v, fx.Node)]
        ident = (repr(module), tuple(id(t) for t in tensors if t is not None))
        if path in self.leaves:
            if self.leaf_ids[path] != ident:
                raise ValueError(f"--model {self.source!r}: module {path!r} computes different "
                                 "layers in different calls; not supported")
            return
        if path in self.attrs or any(path.startswith(p + ".") for p in self.leaves):
            raise ValueError(f"--model {self.source!r}: module path {path!r} is ambiguous")
        self.leaves[path] = module
        self.leaf_ids[path] = ident
