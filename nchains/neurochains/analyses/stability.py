"""Stability (NeuroChains Fig. 3 and 14): does the chain keep the original model's class on
unseen images near its own?

Distances are Euclidean in the original model's penultimate-layer space: the input of its
classifier (the Linear that produces the logits; for the shipped ResNet, the 128 average-pooled
features that ``fc`` reads). For each chain image, the held-out images are ranked by distance to
it; for each K, the test fidelity is the fraction of the held-out images among the K nearest
neighbours of any chain image (duplicates removed, as in the paper) on which the chain predicts
the original model's class. The mean over chain images of the fidelity on their own K nearest
is reported too. The paper's x-axis counts ``20 * K`` neighbours for its 20 images
(K = 1..13 per image); here ``ks`` are per-image counts (default 20, 40, ..., 260).

Held-out pool: the shipped Fashion-MNIST test sample (1000 images) minus the chain's images for
the shipped model, or the whole Fashion-MNIST test split (``pool="test"``, 10000 images, where
Debian's ``dataset-fashion-mnist`` is installed), or any tensor.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from nchains._util.tensors import check_images
from nchains.neurochains.analyses._common import (DEFAULT_BATCH, Context, build_context, check_number_list,
                                                  json_float, logits_of, to_model)

__all__ = ["DEFAULT_KS", "held_out_pool", "penultimate", "plot_stability", "stability"]

DEFAULT_KS = tuple(range(20, 261, 20))
POOLS = ("sample", "test")


def penultimate(graph, model, x: torch.Tensor, batch_size: int = DEFAULT_BATCH
                ) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """``(features Tensor[N, D], logits Tensor[N, classes], name)``: the input of ``model``'s
    classifier Linear on ``x`` (the penultimate-layer space), and the logits of the same pass.

    Raises:
        ValueError: when the model has no Linear producing its logits.
    """
    if graph.classifier is None:
        raise ValueError("stability needs a model whose logits come from a Linear classifier (its input is the "
                         "penultimate-layer space); this model has none")
    unit = graph.linears[graph.classifier]
    module = graph.graph_module.get_submodule(unit.first.target)
    feats = []
    handle = module.register_forward_pre_hook(lambda mod, args: feats.append(args[0].detach().flatten(1)))
    try:
        logits = logits_of(model, x, batch_size)
    finally:
        handle.remove()
    return torch.cat(feats), logits, graph.classifier


def held_out_pool(pool, chain) -> Tuple[torch.Tensor, str]:
    """``(images Tensor[P, C, H, W], description)`` of ``pool``: ``None`` or ``"sample"`` (the
    shipped test sample; the shipped model only), ``"test"`` (the Fashion-MNIST test split) or
    a tensor of preprocessed images."""
    from nchains.models import zoo
    from nchains.neurochains.chain import Chain

    if not isinstance(chain, Chain):
        raise TypeError(f"chain must be an nchains.Chain, got {type(chain).__name__}")
    if isinstance(pool, torch.Tensor):
        return check_images(pool, chain.input_shape, "pool"), f"{len(pool)} given images"
    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool must be None, {' or '.join(map(repr, POOLS))} or a Tensor[P, C, H, W]; got {pool!r}")
    if chain.model_hash != zoo.default_model_hash():
        raise ValueError("stability needs a held-out pool of images (pool=Tensor[P, C, H, W]; `nchains analyze "
                         "--pool DIR`) for a model other than the shipped one")
    if pool == "test":
        images, _ = zoo.load_fashion_mnist("test")
        return zoo.normalize_fashion(images).unsqueeze(1), "the Fashion-MNIST test split"
    images, _, _ = zoo.fashion_sample()
    return zoo.normalize_fashion(images).unsqueeze(1), "the shipped Fashion-MNIST test sample"


def _without(pool: torch.Tensor, images: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``pool`` without the rows equal to one of ``images``, and how many were dropped."""
    flat, own = pool.flatten(1), images.flatten(1)
    same = torch.zeros(len(pool), dtype=torch.bool, device=pool.device)
    for row in own:  # one image at a time: P x D booleans, not P x N x D
        same |= (flat == row).all(1)
    return pool[~same], int(same.sum())


def stability(chain, model=None, images: Optional[torch.Tensor] = None, *, pool=None,
              ks: Sequence[int] = DEFAULT_KS, masked=None, graph=None, batch_size: int = DEFAULT_BATCH,
              progress: bool = False) -> Dict[str, Any]:
    """The chain's test fidelity on the K nearest held-out images of its images.

    Args:
        chain (Chain): the chain (or a :class:`~._common.Context` of it).
        model (nn.Module): its original model.
        images (Tensor[N, *chain.input_shape]): the chain's images.
        pool: held-out images (see :func:`held_out_pool`); rows equal to a chain image are dropped.
        ks (sequence of int): neighbours per chain image, each in [1, pool size].
        masked, graph, batch_size: as for :func:`~.faithfulness.faithfulness`.
        progress (bool): unused (a few batched forwards).

    Returns:
        dict: ``ks``; ``fidelity`` (per K, on the union of the chain images' K nearest),
        ``fidelity_mean`` (per K, mean over chain images of the fidelity on their own K nearest),
        ``neighbours`` (per K, size of the union), ``pool``, ``pool_size``, ``excluded`` (pool
        images equal to a chain image), ``pool_agreement`` (fidelity on the whole pool),
        ``feature`` (the classifier whose input is the space).
    """
    ks = check_number_list("ks", ks, integer=True, low=1, high=10**7)
    raw, what = held_out_pool(pool, chain.chain if isinstance(chain, Context) else chain)  # before any forward
    ctx = build_context(chain, model, images, masked=masked, graph=graph, batch_size=batch_size)
    held, excluded = _without(to_model(ctx.model, raw), ctx.images)
    if max(ks) > len(held):
        raise ValueError(f"ks must be <= the held-out pool's size {len(held)} ({what} minus {excluded} chain "
                         f"images), got {max(ks)}")
    own, _, feature = penultimate(ctx.graph, ctx.model, ctx.images, ctx.batch_size)
    feats, p_logits, _ = penultimate(ctx.graph, ctx.model, held, ctx.batch_size)
    agree = p_logits.argmax(1) == logits_of(ctx.masked, held, ctx.batch_size).argmax(1)
    order = torch.cdist(own.double(), feats.double()).argsort(dim=1, stable=True)
    fidelity, mean, count = [], [], []
    for k in ks:
        nearest = order[:, :k]
        union = torch.unique(nearest)
        fidelity.append(json_float(agree[union].double().mean()))
        mean.append(json_float(agree[nearest].double().mean(1).mean()))
        count.append(int(len(union)))
    return {"ks": ks, "fidelity": fidelity, "fidelity_mean": mean, "neighbours": count, "pool": what,
            "pool_size": int(len(held)), "excluded": excluded, "pool_agreement": json_float(agree.double().mean()),
            "feature": f"input of {feature}"}


def plot_stability(result: Dict[str, Any]):
    """Test fidelity against the number of nearest neighbours (Fig. 3 / 14).

    Returns:
        matplotlib.figure.Figure.
    """
    from nchains.neurochains.analyses.plots import new_figure

    fig, ax = new_figure(1)
    ks = result["ks"]
    width = 0.8 * (min(b - a for a, b in zip(ks, ks[1:])) if len(ks) > 1 else 1)
    fid = [v if v is not None else 0.0 for v in result["fidelity"]]
    ax.bar(ks, fid, width=width, color="tab:blue", alpha=0.8, label="union of the K nearest")
    ax.plot(ks, result["fidelity_mean"], "o-", color="tab:orange", ms=3, label="mean over chain images")
    ax.axhline(result["pool_agreement"] or 0.0, color="0.4", ls=":", lw=1, label="whole held-out pool")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("K nearest neighbours per chain image (penultimate-layer space)")
    ax.set_ylabel("test fidelity (original's class kept)")
    ax.set_title(f"Stability: test fidelity on {result['pool_size']} held-out images", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    return fig
