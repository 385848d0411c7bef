"""Shared fixtures of the distributed tests: one small export folder for the serving tests, and
the free-port helper."""

from __future__ import annotations

import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ (for _default_chain)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
