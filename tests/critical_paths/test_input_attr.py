"""InputIntGrad completeness and InputMCT against gradient x input by hand."""

import pytest
import torch

from nchains import zoo
from nchains.critical_paths import input_intgrad, input_mct
from tests.critical_paths._helpers import plain_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def test_input_intgrad_is_complete():
    model = zoo.default_model()
    x = zoo.default_images(["dress"], per_class=1)[0]
    with torch.no_grad():
        logits = model(x)
        t = int(logits.argmax())
        gap = float(logits[0, t] - model(torch.zeros_like(x))[0, t])
    ig = input_intgrad(model, x, steps=50)
    assert ig.shape == x.shape
    assert abs(float(ig.sum()) - gap) <= 0.02 * abs(gap)  # 50 midpoint steps
    fine = input_intgrad(model, x, target=t, steps=300, batch_size=64)
    assert abs(float(fine.sum()) - gap) <= 0.005 * abs(gap)


def test_input_intgrad_batches_do_not_change_it_and_it_is_the_midpoint_sum():
    model = plain_cnn()
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = input_intgrad(model, x, target=2, steps=8)
    assert torch.allclose(input_intgrad(model, x, target=2, steps=8, batch_size=3), whole, atol=1e-6)
    ref = torch.zeros_like(x)
    for k in range(8):  # one scaled image at a time, by hand
        xs = ((k + 0.5) / 8 * x).requires_grad_(True)
        ref += torch.autograd.grad(model(xs)[0, 2], xs)[0]
    assert torch.allclose(whole, x * ref / 8, atol=1e-6)


def test_input_mct_is_gradient_times_input():
    model = plain_cnn()
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))[None]  # [C, H, W]
    xg = x[None].clone().requires_grad_(True)
    logits = model(xg)
    t = int(logits.argmax())
    (grad,) = torch.autograd.grad(logits[0, t], xg)
    assert torch.allclose(input_mct(model, x), grad * x[None])
    assert torch.count_nonzero(input_mct(model, x)) > 0


@pytest.mark.parametrize("kwargs,err,needle", [
    (dict(steps=0), ValueError, "steps must be an int in [1, 100000], got 0"),
    (dict(steps=2.5), TypeError, "steps must be an int"),
    (dict(batch_size=0), ValueError, "batch_size must be an int in [1, 100000], got 0"),
    (dict(target=5), ValueError, "class index in [0, 3), got 5"),
])
def test_bad_arguments_are_refused(kwargs, err, needle):
    with pytest.raises(err) as info:
        input_intgrad(plain_cnn(), torch.randn(1, 1, 8, 8), **kwargs)
    assert needle in str(info.value)
