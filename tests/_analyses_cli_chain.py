"""A chain file of the shipped model that records how its images were chosen, for the
``nchains analyze`` tests: tests/_default_chain.py's short chain (four sample images) with its
``images_source``, so the command rebuilds the images (and their labels) from the file alone."""

from __future__ import annotations

import dataclasses
import functools

from nchains.models.image_source import default_source

from _default_chain import default_chain

CLASSES = ["sneaker", "ankle-boot"]


@functools.lru_cache(maxsize=None)
def cli_chain():
    """(model, images, chain) with ``chain.images_source`` set (callers must not modify them)."""
    model, images, chain = default_chain()
    return model, images, dataclasses.replace(chain, images_source=default_source(CLASSES, 2, 0, None))


def write_chain(folder) -> str:
    path = folder / "chain.json"
    cli_chain()[2].save(path)
    return str(path)
