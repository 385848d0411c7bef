import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from nchains.metrics import ssim


def fixed_pairs():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (4, 12, 17))
    b = np.stack([a[0], 0.7 * a[1] + 0.3 * rng.uniform(-1, 1, (12, 17)), -a[2], rng.uniform(-1, 1, (12, 17))])
    return a, b


def test_matches_skimage_defaults_batched():
    a, b = fixed_pairs()
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b), data_range=2.0)
    ref = [structural_similarity(x, y, data_range=2.0) for x, y in zip(a, b)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert ours[0] == pytest.approx(1.0)


@pytest.mark.parametrize("data_range, win", [(1.0, 7), (5.0, 3), (2.0, 11)])
def test_matches_skimage_other_settings(data_range, win):
    a, b = fixed_pairs()
    ours = ssim(torch.from_numpy(a[1]).float(), torch.from_numpy(b[1]).float(), data_range=data_range, win_size=win)
    ref = structural_similarity(a[1].astype(np.float32).astype(np.float64), b[1].astype(np.float32).astype(np.float64),
                                data_range=data_range, win_size=win)
    assert ours.dim() == 0 and float(ours) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("kwargs, needle", [
    ({"a": torch.zeros(5, 5), "b": torch.zeros(5, 5)}, "at least 7x7"),
    ({"a": torch.zeros(8, 8), "b": torch.zeros(8, 9)}, "one shape"),
    ({"win_size": 4}, "odd int"),
    ({"data_range": 0.0}, "data_range"),
    ({"a": torch.full((8, 8), float("nan"))}, "finite"),
])
def test_bad_arguments(kwargs, needle):
    args = {"a": torch.zeros(8, 8), "b": torch.zeros(8, 8), "data_range": 1.0, **kwargs}
    with pytest.raises(ValueError) as e:
        ssim(**args)
    assert needle in str(e.value)
