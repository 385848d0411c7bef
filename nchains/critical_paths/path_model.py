"""The path model: the network with every neuron off the path held at a constant.

:func:`build_path_model` rewrites the traced graph (:func:`nchains.instrument.taps.tap`, so sites
are per call and in-place ops are out-of-place) and puts a :class:`SiteGate` after each gated
activation site: ``out = where(mask, a, constant)``. With ``constants="original"`` the constant
is the site's own activation at the image, detached: the paper's locally linear approximation
Φ(x; e) (Sec. 3.1): no gradient flows through a neuron off the path, the neurons off the path
keep their original values whatever the input, and at the image the model returns exactly the
original logits. ``constants="zero"`` is the multiplicative mask ``m ⊙ a`` of the paper's public
code. A floating-point mask ``m`` in [0, 1] blends instead, ``m·a + (1 − m)·constant``, for the
relaxed gates of pruning baselines (DGR).

Masks and constants are buffers: :meth:`PathModel.set_masks` / :meth:`PathModel.set_constants`
overwrite them between steps without rebuilding anything, and ``return_sites=True`` also returns
each gated site's output (what the rest of the network sees), for re-ranking (greedy pruning).

Example:
    >>> graph = nchains.analyze(model, image)
    >>> masks = {s.key: torch.ones(s.shape[1:], dtype=torch.bool) for s in sites(graph)}
    >>> phi = build_path_model(graph, masks, image=image)      # constants="original"
    >>> torch.equal(phi(image), model(image))
    True
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import fx, nn

from nchains._util.device import model_device_dtype
from nchains._util.tensors import check_finite
from nchains.graph.analysis import ModelGraph
from nchains.instrument.taps import Site, sites, tap

__all__ = ["PathModel", "SiteGate", "build_path_model", "check_site_tensor", "site_activations"]

CONSTANTS = ("original", "zero")


class SiteGate(nn.Module):
    """``where(mask, a, constant)`` (bool mask) or ``mask·a + (1 − mask)·constant`` (float mask).

    Buffers:
        mask (BoolTensor or float Tensor[*site shape]): True / 1 = on the path; broadcast over the batch.
        constant (Tensor[*site shape]): the value of a neuron off the path.
    """

    def __init__(self, mask: torch.Tensor, constant: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)
        self.register_buffer("constant", constant)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.mask.dtype == torch.bool:
            return torch.where(self.mask, a, self.constant)
        return self.mask * a + (1 - self.mask) * self.constant


def _activation_sites(graph: ModelGraph, keys) -> List[Site]:
    """The activation sites named by ``keys`` (a subset, any order), in execution order."""
    all_sites = sites(graph, "activations")
    known = {s.key for s in all_sites}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"masks: unknown site {unknown[0]!r}; accepted: the activation sites of the model "
                         f"({', '.join(list(known)[:4])}{', …' if len(known) > 4 else ''})")
    wanted = set(keys)
    return [s for s in all_sites if s.key in wanted]


def site_activations(graph: ModelGraph, chosen: Sequence[Site], image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Each site's activation at one image, detached: dict key -> Tensor[*site shape] (no batch)."""
    with torch.no_grad():
        _, values = tap(graph, chosen)(image)
    return {k: v[0].detach().clone() for k, v in values.items()}


def _check_mask(key: str, mask, site: Site, device, dtype) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"masks[{key!r}] must be a BoolTensor (or float Tensor in [0, 1]), got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(site.shape[1:]):
        raise ValueError(f"masks[{key!r}] must have the site's neuron shape {list(site.shape[1:])}, got "
                         f"{list(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask.detach().to(device).clone()
    if not mask.is_floating_point():
        raise TypeError(f"masks[{key!r}] must be bool or floating point, got {mask.dtype}")
    check_finite(mask.reshape(1, -1), f"masks[{key!r}]", "mask")
    if bool((mask < 0).any() | (mask > 1).any()):
        raise ValueError(f"masks[{key!r}]: a float mask must lie in [0, 1], got values in "
                         f"[{float(mask.min()):.4g}, {float(mask.max()):.4g}]")
    return mask.to(device, dtype)


def check_site_tensor(name: str, value, site: Site) -> torch.Tensor:
    """``value`` detached when it is a finite floating-point Tensor of ``site``'s neuron shape
    (no batch); TypeError/ValueError naming ``name`` (e.g. ``constants['relu']``) otherwise."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point Tensor of the neuron shape, got "
                        f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
    if tuple(value.shape) != tuple(site.shape[1:]):
        raise ValueError(f"{name} must have the site's neuron shape {list(site.shape[1:])}, got {list(value.shape)}")
    check_finite(value.reshape(1, -1), name, "site")
    return value.detach()


def _check_constant(key: str, value, site: Site, device, dtype) -> torch.Tensor:
    return check_site_tensor(f"constants[{key!r}]", value, site).to(device, dtype).clone()


class PathModel(nn.Module):
    """The traced model with a :class:`SiteGate` after each gated activation site.

    Built by :func:`build_path_model`. ``forward(x)`` maps Tensor[N, *input_shape] to the logits
    Tensor[N, K], or with ``return_sites`` to ``(logits, {site key: Tensor[N, *site shape]})``,
    the gated outputs (``torch.autograd.grad`` of a logit w.r.t. one is the gradient at the site).

    Attributes:
        keys (tuple[str, ...]): the gated sites, in execution order.
        sites (tuple[Site, ...]): the same, as :class:`~nchains.instrument.taps.Site`.
        net (fx.GraphModule): the rewritten graph (shares the model's weights).
    """

    def __init__(self, net: fx.GraphModule, gated: Sequence[Site], gate_names: Sequence[str]):
        super().__init__()
        self.net = net
        self.sites = tuple(gated)
        self.keys = tuple(s.key for s in gated)
        self._gate_names = dict(zip(self.keys, gate_names))

    def forward(self, x: torch.Tensor):
        return self.net(x)

    def gate(self, key: str) -> SiteGate:
        """The gate of site ``key``."""
        if key not in self._gate_names:
            raise ValueError(f"key: {key!r} is not a gated site of this path model")
        return self.net.get_submodule(self._gate_names[key])

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """Site key -> the gate's mask buffer (the tensor itself: writes go into the model)."""
        return {k: self.gate(k).mask for k in self.keys}

    @property
    def constants(self) -> Dict[str, torch.Tensor]:
        """Site key -> the gate's constant buffer."""
        return {k: self.gate(k).constant for k in self.keys}

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replaces the masks of the sites ``masks`` names (checked: shape, bool or float in [0, 1])."""
        self._set(masks, "masks", "mask", _check_mask)

    def set_constants(self, constants: Mapping[str, torch.Tensor]) -> None:
        """Replaces the constants of the sites ``constants`` names (checked: shape, finite)."""
        self._set(constants, "constants", "constant", _check_constant)

    def _set(self, values, name: str, buffer: str, check) -> None:
        by_key = {s.key: s for s in self.sites}
        for key, value in _mapping(values, name).items():
            if key not in by_key:
                raise ValueError(f"{name}: {key!r} is not a gated site of this path model")
            gate = self.gate(key)
            setattr(gate, buffer, check(key, value, by_key[key], gate.constant.device, gate.constant.dtype))


def _mapping(value, name: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping site key -> Tensor, got {type(value).__name__}")
    return value


def _constants_for(gated: Sequence[Site], constants, graph: ModelGraph, image, device, dtype
                   ) -> Dict[str, torch.Tensor]:
    if isinstance(constants, str):
        if constants not in CONSTANTS:
            raise ValueError(f"constants must be 'original', 'zero' or a mapping site key -> Tensor, got {constants!r}")
        if constants == "zero":
            return {s.key: torch.zeros(s.shape[1:], device=device, dtype=dtype) for s in gated}
        if image is None:
            raise ValueError("constants='original' needs the image (image=Tensor[1, C, H, W])")
        return site_activations(graph, gated, image)
    values = _mapping(constants, "constants")
    missing = [s.key for s in gated if s.key not in values]
    if missing:
        raise ValueError(f"constants: no value for site {missing[0]!r}")
    return {s.key: _check_constant(s.key, values[s.key], s, device, dtype) for s in gated}


def build_path_model(graph: ModelGraph, masks: Mapping[str, torch.Tensor],
                     constants: Union[str, Mapping[str, torch.Tensor]] = "original", *,
                     image: Optional[torch.Tensor] = None, return_sites: bool = False) -> PathModel:
    """The model with the neurons off the path held at constants (see the module docstring).

    Args:
        graph (ModelGraph): ``nchains.analyze(model, image)``.
        masks (mapping str -> Tensor[*site shape]): per activation site key (any subset of
            ``sites(graph, "activations")``; sites not named are left as they are): BoolTensor,
            True = on the path, or a float mask in [0, 1].
        constants (str or mapping): ``"original"`` (the activations at ``image``), ``"zero"``,
            or a Tensor[*site shape] per gated site.
        image (Tensor[1, *input_shape]): needed for ``constants="original"``; on the model's
            device, in its dtype (the caller checks it).
        return_sites (bool): also return the gated site outputs.

    Returns:
        PathModel, in eval mode, sharing the model's weights (its buffers are its own copies).

    Raises:
        TypeError, ValueError: an unknown site, a mask or constant of the wrong shape or type.
    """
    if not isinstance(graph, ModelGraph):
        raise TypeError(f"graph must be a ModelGraph from nchains.analyze, got {type(graph).__name__}")
    masks = _mapping(masks, "masks")
    if not masks:
        raise ValueError("masks must name at least one activation site")
    device, dtype = model_device_dtype(graph.graph_module)
    gated = _activation_sites(graph, list(masks))
    checked = {s.key: _check_mask(s.key, masks[s.key], s, device, dtype) for s in gated}
    values = _constants_for(gated, constants, graph, image, device, dtype)
    net = tap(graph, gated)  # a fresh copy returning (output, {key: site node}); rewritten below
    out_node = next(n for n in net.graph.nodes if n.op == "output")
    output, site_nodes = out_node.args[0]
    names, gated_nodes = [], {}
    for i, s in enumerate(gated):
        name = f"nchains_path_gate_{i}"
        net.add_submodule(name, SiteGate(checked[s.key], values[s.key]))
        node = site_nodes[s.key]
        with net.graph.inserting_after(node):
            gate_node = net.graph.call_module(name, (node,))
        node.replace_all_uses_with(gate_node, delete_user_cb=lambda user, g=gate_node: user is not g)
        names.append(name)
        gated_nodes[s.key] = gate_node
    output = out_node.args[0][0]  # the output may itself have been a site (redirected to its gate)
    out_node.args = ((output, {k: gated_nodes[k] for k in gated_nodes}) if return_sites else output,)
    net.graph.lint()
    net.recompile()
    return PathModel(net, gated, names).eval()
