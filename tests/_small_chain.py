"""A small, valid, realistic chain for tests of the chain format and its validation."""

from __future__ import annotations

import functools

import torch
from torch import nn

import nchains

from _models import DigitsNet, digits_region


@functools.lru_cache(maxsize=1)
def small_digits_chain():
    """(net, images, chain): the chain of a seeded DigitsNet with random convs and BatchNorm
    statistics and only its classifier fitted, on 12 digits (3 and 8), in 25 steps: one block
    kept and two removed, layers partly pruned, two classes, about 40 s under a heavy load (no
    trained network needed)."""
    torch.manual_seed(0)
    net = DigitsNet()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    net.eval()
    images, labels = digits_region((3, 8), per_class=6)
    with torch.no_grad():  # fit only the classifier (a linear probe): the net then tells 3 from 8
        feats = torch.flatten(net.avgpool(net.layer2(net.layer1(net.relu(net.bn1(net.conv1(images)))))), 1)
    opt = torch.optim.Adam(net.fc.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net.fc(feats), labels).backward()
        opt.step()
    chain = nchains.extract(net.eval(), images, steps=25, finetune_steps=5, lr=0.04, lam=0.02, lam_gate=0.0,
                            progress=False)
    return net, images, chain