"""Numbers and tensors that NeuroChains refuses: NaN, infinities, out-of-range values and
non-finite pixels, from the command line (one line, exit 2, nothing written) and from Python."""

import math

import pytest
import torch

import nchains
from nchains import NeuroChainsConfig

from _models import DigitsNet, digits_region
from _small_chain import small_digits_chain

# (argv after `extract`, needle): each is refused before a model is loaded or an image is read
CLI_CASES = [
    (["--lam", "nan"], "lam must be a number >= 0"),
    (["--lam", "inf"], "NaN and infinity are not accepted"),
    (["--lam=-inf"], "lam must be a number >= 0"),
    (["--lam", "-1"], "lam must be a number >= 0 (finite) or None, got -1.0"),
    (["--lam-gate", "nan"], "lam_gate must be a number >= 0"),
    (["--lam-gate", "-0.5"], "lam_gate must be"),
    (["--lr", "inf"], "lr must be a number > 0"),
    (["--lr", "0"], "lr must be a number > 0 (finite), got 0.0"),
    (["--lr", "nan"], "lr must be a number > 0"),
    (["--lr", "-0.01"], "lr must be"),
    (["--tau", "nan"], "tau must be a number >= 0"),
    (["--tau", "inf"], "tau must be a number >= 0"),
    (["--tau", "-0.1"], "tau must be a number >= 0"),
    (["--steps", "10000000"], "steps must be an int >= 0 and <= 1000000, got 10000000"),
    (["--steps", "-1"], "steps must be an int >= 0"),
    (["--finetune-steps", "-2"], "finetune_steps must be an int >= 0"),
    (["--finetune-steps", str(10**9)], "finetune_steps must be an int >= 0 and <= 1000000"),
    (["--finetune-lr", "0"], "finetune_lr must be a number > 0"),
    (["--finetune-lr", "inf"], "finetune_lr must be a number > 0"),
    (["--finetune-kl", "nan"], "finetune_kl must be a number >= 0"),
    (["--finetune-kl", "-1"], "finetune_kl must be a number >= 0"),
    (["--seed", "-1"], "seed must be"),
    (["--seed", str(2**63)], "seed must be"),
]


@pytest.mark.parametrize("argv,needle", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_extract_refuses_bad_numbers(refused, argv, needle):
    refused(["extract", *argv, "--out", "chain.json", "--quiet"], needle)


def test_a_bad_number_is_refused_even_with_a_model_that_cannot_load(refused, tmp_path):
    """The config is checked before the model file is opened: no work before a bad number."""
    refused(["extract", "--lam", "nan", "--model", tmp_path / "missing.pt"], "lam must be a number >= 0")


def _images(value):
    images, _ = digits_region(per_class=2)
    images = images.clone()
    images[1, 0, 3, 3] = value
    return images


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_api_extract_refuses_a_non_finite_pixel(value):
    with pytest.raises(ValueError, match=r"^images contains 1 non-finite value \(NaN/Inf\) at image 1; "):
        nchains.extract(DigitsNet().eval(), _images(value), steps=1)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_api_export_refuses_a_non_finite_pixel(value, tmp_path):
    net, images, chain = small_digits_chain()
    bad = images.clone()
    bad[-1, 0, 0, 0] = value
    with pytest.raises(ValueError, match=rf"images contains 1 non-finite value \(NaN/Inf\) at image {len(bad) - 1}"):
        nchains.export(chain, net, tmp_path / "out", formats=["ts"], images=bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides,match", [
    ({"lam": math.nan}, "lam must be a number >= 0"),
    ({"lr": math.inf}, "lr must be a number > 0"),
    ({"tau": math.nan}, "tau must be a number >= 0"),
    ({"temperature": math.inf}, "temperature must be a number > 0"),
    ({"temperature": 0}, "temperature must be a number > 0"),
    ({"stop_delta": math.nan}, "stop_delta must be a number >= 0"),
    ({"seed": -1}, r"seed must be an int in \[0, 2\*\*63\)"),
    ({"steps": 10**6 + 1}, "steps must be an int >= 0 and <= 1000000"),
], ids=lambda v: str(v))
def test_api_extract_refuses_bad_overrides(overrides, match):
    with pytest.raises(ValueError, match=match):
        nchains.extract(DigitsNet().eval(), _images(0.0), **overrides)


def test_api_config_object_with_a_nan_cannot_be_built_or_smuggled():
    with pytest.raises(ValueError, match="lam must be"):
        NeuroChainsConfig(lam=math.nan)
    cfg = NeuroChainsConfig()
    cfg.lr = math.nan  # set after construction: extract's replace() re-validates
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        nchains.extract(DigitsNet().eval(), _images(0.0), cfg)


def test_api_integer_images_are_refused_but_float64_are_accepted():
    with pytest.raises(ValueError, match="floating-point"):
        nchains.extract(DigitsNet().eval(), torch.ones(2, 1, 8, 8, dtype=torch.int64))
    from nchains._util.tensors import check_images

    x = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    assert check_images(x, [1, 8, 8]) is x
    with pytest.raises(ValueError, match=r"images must have shape \[N, 3, 8, 8\]"):
        check_images(x, [3, 8, 8])
