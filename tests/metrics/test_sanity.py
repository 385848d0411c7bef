import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from nchains.metrics import gradient, random_attribution, randomisation_sanity
from tests._models import digits_region, random_digits_net

pytestmark = pytest.mark.usefixtures("one_thread")

CALL_ORDER = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "layer2.0.conv1",
              "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1", "layer2.1.conv2", "fc"]


@pytest.fixture(scope="module")
def setup():
    net = random_digits_net(0)
    images = digits_region(per_class=3)[0]
    return net, images


def normalised(maps):
    m = maps.detach().double().sum(1).numpy()
    return m / np.abs(m).reshape(len(m), -1).max(1)[:, None, None]


def test_cascade_top_down_and_similarities_by_hand(setup):
    net, images = setup
    before = copy.deepcopy(net.state_dict())
    r = randomisation_sanity(gradient, net, images, layers=None, std=0.1, seed=3)
    assert r["layers"] == CALL_ORDER[::-1]
    for k, v in net.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k
    # the first two steps by hand: fc, then layer2.1.conv2, drawn in that order from one generator
    work = copy.deepcopy(net)
    targets = net(images).argmax(1)
    assert r["targets"] == targets.tolist()
    original = normalised(gradient(net, images, targets))
    gen = torch.Generator().manual_seed(3)
    modules = dict(work.named_modules())
    for step, name in enumerate(CALL_ORDER[::-1][:2]):
        with torch.no_grad():
            for p in modules[name].parameters(recurse=False):
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1).float())
        after = normalised(gradient(work, images, targets))
        rho = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(original, after)]
        rho_abs = [spearmanr(np.abs(a).ravel(), np.abs(b).ravel()).statistic for a, b in zip(original, after)]
        s = [structural_similarity(a, b, data_range=2.0) for a, b in zip(original, after)]
        np.testing.assert_allclose(r["per_image"][step]["spearman"], rho, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(r["per_image"][step]["spearman_abs"], rho_abs, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(r["per_image"][step]["ssim"], s, rtol=1e-6, atol=1e-9)
        assert r["spearman"][step] == pytest.approx(np.mean(rho))


def test_an_insensitive_method_stays_identical_and_the_gradient_does_not(setup):
    net, images = setup
    rand = randomisation_sanity(random_attribution(0), net, images, layers=["fc", "layer2.1.conv2"])
    assert rand["spearman"] == pytest.approx([1.0, 1.0]) and rand["ssim"] == pytest.approx([1.0, 1.0])
    grad = randomisation_sanity(gradient, net, images)
    assert max(abs(v) for v in grad["spearman"][-3:]) < 0.9  # fully randomised: not the original map


def test_constant_maps_have_no_rank_correlation(setup):
    net, images = setup
    zeros = lambda model, x, t: torch.zeros_like(x)
    r = randomisation_sanity(zeros, net, images, layers=["fc"])
    assert r["spearman"] == [None] and r["per_image"][0]["spearman"] == [None] * len(images)


@pytest.mark.parametrize("kwargs, needle", [
    ({"method": "gradient"}, "method must be a callable"),
    ({"layers": ["nope"]}, "'nope' is not a module"),
    ({"layers": ["layer1"]}, "'layer1' is not a module"),
    ({"std": 0.0}, "std must be"),
    ({"seed": -1}, "seed must be"),
    ({"images": torch.zeros(2, 1, 6, 6)}, "at least 7x7"),
    ({"method": lambda m, x, t: torch.zeros(1, 1, 8, 8)}, "shape ["),
    ({"target": 10}, "classes in [0, 10)"),
])
def test_bad_arguments(setup, kwargs, needle):
    net, images = setup
    args = {"method": gradient, "model": net, "images": images[:2], **kwargs}
    with pytest.raises((TypeError, ValueError)) as e:
        randomisation_sanity(**args)
    assert needle in str(e.value)
