"""Small ResNet-like test models whose convs are Conv2d subclasses with their own ``forward``:
the conv styles of PyTorch ports of TensorFlow models (static or "same" padding in forward)
and weight standardisation. Each net: a stem conv + BN + ReLU, a residual block (two convs,
BN, add, ReLU), a stride-2 block with a 1x1 downsample, global pooling and a classifier."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from _models import uniform_bn


class StaticPadConv(nn.Conv2d):
    """Pads ``(0, 1, 0, 1)`` with an ``nn.ZeroPad2d`` (TF's "same" for stride 2 on even
    sizes, written statically), then convolves with no padding of its own."""

    def __init__(self, cin, cout, k, stride=1, bias=False):
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=bias)
        total = k - 1 if stride == 1 else k - 2
        self.pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(self, x):
        return super().forward(self.pad(x))


class SamePadConv(nn.Conv2d):
    """TensorFlow "same" padding computed from the input size in forward (as EfficientNet
    ports do): asymmetric, more at the bottom/right, for stride 2 on even sizes."""

    def __init__(self, cin, cout, k, stride=1, bias=False):
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=bias)

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Weight standardisation (as in BiT / timm's StdConv2d): the weight is centred and scaled
    per filter in forward; the padding is the module's own."""

    def __init__(self, cin, cout, k, stride=1, bias=False):
        super().__init__(cin, cout, k, stride=stride, padding=k // 2, bias=bias)

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class _Block(nn.Module):
    def __init__(self, conv, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


class StyleNet(nn.Module):
    """A small ResNet whose 3x3 convs are ``conv`` (a Conv2d subclass); input 3x12x12."""

    def __init__(self, conv, width=8, classes=5):
        super().__init__()
        self.conv1, self.bn1, self.relu = conv(3, width, 3, bias=True), nn.BatchNorm2d(width), nn.ReLU()
        self.layer1 = _Block(conv, width, width, 1)
        self.layer2 = _Block(conv, width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def style_net(conv, seed: int = 0, dtype=torch.float32) -> StyleNet:
    """A StyleNet with seeded weights and non-trivial BN statistics, in eval mode."""
    torch.manual_seed(seed)
    net = uniform_bn(StyleNet(conv), var_max=1.5, bias=True)
    return net.to(dtype).eval()


STYLES = {"static_pad": StaticPadConv, "same_pad": SamePadConv, "weight_std": StdConv}
