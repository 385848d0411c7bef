"""Small real models for tests: trained in seconds on scikit-learn's digits (offline data)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class DigitsNet(nn.Module):
    """A tiny ResNet on 1x8x8 digits: stem, two residual stages, linear classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2, downsample=down), BasicBlock(32, 32))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@functools.lru_cache(maxsize=1)
def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


@functools.lru_cache(maxsize=1)
def trained_digits_net() -> DigitsNet:
    """DigitsNet trained for a few seconds (about 97% accuracy on held-out digits)."""
    torch.manual_seed(0)
    x, y = digits_data()
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    train_x, train_y = x[:1500], y[:1500]
    g = torch.Generator().manual_seed(0)
    for epoch in range(8):
        perm = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(perm), 100):
            idx = perm[i:i + 100]
            opt.zero_grad()
            nn.functional.cross_entropy(net(train_x[idx]), train_y[idx]).backward()
            opt.step()
    return net.eval()


def digits_region(classes=(3, 8), per_class=10):
    """Held-out images of two classes: one local region of data space."""
    x, y = digits_data()
    hx, hy = x[1500:], y[1500:]
    idx = torch.cat([torch.nonzero(hy == c).flatten()[:per_class] for c in classes])
    return hx[idx], hy[idx]


def random_digits_net(seed: int = 0) -> DigitsNet:
    """DigitsNet with seeded random weights and BatchNorm statistics, untrained: every model has
    chains, and building one costs nothing (for tests of the extraction machinery)."""
    torch.manual_seed(seed)
    return uniform_bn(DigitsNet().eval(), var_max=2.0)


def uniform_bn(model: nn.Module, var_max: float, bias: bool = False) -> nn.Module:
    """Draws every BatchNorm2d's running mean U(-0.2, 0.2), running variance U(0.5, var_max),
    weight U(0.5, 1.5) and, with ``bias``, bias U(-0.2, 0.2) from torch's global generator."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, var_max)
                m.weight.uniform_(0.5, 1.5)
                if bias:
                    m.bias.uniform_(-0.2, 0.2)
    return model
