"""Resolving ``--model``/``--weights`` specs into modules, shared by the CLI commands.

A spec is a dict stored in each chain (``Chain.model_spec``) so a chain knows its model:
``{"kind": "default"}`` (the shipped Fashion-MNIST ResNet) or
``{"kind": "torchvision", "name": "resnet50", "weights": "FILE", "num_classes": 1000}`` or
``{"kind": "file", "path": "model.pt2"}`` (a TorchScript or torch.export file, see
:mod:`nchains.model_import`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn


def parse_model_spec(model: Optional[str], weights: Optional[str], num_classes: Optional[int] = None
                     ) -> Dict[str, Any]:
    """Turns CLI ``--model``/``--weights`` into a spec dict; ValueError names the bad argument."""
    if model in (None, "", "default"):
        if weights is not None:
            raise ValueError("--weights needs --model torchvision:NAME (the default model ships its weights)")
        return {"kind": "default"}
    if model.startswith("torchvision:"):
        name = model.split(":", 1)[1]
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise ValueError(f"--model torchvision:{name} is not a torchvision classification model; "
                             f"accepted e.g. resnet50, vgg19, resnext50_32x4d (all: {len(available)} names)")
        if weights is not None and not os.path.isfile(weights):
            raise ValueError(f"--weights {weights!r} does not exist or is not a file")
        spec = {"kind": "torchvision", "name": name,
                "weights": os.path.abspath(weights) if weights else None}
        if num_classes is not None:
            spec["num_classes"] = int(num_classes)
        return spec
    if os.path.exists(model) or model.endswith((".pt", ".ts", ".pt2", ".pth")):
        if weights is not None:
            raise ValueError("--weights goes with --model torchvision:NAME; a model FILE carries its weights")
        if not os.path.isfile(model):
            raise ValueError(f"--model {model!r} does not exist or is not a file")
        return {"kind": "file", "path": os.path.abspath(model)}
    raise ValueError(f"--model must be 'default', 'torchvision:NAME' or a TorchScript/torch.export FILE, got {model!r}")


def load_model(spec: Dict[str, Any]) -> nn.Module:
    """Builds the model of a spec in eval mode. Weights load with ``weights_only=True``."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "default":
        from nchains.models import zoo

        return zoo.default_model().eval()
    if kind == "torchvision":
        import torchvision

        state = None
        if spec.get("weights"):
            path = spec["weights"]
            if not os.path.isfile(path):
                raise ValueError(f"--weights {path!r} does not exist or is not a file")
            try:
                if path.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    state = load_file(path)
                else:
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
                raise ValueError(f"--weights {path!r} is not a readable state_dict: {exc}") from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
        num_classes = spec.get("num_classes")
        if num_classes is None and state is not None:
            fc = [v for k, v in state.items() if k.endswith(("fc.weight", "classifier.6.weight", "classifier.weight",
                                                                 "classifier.1.weight", "heads.head.weight"))]
            num_classes = fc[-1].shape[0] if fc else None
        kwargs = {"weights": None}
        if num_classes is not None:
            kwargs["num_classes"] = int(num_classes)
        model = torchvision.models.get_model(spec["name"], **kwargs)
        if state is not None:
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise ValueError(f"--weights does not fit torchvision:{spec['name']}: {first}") from None
        return model.eval()
    if kind == "file":
        from nchains.models.file_import import load_model_file

        return load_model_file(spec["path"]).eval()
    raise ValueError(f"unknown model spec {spec!r}")
