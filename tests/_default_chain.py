"""A short chain of the shipped model (nchains.zoo), for export and integrity tests.

Twenty scoring steps on four images of two classes: a real chain of the default model in a few
seconds, which is all that tests of writing, publishing and inspecting artifacts need.
"""

from __future__ import annotations

import functools

import torch

from nchains.models import zoo
from nchains.neurochains.extraction import extract


@functools.lru_cache(maxsize=None)  # one extraction per test session, shared by the modules that use it
def default_chain(steps: int = 20):
    """(model, images, chain) of the shipped Fashion-MNIST ResNet on sneakers and ankle boots
    (callers must not modify them)."""
    model = zoo.default_model()
    images, _, _ = zoo.default_images(["sneaker", "ankle-boot"], per_class=2, seed=0, confident=None)
    torch.manual_seed(0)
    chain = extract(model, images, steps=steps, finetune_steps=5, seed=0, model_spec={"kind": "default"})
    return model, images, chain
