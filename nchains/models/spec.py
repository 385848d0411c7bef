"""Resolving ``--model``/``--weights`` specs into modules, shared by the CLI commands.

A spec is a dict stored in each chain (``Chain.model_spec``) so a chain knows its model:
``{"kind": "default"}`` (the shipped Fashion-MNIST ResNet) or
``{"kind": "torchvision", "name": "resnet50", "weights": "FILE", "num_classes": 1000}`` or
``{"kind": "file", "path": "model.pt2"}`` (a TorchScript or torch.export file, see
:mod:`nchains.models.file_import`).

A spec also says what its model expects as input (:func:`spec_preprocessing`) and what its outputs
are called (:func:`spec_class_names`), so ``nchains extract --images DIR`` feeds the shipped
model grayscale 28x28 Fashion-MNIST-normalised images and a torchvision model ImageNet ones.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn


def parse_model_spec(model: Optional[str], weights: Optional[str], num_classes: Optional[int] = None
                     ) -> Dict[str, Any]:
    """Turns CLI ``--model``/``--weights`` into a spec dict; ValueError names the bad argument."""
    if model in (None, "", "default"):
        if weights is not None:
            raise ValueError("--weights needs --model torchvision:NAME (the default model ships its weights)")
        if num_classes is not None:
            raise ValueError(f"--num-classes {num_classes} needs --model torchvision:NAME (the default model has "
                             "10 outputs)")
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
            spec["num_classes"] = _check_num_classes(num_classes)
        return spec
    if os.path.exists(model) or model.endswith((".pt", ".ts", ".pt2", ".pth")):
        if weights is not None:
            raise ValueError("--weights goes with --model torchvision:NAME; a model FILE carries its weights")
        if not os.path.isfile(model):
            raise ValueError(f"--model {model!r} does not exist or is not a file")
        if num_classes is not None:
            raise ValueError(f"--num-classes {num_classes} needs --model torchvision:NAME (a model FILE has its "
                             "own outputs)")
        return {"kind": "file", "path": os.path.abspath(model)}
    raise ValueError(f"--model must be 'default', 'torchvision:NAME' or a TorchScript/torch.export FILE, got {model!r}")


def _check_num_classes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise ValueError(f"--num-classes must be an integer between 1 and 1000000, got {value!r}")
    return value


def _torchvision_model(spec: Dict[str, Any]) -> nn.Module:
    """``torchvision.models.get_model(name)`` with the spec's weights (and outputs: from
    ``num_classes``, else from the file's classifier)."""
    import torchvision

    from nchains.models.weights import load_state_dict_file, load_weights_into

    state = None
    if spec.get("weights"):
        path = spec["weights"]
        if not os.path.isfile(path):
            raise ValueError(f"--weights {path!r} does not exist or is not a file")
        state = load_state_dict_file(path)
    num_classes = spec.get("num_classes")
    if num_classes is not None:
        _check_num_classes(num_classes)
    elif state is not None:
        fc = [v for k, v in state.items() if k.endswith(_CLASSIFIER_KEYS) and v.dim() == 2]
        num_classes = fc[-1].shape[0] if fc else None
    kwargs = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    model = torchvision.models.get_model(spec["name"], **kwargs)
    if state is not None:
        load_weights_into(model, state, f"torchvision:{spec['name']}")
    return model


_CLASSIFIER_KEYS = ("fc.weight", "classifier.6.weight", "classifier.weight", "classifier.1.weight",
                    "heads.head.weight")


def load_model(spec: Dict[str, Any]) -> nn.Module:
    """Builds the model of a spec in eval mode. Weights load with ``weights_only=True``."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "default":
        from nchains.models import zoo

        return zoo.default_model().eval()
    if kind == "torchvision":
        return _torchvision_model(spec).eval()
    if kind == "file":
        from nchains.models.file_import import load_model_file

        return load_model_file(spec["path"]).eval()
    raise ValueError(f"unknown model spec {spec!r}")


def spec_preprocessing(spec: Dict[str, Any], in_channels: int = 3) -> Dict[str, Any]:
    """How images from a folder become this spec's model input: ``{"preprocessing", "size",
    "grayscale"}`` (the arguments of :func:`nchains.models.images.load_image_folder`).

    The shipped model: ``fashion-mnist`` at 28 (grayscale, Fashion-MNIST mean/std, as it was
    trained); torchvision and model files: ``imagenet`` at 224 (resize 256, centre crop), grayscale
    when the model's first conv has ``in_channels == 1``.
    """
    if spec.get("kind") == "default":
        return {"preprocessing": "fashion-mnist", "size": 28, "grayscale": True}
    return {"preprocessing": "imagenet", "size": 224, "grayscale": in_channels == 1}


def spec_class_names(spec: Dict[str, Any], n_out: int) -> Optional[List[str]]:
    """Names of the model's ``n_out`` outputs when the spec knows them, else None: the shipped
    model's Fashion-MNIST classes, ImageNet's 1000 categories for a torchvision model with 1000
    outputs (torchvision's ``ResNet50_Weights.IMAGENET1K_V2.meta["categories"]``, offline)."""
    kind = spec.get("kind")
    if kind == "default":
        from nchains.models import zoo

        names = zoo.default_class_names()
    elif kind == "torchvision" and n_out == 1000:
        from torchvision.models import ResNet50_Weights

        names = list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    else:
        return None
    return names if len(names) == n_out else None


def spec_of_model_hash(model_hash: str) -> Optional[Dict[str, Any]]:
    """``{"kind": "default"}`` when ``model_hash`` (:func:`nchains._util.io.hash_model`) is the
    shipped model's, else None: lets a chain extracted from Python record its model."""
    from nchains.models import zoo

    return {"kind": "default"} if model_hash == zoo.default_model_hash() else None
