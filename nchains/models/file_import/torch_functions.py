"""aten ops that become torch-level functions (``operator.add``, ``torch.cat``,
``torch.flatten``, ``F.max_pool2d``, ...) in the rebuilt graph."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from nchains.models.file_import.aten_ops import _opname, _pair
from nchains.models.file_import.layers import _act_module


class _TorchFunctions:
    """Torch-level functions of :class:`~nchains._model_import.flat_graph._Flattener` (a mixin:
    uses its ``source``, ``g``, ``chain``, ``_keys``, ``_arg``, ``_where`` and
    ``_unsupported``)."""

    def _function(self, n, name, b, env):
        """(target, args, kwargs) of the torch-level equivalent; target None = identity."""
        a = lambda v: self._arg(env, v)  # noqa: E731
        x = a(b.get("self", b.get("input")))
        act = _act_module(name, b)
        if act is not None:
            return _activation(act, b, x)
        if name in ("dropout", "feature_dropout"):
            return None, x, None
        if name in ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
                    "_adaptive_avg_pool2d", "adaptive_max_pool2d"):
            return _pool(name, b, x, a)
        if name in ("add", "sub", "rsub"):
            other, alpha = a(b["other"]), b.get("alpha", 1)
            if name == "rsub":
                return torch.rsub, (x, other), ({} if alpha == 1 else {"alpha": alpha})
            if alpha == 1:
                return (operator.add if name == "add" else operator.sub), (x, other), {}
            return (torch.add if name == "add" else torch.sub), (x, other), {"alpha": alpha}
        if name in ("mul", "div"):
            other = a(b["other"])
            if b.get("rounding_mode") is not None:
                return torch.div, (x, other), {"rounding_mode": b["rounding_mode"]}
            return (operator.mul if name == "mul" else operator.truediv), (x, other), {}
        if name == "neg":
            return operator.neg, (x,), {}
        if name == "cat":
            return torch.cat, (a(b["tensors"]), b["dim"]), {}
        if name in ("mean", "sum"):
            fn = torch.mean if name == "mean" else torch.sum
            kwargs = {"dtype": b["dtype"]} if b.get("dtype") is not None else {}
            if "dim" not in b:
                return fn, (x,), kwargs
            return fn, (x, a(b["dim"]), b["keepdim"]), kwargs
        if name == "flatten":
            return torch.flatten, (x, b["start_dim"], b["end_dim"]), {}
        if name in ("view", "reshape", "_unsafe_view"):
            return self._reshape(b, x, a)
        if name == "squeeze":
            dim = b.get("dim")
            return torch.squeeze, ((x,) if dim is None else (x, a(dim))), {}
        if name == "unsqueeze":
            return torch.unsqueeze, (x, b["dim"]), {}
        if name == "transpose":
            return torch.transpose, (x, b["dim0"], b["dim1"]), {}
        if name == "permute":
            return torch.permute, (x, tuple(b["dims"])), {}
        if name == "contiguous":
            return "contiguous", (x,), {}
        if name in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
            fn = torch.log_softmax if "log" in name else torch.softmax
            return fn, (x, b["dim"]), {}
        if name == "constant_pad_nd":
            return F.pad, (x, a(b["pad"]), "constant", b["value"]), {}
        if name == "clamp":
            return torch.clamp, (x, b["min"], b["max"]), {}
        if name in ("upsample_nearest2d", "upsample_bilinear2d"):
            kwargs = {"size": a(b["output_size"]), "scale_factor": b["scale_factors"],
                      "mode": "nearest" if "nearest" in name else "bilinear"}
            if "align_corners" in b:
                kwargs["align_corners"] = b["align_corners"]
            return F.interpolate, (x,), kwargs
        if name == "sym_size":
            return "size", (x, b["dim"]), {}
        if "batch_norm" in name:
            raise ValueError(f"--model {self.source!r}: BatchNorm at module {self._where(n)!r} "
                             f"runs in training mode ({n.target}); call model.eval() before "
                             "torch.export / torch.jit")
        raise self._unsupported(n, str(n.target))

    def _reshape(self, b, x, a):
        """A target shape whose first dimension is the batch stays batch-agnostic:
        ``torch.flatten(x, 1)`` or ``x.reshape(x.size(0), ...)`` instead of baked sizes."""
        size = list(b["size"] if "size" in b else b["shape"])
        val = b["self"].meta.get("val")
        shape = list(val.shape) if isinstance(val, torch.Tensor) else []
        first = size[0] if size else None
        if isinstance(first, fx.Node):
            batch_dim = _opname(first) == "sym_size" and first.args[1] == 0
        else:
            batch_dim = (len(shape) >= 2 and isinstance(first, int) and isinstance(shape[0], int)
                         and first == shape[0] and not any(isinstance(d, fx.Node) for d in size))
        if batch_dim:
            rest = (math.prod(shape[1:]) if shape and all(isinstance(d, int) for d in shape[1:])
                    else None)
            if len(size) == 2 and size[1] in (rest, -1) and size[1] is not None:
                return torch.flatten, (x, 1), {}
            batch = self.g.call_method("size", (x, 0))
            self.chain[batch] = self._keys
            return "reshape", (x, batch, *a(size[1:])), {}
        return "reshape", (x, *a(size)), {}


def _activation(act: nn.Module, b, x):
    """(function, args, kwargs) of an activation module's functional form."""
    fn = {nn.ReLU: torch.relu, nn.ReLU6: F.relu6, nn.SiLU: F.silu,
          nn.Sigmoid: torch.sigmoid, nn.Tanh: torch.tanh, nn.Hardswish: F.hardswish,
          nn.Hardsigmoid: F.hardsigmoid, nn.Mish: F.mish, nn.SELU: F.selu}.get(type(act))
    if fn is not None:
        return fn, (x,), {}
    params = {nn.GELU: {"approximate": b.get("approximate")},
              nn.LeakyReLU: {"negative_slope": b.get("negative_slope")},
              nn.Hardtanh: {"min_val": b.get("min_val"), "max_val": b.get("max_val")},
              nn.ELU: {"alpha": b.get("alpha")}, nn.CELU: {"alpha": b.get("alpha")},
              nn.Softplus: {"beta": b.get("beta"), "threshold": b.get("threshold")}}
    fn = {nn.GELU: F.gelu, nn.LeakyReLU: F.leaky_relu, nn.Hardtanh: F.hardtanh,
          nn.ELU: F.elu, nn.CELU: F.celu, nn.Softplus: F.softplus}[type(act)]
    return fn, (x,), params[type(act)]


def _pool(name: str, b, x, a):
    """(function, args, kwargs) of a 2-d (adaptive) max or average pooling op."""
    if name in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"):
        fn = F.adaptive_max_pool2d if name == "adaptive_max_pool2d" else F.adaptive_avg_pool2d
        return fn, (x, a(b["output_size"])), {}
    stride = _pair(b["stride"]) if b["stride"] else None
    if name == "avg_pool2d":
        return F.avg_pool2d, (x, _pair(b["kernel_size"]), stride, _pair(b["padding"]),
                              b["ceil_mode"], b["count_include_pad"],
                              b["divisor_override"]), {}
    return F.max_pool2d, (x, _pair(b["kernel_size"]), stride, _pair(b["padding"]),
                          _pair(b["dilation"]), b["ceil_mode"]), {}
