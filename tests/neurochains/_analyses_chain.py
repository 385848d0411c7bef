"""A small chain for the analyses' tests, built in well under a second: a seeded random DigitsNet
(tests/_models.py), an extraction of zero steps (every filter kept, a valid Chain with hashes,
labels and regions), then a seeded random half of each layer's filters kept with random scores
in [0.5, 1.5] and the block ``layer1.1`` removed. Its classifier is fitted as a linear probe on
the random features (a second), so the net tells digits apart and the chain agrees with it on
some images and not on others. The analyses never look at how a chain was found, only at what it
keeps, so a random chain exercises them as well as a learned one."""

from __future__ import annotations

import dataclasses
import functools

import torch

import nchains

from _models import digits_data, digits_region, random_digits_net

REMOVED_BLOCK = "layer1.1"


@functools.lru_cache(maxsize=None)
def analyses_chain(seed: int = 0):
    """(net, images Tensor[12, 1, 8, 8], labels Tensor[12], chain); callers must not modify them."""
    net = _probed(random_digits_net(seed))
    images, labels = digits_region((3, 8), per_class=6)
    full = nchains.extract(net, images, steps=0, finetune_steps=0, progress=False)
    g = torch.Generator().manual_seed(seed)
    kept, scores = {}, {}
    for layer, size in full.layer_sizes.items():
        idx = sorted(torch.randperm(size, generator=g)[: (3 * size) // 4].tolist())
        kept[layer] = idx
        scores[layer] = (0.5 + torch.rand(len(idx), generator=g, dtype=torch.float64)).tolist()
    gates = {region: int(region != REMOVED_BLOCK) for region in full.gates}
    metrics = dict(full.metrics, filters_kept=sum(map(len, kept.values())), regions_kept=sum(gates.values()))
    chain = dataclasses.replace(full, kept=kept, scores=scores, gates=gates, metrics=metrics, strongest_filters={})
    chain.validate()
    return net, images, labels, chain


def _probed(net):
    """``net`` with its classifier fitted on the features of the first 1500 digits."""
    x, y = digits_data()
    with torch.no_grad():
        feats = torch.flatten(net.avgpool(net.layer2(net.layer1(net.relu(net.bn1(net.conv1(x[:1500])))))), 1)
    opt = torch.optim.Adam(net.fc.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net.fc(feats), y[:1500]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return net.eval()


def held_out_digits(n: int = 200) -> torch.Tensor:
    """Digits the chain's images are not among (the first training digits), ``Tensor[n, 1, 8, 8]``."""
    x, _ = digits_data()
    return x[:n]
