"""DGR (Eq. 3) against a hand-derived gradient on a 2-hidden-layer net, binarisation, seeding, types."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nchains.baselines import dgr, dgr_paths
from nchains.baselines._batch import prepare
from nchains.baselines.dgr import dgr_gates, dgr_loss
from nchains.critical_paths import CriticalPath
from tests.baselines._reference import small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_layer(seed=0):
    """1x1x5 images -> conv (1, 5) = a linear layer on the 5 pixels -> relu(7) -> linear -> relu(6) -> linear(3)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 7, (1, 5)), nn.Flatten(), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(),
                         nn.Linear(6, 3)).double().eval()


def _image(seed=1, shape=(1, 1, 6, 6), dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_gate_gradient_matches_the_hand_derived_one():
    net = _two_layer()
    x = _image(2, (1, 1, 1, 5), torch.float64)
    w1, b1 = net[0].weight.detach().reshape(7, 5), net[0].bias.detach()
    w2, b2, w3, b3 = (t.detach() for t in (net[3].weight, net[3].bias, net[5].weight, net[5].bias))
    lam, lr, init = 0.03, 1e-3, 0.5
    # Eq. 3 by hand at Λ = 0.5 everywhere (at Λ = 1 the gated net is the original and dCE/dz = 0)
    a1 = torch.relu(w1 @ x.reshape(5) + b1)
    z2 = w2 @ (init * a1) + b2
    a2 = torch.relu(z2)
    q = torch.softmax(w3 @ (init * a2) + b3, 0)
    p = torch.softmax(w3 @ torch.relu(w2 @ a1 + b2) + b3, 0)
    d_h2 = w3.T @ (q - p)
    g2 = d_h2 * a2 + lam
    g1 = (w2.T @ (d_h2 * init * (z2 > 0))) * a1 + lam
    batch = prepare(net, x, "pred")
    assert [s.key for s in batch.sites] == ["2", "4"]
    # one SGD step (the first momentum step is the plain gradient): gates = init - lr * dL/dΛ
    gates = dgr_gates(batch, init=init, lam=lam, steps=1, lr=lr, momentum=0.9)
    got = (init - gates[0]) / lr
    assert torch.allclose(got, torch.cat([g1, g2]), rtol=1e-9, atol=1e-9)
    assert float((q - p).abs().max()) > 1e-3  # the CE part of the gradient is not zero


def test_loss_is_soft_cross_entropy_plus_l1():
    logits = torch.randn(3, 5, dtype=torch.float64)
    soft = torch.softmax(torch.randn(3, 5, dtype=torch.float64), 1)
    gates = [torch.rand(3, 4, 2, dtype=torch.float64), torch.rand(3, 7, dtype=torch.float64)]
    want = F.cross_entropy(logits, soft, reduction="sum") + 0.2 * (gates[0].abs().sum() + gates[1].abs().sum())
    assert torch.allclose(dgr_loss(logits, soft, gates, 0.2), want)


def test_channel_gate_gradient_is_the_sum_over_its_neurons():
    model = small_cnn(1, bias=0.3).double()
    x = _image(3, dtype=torch.float64)
    batch = prepare(model, x, "pred")
    lam, lr, init = 0.01, 1e-4, 0.7
    per_neuron = (init - dgr_gates(batch, init=init, lam=lam, steps=1, lr=lr)) / lr - lam
    per_channel = (init - dgr_gates(batch, init=init, lam=lam, steps=1, lr=lr, granularity="channel")) / lr - lam
    start = 0
    for shape in batch.shapes:
        size = torch.Size(shape).numel()
        n = per_neuron[0, start:start + size].reshape(shape[0], -1)
        c = per_channel[0, start:start + size].reshape(shape[0], -1)
        assert torch.allclose(c, n.sum(1, keepdim=True).expand_as(c), rtol=1e-6, atol=1e-8)
        start += size


def test_binarised_at_the_sparsity_by_gate():
    model, x = small_cnn(1, bias=0.3), _image(4)
    loose, at_90, at_99 = dgr_paths(model, x, [None, 0.9, 0.99], steps=60, lr=0.05, lam=0.04)[0]
    gates = torch.cat([loose.contributions[k].flatten() for k in loose.mask])
    for path, sparsity in ((at_90, 0.9), (at_99, 0.99)):
        m = torch.cat([path.mask[k].flatten() for k in path.mask])
        assert int(m.sum()) == round((1 - sparsity) * len(m))
        assert float(gates[m].min()) >= float(gates[~m].max())
        assert path.requested_sparsity == sparsity and path.method == "dgr"
    m = torch.cat([loose.mask[k].flatten() for k in loose.mask])
    assert torch.equal(m, gates > 0) and 0 < int(m.sum()) < len(m)  # some gates reached 0, not all


def test_gates_stay_in_the_clamp():
    model, x = small_cnn(0), _image(5)
    gates = dgr_gates(prepare(model, x, "pred"), init="random", lam=0.0, steps=5, lr=1e3, clamp=2.0)
    assert float(gates.min()) >= 0 and float(gates.max()) <= 2.0
    assert float(gates.max()) == 2.0 and float(gates.min()) == 0.0  # the big steps hit both bounds


def test_random_init_is_seeded():
    model, x = small_cnn(0), _image(6)
    batch = prepare(model, x, "pred")
    first = dgr_gates(batch, init="random", steps=1, lr=1e-12, seed=3)
    again = dgr_gates(batch, init="random", steps=1, lr=1e-12, seed=3)
    other = dgr_gates(batch, init="random", steps=1, lr=1e-12, seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert 0 <= float(first.min()) and float(first.max()) <= 1  # U(0, 1) (a step of 1e-12 moves nothing)
    assert 0.4 < float(first.mean()) < 0.6 and float(first.std()) > 0.2


def test_batched_images_have_their_own_gates():
    model = small_cnn(2, bias=0.3)
    xs = torch.cat([_image(7), _image(8)])
    both = dgr_paths(model, xs, [0.9], steps=20, lr=0.05)
    for i in range(2):
        alone = dgr(model, xs[i:i + 1], 0.9, steps=20, lr=0.05)
        for k in alone.mask:
            assert torch.allclose(both[i][0].contributions[k], alone.contributions[k], atol=1e-5)


def test_returns_a_working_critical_path():
    model, x = small_cnn(1, bias=0.3), _image(9)
    path = dgr(model, x, 0.9, init="random", steps=10, granularity="channel", target=1)
    assert isinstance(path, CriticalPath) and path.target == 1 and path.method == "dgr"
    with torch.no_grad():
        assert torch.allclose(path.linear_model()(x), model(x), atol=1e-6)
    heat = path.attribution()
    assert heat.shape == x.shape and bool(torch.isfinite(heat).all())
    for k, c in path.contributions.items():  # a channel's neurons share its gate
        flat = c.reshape(c.shape[0], -1)
        assert torch.equal(flat, flat[:, :1].expand_as(flat)), k


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"init": "ones"}, ValueError, "init"),
    ({"init": -1.0}, ValueError, "init"),
    ({"init": 10.0, "clamp": 5.0}, ValueError, "clamp"),
    ({"lam": -0.1}, ValueError, "lam"),
    ({"steps": 0}, ValueError, "steps"),
    ({"steps": 2.5}, TypeError, "steps"),
    ({"lr": 0.0}, ValueError, "lr"),
    ({"momentum": 1.0}, ValueError, "momentum"),
    ({"granularity": "layer"}, ValueError, "granularity"),
    ({"clamp": float("inf")}, ValueError, "clamp"),
    ({"seed": -1}, ValueError, "seed"),
    ({"sparsity": 1.2}, ValueError, "sparsity"),
])
def test_bad_arguments(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        dgr(small_cnn(0), _image(), **{"steps": 1, **kwargs})


def test_bad_images():
    with pytest.raises(ValueError, match="one image"):
        dgr(small_cnn(0), torch.zeros(2, 1, 6, 6), steps=1)
    with pytest.raises(ValueError, match="N, C, H, W"):
        dgr(small_cnn(0), torch.zeros(6, 6), steps=1)
