"""Bad destinations for ``nchains export`` and hostile manifests for ``nchains inspect``: each is
refused with one line and exit code 2 before any work, and leaves every folder as it was."""

import json
import os
import shutil

import pytest

from _default_chain import default_chain
from nchains.export.exporter import export


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(chain JSON path, a genuine pt2 export folder), outside every test's working folder."""
    model, _, chain = default_chain()
    base = tmp_path_factory.mktemp("integrity")
    chain.save(base / "chain.json")
    export(chain, model, base / "export", formats="pt2")
    return base / "chain.json", base / "export"


def _export(chain_path, out):
    return ["export", chain_path, "--out", out, "--formats", "pt2", "--quiet"]


def test_out_is_a_file(refused, made, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    refused(_export(made[0], "out"), "--out")


def test_out_under_a_file(refused, made, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(_export(made[0], "file/out"), "--out")


def test_out_is_a_foreign_folder(refused, made, tmp_path):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("mine")
    r = refused(_export(made[0], "thesis"), "not an nchains export")
    assert "refusing to replace it" in r.lines[0]
    assert (tmp_path / "thesis" / "chapter1.tex").read_text() == "mine"


def test_out_is_an_export_with_user_files(refused, made, tmp_path):
    shutil.copytree(made[1], tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    refused(_export(made[0], "out"), "'notes.txt'")


def test_out_is_a_symlink_to_a_foreign_folder(refused, made, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("1,2")
    os.symlink("data", tmp_path / "out")
    refused(_export(made[0], "out"), "not an nchains export")


def test_out_on_a_pseudo_filesystem(refused, made):
    refused(_export(made[0], "/proc/nchains-test-out"), "--out")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_read_only_folder(refused, made, tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        refused(_export(made[0], "ro/out"), "--out")
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def _hostile(tmp_path, made, value):
    shutil.copytree(made[1], tmp_path / "exp")
    shutil.copytree(made[1], tmp_path / "other")  # what "../other/chain.pt2" would find
    path = tmp_path / "exp" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["artifacts"]["pt2"]["file"] = value
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("value", ["../other/chain.pt2", "/etc/passwd", "sub/chain.pt2", "..", "", None, 7,
                                   ["chain.pt2"]])
@pytest.mark.parametrize("target", ["exp", "exp/manifest.json", "exp/chain.pt2"])
def test_inspect_manifest_path_leaves_folder(refused, made, tmp_path, value, target):
    _hostile(tmp_path, made, value)
    refused(["inspect", target], "artifacts.pt2.file")


def test_inspect_artifact_symlink_leaving_folder(refused, made, tmp_path):
    _hostile(tmp_path, made, "chain.pt2")
    (tmp_path / "exp" / "chain.pt2").unlink()
    os.symlink(tmp_path / "other" / "chain.pt2", tmp_path / "exp" / "chain.pt2")
    refused(["inspect", "exp"], "symlink leaving the export folder")


def test_inspect_manifest_artifacts_not_an_object(refused, made, tmp_path):
    shutil.copytree(made[1], tmp_path / "exp")
    path = tmp_path / "exp" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["artifacts"] = ["chain.pt2"]
    path.write_text(json.dumps(manifest))
    refused(["inspect", "exp"], "manifest artifacts must be an object")
