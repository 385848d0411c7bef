"""export_module: a plain nn.Module exported, re-loaded and verified like a chain, all or nothing."""

import io
import json

import pytest
import torch

from nchains.export.module_export import export_module
from tests.critical_paths._helpers import plain_cnn


def test_a_plain_module_exports_verified_and_loads_back(tmp_path):
    model = plain_cnn()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    manifest = export_module(model, tmp_path / "out", x, formats="pt2", images=x, metadata={"note": {"a": 1}})
    assert manifest["kind"] == "module" and manifest["note"] == {"a": 1}
    assert manifest["verification"]["formats"]["pt2"]["passed"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    loaded = torch.export.load(io.BytesIO((tmp_path / "out" / "chain.pt2").read_bytes())).module()
    probe = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(probe), model(probe), atol=1e-6)


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    model, x = plain_cnn(), torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="reserved key 'verification'"):
        export_module(model, tmp_path / "a", x, formats="pt2", metadata={"verification": 1})
    with pytest.raises(ValueError, match="unknown format 'zip'"):
        export_module(model, tmp_path / "a", x, formats="zip")
    with pytest.raises(ValueError, match="n_random must be an int >= 2"):
        export_module(model, tmp_path / "a", x, formats="pt2", n_random=1)
    with pytest.raises(ValueError, match=r"images must have shape \[N, 1, 8, 8\]"):
        export_module(model, tmp_path / "a", x, formats="pt2", images=torch.randn(1, 1, 9, 9))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an nchains export"):
        export_module(model, tmp_path / "mine", x, formats="pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_an_exporter_failure_names_the_format_and_writes_nothing(tmp_path, monkeypatch):
    import dataclasses

    from nchains.export import formats
    from nchains.export.formats import ExportError

    def broken(module, example):
        raise RuntimeError("cannot trace this\nsecond line")

    monkeypatch.setitem(formats._EXPORTERS, "pt2", dataclasses.replace(formats._EXPORTERS["pt2"], prepare=broken))
    with pytest.raises(ExportError, match="pt2 export failed: RuntimeError: cannot trace this; nothing was written"):
        export_module(plain_cnn(), tmp_path / "out", torch.randn(1, 1, 8, 8), formats="pt2")
    assert list(tmp_path.iterdir()) == []
