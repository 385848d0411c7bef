"""An export folder's model behind one ``predict`` call: what ``nchains serve`` runs per replica.

:class:`Predictor` verifies the folder (:func:`nchains.export.artifacts.inspect_artifact`:
hashes and embedded metadata against the manifest) and loads one artifact with its runtime
(onnxruntime, torch.export or TorchScript). Requests are checked before the model runs, and
every bad one is a :class:`RequestError` carrying an HTTP 4xx status and a one-line message:
JSON ``{"inputs": [...]}`` must have the manifest's input shape (one sample ``[C, H, W]`` or a
batch ``[N, C, H, W]``, finite numbers); an image file (multipart form, or a raw image body) is
decoded and preprocessed the way the manifest records (``input.preprocessing``).
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["Predictor", "RequestError", "RUNTIME_FORMATS", "parse_request", "MAX_BODY", "MAX_BATCH"]

#: ``--runtime`` -> the export format it loads.
RUNTIME_FORMATS = {"onnx": "onnx", "pt2": "pt2", "ts": "torchscript"}
MAX_BODY = 32 * 1024 * 1024  # bytes of one request body
MAX_BATCH = 256  # samples of one request
MAX_PIXELS = 50_000_000  # an image header claiming more is refused before decoding


class RequestError(ValueError):
    """A bad request: ``status`` (HTTP 4xx) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(" ".join(str(message).split()))
        self.status = status


def _multipart_file(content_type: str, body: bytes) -> bytes:
    """The first file (or only field) of a ``multipart/form-data`` body (stdlib parser: no extra
    dependency)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    if "boundary=" not in content_type:
        raise RequestError("multipart/form-data needs a boundary in its Content-Type")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    parts = [p for p in msg.iter_parts()] if msg.is_multipart() else []
    files = [p for p in parts if p.get_filename()] or parts
    if not files:
        raise RequestError("the multipart form holds no file; send the image as a form field, e.g. "
                           "curl -F image=@shoe.png")
    data = files[0].get_payload(decode=True)
    if not data:
        raise RequestError("the multipart form's file is empty")
    return data


def parse_request(content_type: Optional[str], body: bytes) -> Tuple[str, Any]:
    """``("inputs", nested list)`` for a JSON body, ``("image", bytes)`` for an image (multipart
    form or raw ``image/*`` body); RequestError (400, 413 or 415) otherwise."""
    ctype = (content_type or "").strip()
    kind = ctype.split(";")[0].strip().lower()
    if len(body) > MAX_BODY:
        raise RequestError(f"the request body has {len(body)} bytes; at most {MAX_BODY}", 413)
    if not body:
        raise RequestError('empty request; send JSON {"inputs": [...]} or an image file (multipart form)')
    if kind == "application/json" or (kind == "" and body[:1] in (b"{", b"[")):
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) != {"inputs"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise RequestError(f'the JSON body must be an object with the one key "inputs", got {got}')
        return "inputs", data["inputs"]
    if kind == "multipart/form-data":
        return "image", _multipart_file(ctype, body)
    if kind.startswith("image/") or kind == "application/octet-stream":
        return "image", body
    raise RequestError(f"Content-Type {ctype or 'none'!r} is not accepted: send application/json "
                       '{"inputs": [...]} or an image file (multipart/form-data or image/*)', 415)


class Predictor:
    """One artifact of a verified export folder, loaded with its runtime.

    Args:
        folder (path): an export folder (``nchains export chain.json --out DIR``).
        runtime (str): ``onnx`` (onnxruntime), ``pt2`` (torch.export) or ``ts`` (TorchScript).
        threads (int): intra-op threads of the runtime (None: the runtime's default).

    Raises:
        ValueError: when the folder is not an export, fails verification (a missing or tampered
            file) or has no artifact for ``runtime``.
    """

    def __init__(self, folder, runtime: str = "onnx", threads: Optional[int] = None):
        from nchains.export.artifacts import inspect_artifact

        if runtime not in RUNTIME_FORMATS:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIME_FORMATS)}, got {runtime!r}")
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"export folder {folder!r} is not a folder; give the --out of `nchains export`")
        if not os.path.isfile(os.path.join(folder, "manifest.json")):
            raise ValueError(f"export folder {folder!r} has no manifest.json; give the --out of `nchains export`")
        report = inspect_artifact(folder)
        if report["kind"] != "export":
            raise ValueError(f"{folder!r} is not an nchains export folder")
        fmt = RUNTIME_FORMATS[runtime]
        check = next((c for c in report["checks"] if c["format"] == fmt), None)
        if check is None:
            have = ", ".join(k for k, v in RUNTIME_FORMATS.items() if any(c["format"] == v for c in report["checks"]))
            raise ValueError(f"export folder {folder!r} has no {fmt} artifact for --runtime {runtime} (it has: "
                             f"{have or 'none'})")
        if not check["ok"]:
            raise ValueError(f"export folder {folder!r}: {check['file']}: {check['status']}")
        self.manifest: Dict[str, Any] = report["metadata"]
        self.folder, self.runtime, self.path = folder, runtime, check["file"]
        self.input_shape: List[int] = [int(d) for d in self.manifest["input"]["shape"]]
        self.class_names: Optional[List[str]] = self.manifest.get("class_names")
        self.preprocessing = self.manifest["input"].get("preprocessing")
        self._run = self._load(threads)

    def _load(self, threads: Optional[int]):
        if self.runtime == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if threads is not None:
                opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return lambda x: session.run(None, {name: x})[0]
        if threads is not None:
            torch.set_num_threads(threads)
        if self.runtime == "pt2":
            module = torch.export.load(self.path).module()
        else:
            with warnings.catch_warnings():  # torch.jit is deprecated upstream; the server still loads it
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(self.path)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return run

    def summary(self) -> Dict[str, Any]:
        """What ``GET /`` returns: the region, classes, input, verification and size of the chain."""
        m = self.manifest
        chain = m.get("chain", {})
        return {"format": m.get("format"), "runtime": self.runtime, "artifact": os.path.basename(self.path),
                "region": m.get("region"), "class_names": self.class_names, "input": m.get("input"),
                "output": m.get("output"), "verification": m.get("verification"),
                "metrics": chain.get("metrics"), "compact": m.get("compact"), "model_hash": m.get("model_hash")}

    def _batch(self, inputs: Any) -> np.ndarray:
        try:
            x = np.asarray(inputs, dtype=np.float32)
        except (ValueError, TypeError, OverflowError):
            raise RequestError(f'"inputs" must be a nested list of numbers of shape [N, {", ".join(map(str, self.input_shape))}] '
                               "(all rows the same length)") from None
        if x.shape == tuple(self.input_shape):
            x = x[None]
        if x.ndim != len(self.input_shape) + 1 or list(x.shape[1:]) != self.input_shape:
            raise RequestError(f'"inputs" has shape {list(x.shape)}; this chain takes [N, '
                               f'{", ".join(map(str, self.input_shape))}] or one sample {self.input_shape}')
        if not 1 <= x.shape[0] <= MAX_BATCH:
            raise RequestError(f'"inputs" holds {x.shape[0]} samples; send 1 to {MAX_BATCH} per request',
                               413 if x.shape[0] else 400)
        if not np.isfinite(x).all():
            bad = int(np.nonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))[0][0])
            raise RequestError(f'"inputs"[{bad}] holds a NaN or infinite value')
        return np.ascontiguousarray(x)

    def _image(self, data: bytes) -> np.ndarray:
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        from nchains.models.images import _preprocess  # the very preprocessing `nchains extract` applied

        pre = self.preprocessing
        if not isinstance(pre, dict) or pre.get("kind") not in ("imagenet", "fashion-mnist", "none"):
            raise RequestError('this export does not record its preprocessing; send preprocessed JSON {"inputs": ...}')
        grayscale = pre.get("channels") == "grayscale"
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise RequestError(f"the image has {im.width}x{im.height} pixels; at most {MAX_PIXELS}", 413)
                img = TF.pil_to_tensor(im.convert("L" if grayscale else "RGB"))
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever PIL makes of a bad file, it is a bad request
            raise RequestError(f"the file is not an image PIL can decode ({type(exc).__name__}: {exc})") from None
        x = _preprocess(img, pre["kind"], int(pre["size"]), grayscale)
        return self._batch(x.numpy())

    def predict(self, kind: str, payload: Any) -> Dict[str, Any]:
        """Logits and predicted classes of a parsed request (:func:`parse_request`).

        Returns:
            dict: ``logits`` (list of N lists), ``predicted`` (N class indices) and ``classes``
            (their names, or the indices as strings when the export has no names).
        """
        x = self._image(payload) if kind == "image" else self._batch(payload)
        logits = np.asarray(self._run(x), dtype=np.float64)
        top = logits.argmax(1).tolist()
        names = self.class_names
        classes = [names[i] if names and i < len(names) else str(i) for i in top]
        out = logits.tolist()
        if not all(math.isfinite(v) for row in out for v in row):
            out = [[v if math.isfinite(v) else None for v in row] for row in out]  # JSON has no NaN
        return {"logits": out, "predicted": top, "classes": classes}
