import pytest
import torch
from torch import nn

from nchains.metrics import (gradient, gradient_x_input, input_intgrad_attribution, path_attribution,
                             random_attribution)
from tests._models import digits_region, random_digits_net

pytestmark = pytest.mark.usefixtures("one_thread")


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4)).double().eval()


def test_gradient_methods_on_a_linear_model():
    net, x = linear(), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 3, 1])
    w = net[1].weight.detach().view(4, 2, 3, 3)[t]
    torch.testing.assert_close(gradient(net, x, t), w)
    torch.testing.assert_close(gradient_x_input(net, x, t), w * x)
    # integrated gradients of a linear logit from a zero baseline: exactly w * x
    torch.testing.assert_close(input_intgrad_attribution(steps=4)(net, x, t), w * x)


def test_random_attribution_is_seeded():
    x = torch.zeros(2, 1, 4, 4)
    a, b = random_attribution(1)(None, x, None), random_attribution(1)(None, x, None)
    c = random_attribution(2)(None, x, None)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) < 1
    with pytest.raises(ValueError, match="seed"):
        random_attribution(-1)


def test_path_attribution_at_sparsity_zero_is_the_gradient():
    net = random_digits_net(0)
    x = digits_region(per_class=1)[0]
    t = net(x).argmax(1)
    torch.testing.assert_close(path_attribution("mct", sparsity=0.0)(net, x, t), gradient(net, x, t))
    sparse = path_attribution("mct", sparsity=0.9)(net, x, t)
    assert sparse.shape == x.shape and not torch.allclose(sparse, gradient(net, x, t))
    with pytest.raises(ValueError, match="method must be one of"):
        path_attribution("greedy")
