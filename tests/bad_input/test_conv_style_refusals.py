"""Convs whose forward the analysis cannot make exact are refused up front, in one line that
names the module and why (API level: :func:`nchains.analyze`, so extract/apply/compact/export
refuse them too). Named ``test_conv_style_refusals.py``: ``tests/graph/test_conv_styles.py``
holds the supported styles (one basename per test module under pytest's default import mode)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nchains


class _ActInside(nn.Conv2d):
    def forward(self, x):  # a ReLU inside the conv: not a conv unit's form
        return F.relu(super().forward(x))


class _ReflectPad(nn.Conv2d):
    def forward(self, x):  # reflection padding is not zeros: folding it would be wrong
        return F.conv2d(F.pad(x, [1, 1, 1, 1], mode="reflect"), self.weight, self.bias)


class _OnePad(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(F.pad(x, [1, 1, 1, 1], value=1.0), self.weight, self.bias)


class _Crop(nn.Conv2d):
    def forward(self, x):  # negative padding crops
        return F.conv2d(F.pad(x, [-1, -1, 0, 0]), self.weight, self.bias, padding=1)


class _DynamicWeight(nn.Conv2d):
    def forward(self, x):  # weight from the input: no constant weight exists
        return F.conv2d(x, self.weight * x.mean(), self.bias, padding=1)


class _TwoConvs(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(super().forward(x), self.weight[:, :4], None, padding=1)


class _Scaled(nn.Conv2d):
    def forward(self, x):  # input scaled before the conv
        return super().forward(x * 2)


class _Transposed(nn.Conv2d):
    def forward(self, x):
        return F.conv_transpose2d(x, self.weight.transpose(0, 1), None, padding=1)


class _OwnBN(nn.BatchNorm2d):
    def forward(self, x):  # a BatchNorm subclass with its own forward is traced through
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps) * 2


class _OwnLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight * 0.5, self.bias)


def _net(conv=None, bn=None, linear=None):
    conv = conv or nn.Conv2d
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         conv(4, 4, 3, padding=1 if conv is nn.Conv2d else 0),
                         (bn or nn.BatchNorm2d)(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         (linear or nn.Linear)(4, 3)).eval()


CASES = [
    ("relu after the conv", dict(conv=_ActInside), r"module '2' \(_ActInside\): its forward computes aten\.relu"),
    ("reflect padding", dict(conv=_ReflectPad), r"module '2' \(_ReflectPad\): its forward computes aten\.reflection_pad2d"),
    ("pad value 1", dict(conv=_OnePad), r"module '2' \(_OnePad\): its forward pads with value 1\.0"),
    ("negative pad", dict(conv=_Crop), r"module '2' \(_Crop\): its forward pads with value 0(\.0)? and sizes \[-1, -1"),
    ("weight from input", dict(conv=_DynamicWeight), r"module '2' \(_DynamicWeight\): its forward computes the conv weight or bias from its input"),
    ("two convs", dict(conv=_TwoConvs), r"module '2' \(_TwoConvs\): its forward runs 2 convolutions"),
    ("input scaled", dict(conv=_Scaled), r"module '2' \(_Scaled\): its forward computes aten\.mul\.Tensor on its input before the conv"),
    ("transposed", dict(conv=_Transposed), r"module '2' \(_Transposed\): its forward runs a transposed"),
    ("BatchNorm2d subclass", dict(bn=_OwnBN), r"at module '3': .* by _OwnBN, a BatchNorm2d subclass with its own forward"),
    ("Linear subclass", dict(linear=_OwnLinear), r"at module '7': .* by _OwnLinear, a Linear subclass with its own forward"),
]


@pytest.mark.parametrize("case, kw, pattern", CASES, ids=[c[0] for c in CASES])
def test_unsupported_conv_forward_is_refused_in_one_line_naming_the_module(case, kw, pattern):
    net = _net(**kw)
    with pytest.raises(ValueError, match=pattern) as info:
        nchains.analyze(net, torch.randn(1, 3, 8, 8))
    assert "\n" not in str(info.value), str(info.value)


def test_refused_before_any_extraction_work():
    """extract refuses at its analysis, before optimising anything."""
    with pytest.raises(ValueError, match=r"module '2' \(_ActInside\)"):
        nchains.extract(_net(conv=_ActInside), torch.randn(4, 3, 8, 8), steps=1)


def test_plain_conv_with_reflect_padding_mode_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                        nn.Linear(4 * 64, 2)).eval()
    with pytest.raises(ValueError, match=r"Conv2d '0': padding_mode='reflect'"):
        nchains.analyze(net, torch.randn(1, 3, 8, 8))
