"""SMOE scale against a direct numpy computation, gamma normalisation by hand, and the maps of a
chain's first layer against its activations computed from the model's own modules."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nchains.report.smoe import EPS, gamma_norm, smoe_maps, smoe_scale
from nchains.report.unit_outputs import computed_layers

from _analyses_chain import analyses_chain

pytestmark = pytest.mark.usefixtures("one_thread")


def _numpy_smoe(a: np.ndarray) -> np.ndarray:
    x = np.maximum(a, 0) + 1e-7
    m = x.mean(axis=1)
    geo = np.exp(np.log(x).mean(axis=1))
    return m * np.log2(m / geo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smoe_scale_matches_numpy(dtype):
    g = torch.Generator().manual_seed(3)
    a = torch.relu(torch.randn(3, 7, 5, 6, generator=g, dtype=torch.float64)).to(dtype)  # many exact zeros
    got = smoe_scale(a)
    assert got.shape == (3, 5, 6) and got.dtype == dtype
    want = _numpy_smoe(a.double().numpy())
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)
    assert EPS == 1e-7


def test_smoe_scale_properties():
    flat = torch.full((1, 4, 2, 2), 0.7, dtype=torch.float64)
    assert torch.allclose(smoe_scale(flat), torch.zeros(1, 2, 2, dtype=torch.float64), atol=1e-12)  # AM == GM
    one_hot = torch.zeros(1, 4, 1, 1, dtype=torch.float64)
    one_hot[0, 2] = 8.0  # mean 2, all information in one channel: large
    assert smoe_scale(one_hot).item() > smoe_scale(flat[:, :, :1, :1] * 2 / 0.7).item() + 1
    with pytest.raises(ValueError, match="activation must be"):
        smoe_scale(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="eps must be"):
        smoe_scale(one_hot, eps=0.0)


def test_gamma_norm_by_hand():
    # values 0 and 2: mean 1 = variance 1, so k = 1, theta = 1 and the CDF is 1 - exp(-x)
    maps = torch.tensor([[[0.0, 2.0], [2.0, 0.0]]], dtype=torch.float64)
    want = 1 - torch.exp(-maps)
    assert torch.allclose(gamma_norm(maps), want, atol=1e-12)
    assert torch.equal(gamma_norm(torch.full((1, 3, 3), 0.4)), torch.zeros(1, 3, 3))


def test_maps_of_the_first_layer_are_its_kept_channels_in_the_chain():
    net, images, _, chain = analyses_chain()
    masked = chain.apply(net)
    layers = computed_layers(chain)
    assert "layer1.1.conv1" not in layers  # inside the removed block
    maps = smoe_maps(chain, masked, images[:2], layers)
    assert set(maps) == set(layers) | {"combined"}
    kept = chain.kept["conv1"]
    s = torch.tensor(chain.scores["conv1"], dtype=torch.float32)
    with torch.no_grad():  # the score scales the map before the ReLU; for s > 0 that is s * relu(...)
        act = s[None, :, None, None] * torch.relu(net.bn1(net.conv1(images[:2])))[:, kept]
    want = F.interpolate(gamma_norm(smoe_scale(act))[:, None], size=(8, 8), mode="bilinear")[:, 0]
    assert torch.allclose(maps["conv1"], want, atol=1e-5)
    stacked = torch.stack([maps[l] for l in layers])
    assert torch.allclose(maps["combined"], stacked.mean(0), atol=1e-6)
    for m in maps.values():
        assert m.shape == (2, 8, 8) and float(m.min()) >= 0 and float(m.max()) <= 1
