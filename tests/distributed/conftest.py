"""Shared fixture of the distributed tests: one small export folder for the serving tests."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ (for _default_chain)


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory):
    """(folder, images) : an ONNX-only export of a short chain of the shipped model, with class names."""
    from _default_chain import default_chain

    from nchains.export.exporter import export
    from nchains.models import zoo

    model, images, chain = default_chain()
    folder = tmp_path_factory.mktemp("serve") / "export"
    export(chain, model, folder, formats="onnx", images=images, class_names=zoo.default_class_names())
    return str(folder), images
