"""Bad arguments to ``nchains serve``: each is refused before Ray starts (exit 2, one line, no
traceback, nothing written), naming the argument, the folder or the port."""

from __future__ import annotations

import hashlib
import json
import socket
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_export(root, sha=None):
    """A folder shaped like an export whose one artifact (chain.onnx) is not what the manifest says."""
    folder = root / "exp"
    folder.mkdir()
    blob = b"not really onnx"
    (folder / "chain.onnx").write_bytes(blob)
    manifest = {"format": "nchains.export", "version": 1,
                "artifacts": {"onnx": {"file": "chain.onnx", "sha256": sha or "0" * 64, "bytes": len(blob)}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, hashlib.sha256(blob).hexdigest()


@pytest.mark.parametrize("argv,needle", [
    (["--port", "0"], "port must be an integer between 1 and 65535, got 0"),
    (["--port", "70000"], "port must be an integer between 1 and 65535, got 70000"),
    (["--port", "x"], "argument --port: invalid int value"),
    (["--replicas", "0"], "--replicas must be between 1 and 256, got 0"),
    (["--threads", "0"], "--threads must be between 1 and 256, got 0"),
    (["--runtime", "tensorrt"], "argument --runtime: invalid choice: 'tensorrt'"),
    (["--num-cpus", "0"], "--num-cpus must be an integer between 1 and 4096, got 0"),
    (["--address", "x"], "address must be 'auto' or [ray://]HOST:PORT"),
    (["--address", "auto", "--num-cpus", "1"], "--num-cpus applies to a local Ray"),
    (["--host", "no-such-host.invalid"], "host 'no-such-host.invalid' cannot be resolved"),
])
def test_bad_arguments(refused, tmp_path, argv, needle):
    folder, _ = _fake_export(tmp_path)
    refused(["serve", str(folder), *argv], needle)


def test_port_in_use(refused, tmp_path):
    folder, _ = _fake_export(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        refused(["serve", str(folder), "--port", str(port)], f"port {port} on 127.0.0.1 is in use")


@pytest.fixture
def with_ray():
    pytest.importorskip("ray")
    pytest.importorskip("ray.serve")


def test_missing_folder(refused, with_ray):
    refused(["serve", "nowhere", "--port", str(_free_port())], "export folder 'nowhere' is not a folder")


def test_not_an_export(refused, tmp_path, with_ray):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    refused(["serve", "d", "--port", str(_free_port())], "export folder 'd' has no manifest.json")


def test_tampered_artifact(refused, tmp_path, with_ray):
    folder, _ = _fake_export(tmp_path)
    refused(["serve", str(folder), "--port", str(_free_port())], "TAMPERED: SHA-256 differs from the manifest")


def test_runtime_without_its_artifact(refused, tmp_path, with_ray):
    folder, _ = _fake_export(tmp_path)
    refused(["serve", str(folder), "--runtime", "pt2", "--port", str(_free_port())],
            "has no pt2 artifact for --runtime pt2 (it has: onnx)")


def test_without_ray(refused, tmp_path, monkeypatch):
    folder, _ = _fake_export(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    refused(["serve", str(folder), "--port", str(_free_port())], "nchains serve needs Ray Serve: pip install nchains[ray]")
