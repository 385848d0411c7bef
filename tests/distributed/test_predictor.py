"""The serving logic without Ray: request parsing and :class:`Predictor` on a real ONNX export,
compared with onnxruntime run directly on the same file."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest

from nchains.distributed.predictor import MAX_BODY, Predictor, RequestError, parse_request

ort = pytest.importorskip("onnxruntime")


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _multipart(name: str, filename: str, data: bytes, boundary: str = "b0undary") -> tuple:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def test_parse_json_and_multipart():
    assert parse_request("application/json", b'{"inputs": [[1, 2]]}') == ("inputs", [[1, 2]])
    assert parse_request(None, b'{"inputs": 3}') == ("inputs", 3)
    blob = _png(np.arange(16, dtype=np.uint8).reshape(4, 4))
    assert parse_request(*_multipart("image", "a.png", blob)) == ("image", blob)
    assert parse_request("image/png", blob) == ("image", blob)


@pytest.mark.parametrize("ctype, body, status, needle", [
    ("application/json", b"", 400, "empty request"),
    ("application/json", b"[1", 400, "not valid JSON"),
    ("application/json", b'{"inputs": 1, "x": 2}', 400, 'one key "inputs"'),
    ("text/csv", b"1,2", 415, "'text/csv' is not accepted"),
    ("multipart/form-data", b"--x\r\n", 400, "needs a boundary"),
    ("application/json", None, 413, "at most"),  # None: a body one byte over MAX_BODY
])
def test_parse_refusals(ctype, body, status, needle):
    body = b" " * (MAX_BODY + 1) if body is None else body
    with pytest.raises(RequestError) as info:
        parse_request(ctype, body)
    assert info.value.status == status and needle in str(info.value)


@pytest.fixture(scope="module")
def predictor(onnx_export):
    folder, _ = onnx_export
    return Predictor(folder, "onnx")


def test_predict_matches_onnxruntime(predictor, onnx_export):
    folder, images = onnx_export
    session = ort.InferenceSession(os.path.join(folder, "chain.onnx"), providers=["CPUExecutionProvider"])
    x = images.numpy()
    ref = session.run(None, {session.get_inputs()[0].name: x})[0]
    got = predictor.predict("inputs", x.tolist())
    np.testing.assert_allclose(np.array(got["logits"]), ref, rtol=1e-5, atol=1e-5)
    with open(os.path.join(folder, "manifest.json")) as f:
        names = json.load(f)["class_names"]
    assert got["classes"] == [names[i] for i in ref.argmax(1)]
    summary = predictor.summary()
    assert summary["input"]["shape"] == list(x.shape[1:]) and summary["region"]["classes"]


def test_image_is_preprocessed_as_the_manifest_says(predictor):
    from nchains.models import zoo

    pixels = zoo.fashion_sample()[0][5].numpy()
    mean, std = predictor.preprocessing["mean"][0], predictor.preprocessing["std"][0]
    x = ((pixels / 255.0 - mean) / std).astype(np.float32)[None, None]
    ref = predictor.predict("inputs", x.tolist())["logits"]
    np.testing.assert_allclose(predictor.predict("image", _png(pixels))["logits"], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inputs, needle", [
    ([[0.0] * 5], "has shape [1, 5]"),
    ([], "has shape [0]"),
    ("abc", "nested list of numbers"),
    (7, "has shape []"),
    ([[[[0.0] * 28] * 28], [[[0.0] * 27] * 28]], "nested list of numbers"),
])
def test_bad_inputs(predictor, inputs, needle):
    with pytest.raises(RequestError) as info:
        predictor.predict("inputs", inputs)
    assert info.value.status == 400 and needle in str(info.value)


def test_bad_image(predictor):
    with pytest.raises(RequestError, match="not an image PIL can decode"):
        predictor.predict("image", b"GIF89a broken")


def test_tampered_or_missing_artifact_is_refused(onnx_export, tmp_path):
    folder, _ = onnx_export
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with pytest.raises(ValueError, match="has no pt2 artifact for --runtime pt2"):
        Predictor(copy, "pt2")
    with open(copy / "chain.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(ValueError, match="TAMPERED"):
        Predictor(copy, "onnx")
