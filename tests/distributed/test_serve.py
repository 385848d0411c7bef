"""``nchains serve`` on Ray Serve: started on 127.0.0.1 in the test, answers compared with
onnxruntime on the same artifact, bad requests answered 4xx with a one-line JSON error, then
stopped cleanly (Serve and the local Ray shut down).

Slow: a chain export plus a Ray and Serve start take 1-3 minutes on 2 loaded cores
(test_predictor.py checks the same requests without Ray in the default suite)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow



def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(onnx_export):
    """(url, folder): the export served by a local Ray with 2 CPUs; stopped, and checked stopped, after the module."""
    import ray

    from nchains.distributed.serve import serve_export, stop_serving

    folder, _ = onnx_export
    port = free_port()
    url = serve_export(folder, host="127.0.0.1", port=port, runtime="onnx", num_cpus=2)
    assert url == f"http://127.0.0.1:{port}"
    yield url, folder
    stop_serving()
    assert not ray.is_initialized()
    with pytest.raises(requests.ConnectionError):  # nothing listens any more
        requests.get(url + "/", timeout=5)


def _reference(folder: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(os.path.join(folder, "chain.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_root_is_the_manifest_summary(server):
    url, folder = server
    got = requests.get(url + "/", timeout=30).json()
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    assert got["region"] == manifest["region"]
    assert got["class_names"] == manifest["class_names"] and len(got["class_names"]) == 10
    assert got["verification"] == manifest["verification"]
    assert got["input"]["shape"] == [1, 28, 28] and got["runtime"] == "onnx"


def test_json_predict_matches_onnxruntime(server):
    url, folder = server
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    r = requests.post(url + "/predict", json={"inputs": x.tolist()}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    ref = _reference(folder, x)
    np.testing.assert_allclose(np.array(got["logits"]), ref, rtol=1e-5, atol=1e-5)
    names = requests.get(url + "/", timeout=30).json()["class_names"]
    assert got["predicted"] == ref.argmax(1).tolist()
    assert got["classes"] == [names[i] for i in ref.argmax(1)]
    one = requests.post(url + "/predict", json={"inputs": x[0].tolist()}, timeout=60).json()  # one sample [C, H, W]
    np.testing.assert_allclose(np.array(one["logits"]), ref[:1], rtol=1e-5, atol=1e-5)


def test_image_predict_applies_the_manifests_preprocessing(server):
    from nchains.models import zoo

    url, folder = server
    pixels, labels, _ = zoo.fashion_sample()
    raw = pixels[:2].numpy()  # uint8 [2, 28, 28]
    # Fashion-MNIST's normalisation, written out here: (p / 255 - 0.2860) / 0.3530
    x = ((raw.astype(np.float64) / 255.0 - 0.2860) / 0.3530)[:, None].astype(np.float32)
    ref = _reference(folder, x)
    for i in range(2):
        files = {"image": (f"img{i}.png", _png(raw[i]), "image/png")}
        r = requests.post(url + "/predict", files=files, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["logits"]), ref[i:i + 1], rtol=1e-4, atol=1e-4)
    r = requests.post(url + "/predict", data=_png(raw[0]), headers={"Content-Type": "image/png"}, timeout=60)
    np.testing.assert_allclose(np.array(r.json()["logits"]), ref[:1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, status, needle", [
    (dict(json={"inputs": [[1.0, 2.0]]}), 400, "shape [1, 2]"),
    (dict(data=json.dumps({"inputs": [[[[float("nan")] * 28] * 28]]}), headers={"Content-Type": "application/json"}),
     400, "NaN"),
    (dict(json={"images": []}), 400, 'one key "inputs"'),
    (dict(json={"inputs": [[[["a"] * 28] * 28]]}), 400, "nested list of numbers"),
    (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
    (dict(data=b"hello", headers={"Content-Type": "text/plain"}), 415, "text/plain"),
    (dict(files={"image": ("x.png", b"not an image", "image/png")}), 400, "not an image"),
    (dict(data=b"", headers={"Content-Type": "application/json"}), 400, "empty request"),
    (dict(json={"inputs": np.zeros((257, 1, 28, 28)).tolist()}), 413, "1 to 256"),
])
def test_bad_requests_get_4xx_and_one_line(server, kwargs, status, needle):
    url, _ = server
    r = requests.post(url + "/predict", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error and "\n" not in error and "Traceback" not in r.text


def test_wrong_method_and_path_are_4xx(server):
    url, _ = server
    assert requests.get(url + "/predict", timeout=30).status_code == 405
    assert requests.post(url + "/nothing", json={}, timeout=30).status_code == 404
