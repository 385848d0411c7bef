"""The model and image options shared by every command that runs a model on images.

``add_input_args`` gives a sub-command the options of ``nchains extract`` (``--model``,
``--weights``, ``--num-classes``, ``--images``, ``--classes``, ``--per-class``, ``--confident``,
``--size``, ``--preprocessing``, ``--seed``); ``check_input_args`` refuses bad values before any
work; ``load_inputs`` loads the model and the images the way the model expects
(:func:`nchains.models.spec.spec_preprocessing`, ``--size``/``--preprocessing`` override it) and
names the classes by the model or by the class sub-folders. Without ``--model`` and ``--images``
it is the shipped model on its shipped Fashion-MNIST test images. ``parse_target`` reads the
``--target`` of the commands that explain a class (``contributions``, ``paths``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

MAX_SIZE = 4096  # a larger --size is a typo; 4096x4096x3 float32 is already 200 MB per image
DEFAULT_PER_CLASS = 10
DEFAULT_CONFIDENT = 0.95
_LOW_AGREEMENT = 0.5


class Inputs(NamedTuple):
    """What :func:`load_inputs` loaded.

    Attributes:
        spec (dict): the model spec (:func:`nchains.models.spec.parse_model_spec`).
        model (nn.Module): the model, in eval mode.
        images (Tensor[N, C, H, W]): preprocessed as the model expects.
        class_names (list[str] | None): a name per model output, when known.
        what (str): a one-line description of the images, for progress messages.
        source (dict): how the images were chosen (:mod:`nchains.models.image_source`), so that
            they can be rebuilt later (a chain records it).
    """

    spec: Dict[str, Any]
    model: nn.Module
    images: torch.Tensor
    class_names: Optional[List[str]]
    what: str
    source: Dict[str, Any]


def add_input_args(p, per_class_default: int = DEFAULT_PER_CLASS, seed_help: Optional[str] = None,
                   confident_default: Optional[float] = DEFAULT_CONFIDENT) -> None:
    """Adds the model and image options of ``nchains extract`` to the sub-parser ``p``.

    ``per_class_default`` and ``confident_default`` are what ``--per-class`` and ``--confident``
    mean when not given (``confident_default=None``: the shipped images are not filtered by the
    model's confidence unless ``--confident`` is given); :func:`load_inputs` applies them."""
    p.set_defaults(per_class_default=per_class_default, confident_default=confident_default)
    confident = (f"default {confident_default}" if confident_default is not None
                 else "default: no filter, any image of the sample can be picked")
    p.add_argument("--model", default=None,
                   help="'default' (shipped Fashion-MNIST ResNet), torchvision:NAME (e.g. torchvision:resnet50), "
                        "or a TorchScript (.pt/.ts) / torch.export (.pt2) FILE")
    p.add_argument("--weights", default=None, help="state_dict file (.pt/.pth/.safetensors) for --model torchvision:NAME")
    p.add_argument("--num-classes", type=int, default=None, help="outputs of a torchvision model (default: from weights)")
    p.add_argument("--images", default=None,
                   help="folder of images, or of class sub-folders (required with a torchvision model); class "
                        "names come from the model, or from the sub-folders when the model has none")
    p.add_argument("--classes", default=None,
                   help="comma-separated classes, e.g. sneaker,ankle-boot (default model) or sub-folder names")
    p.add_argument("--per-class", type=int, default=None,
                   help=f"images per class (default {per_class_default}; a folder with fewer gives what it has, "
                        "with a warning)")
    p.add_argument("--confident", type=float, default=None,
                   help=f"shipped images only: pick images the model predicts with at least this probability "
                        f"({confident})")
    p.add_argument("--size", type=int, default=None,
                   help="image size for --images (default: the model's, 28 for the default model, 224 otherwise)")
    p.add_argument("--preprocessing", choices=["imagenet", "fashion-mnist", "none"], default=None,
                   help="preprocessing of --images (default: the model's; fashion-mnist for the default model: "
                        "grayscale, Fashion-MNIST mean/std; imagenet otherwise: resize 256, centre crop, normalise)")
    p.add_argument("--seed", type=int, default=0, help=seed_help or "seed of the image choice (default 0)")


def add_chain_model_args(p, images_help: str, pre_for: str = "--images") -> None:
    """Adds the options of a command that runs a chain's model on the chain's images (``export``,
    ``analyze``, ``report``): ``--model``, ``--weights``, ``--num-classes`` (default: the chain's
    model), ``--images`` (``images_help``), ``--size`` and ``--preprocessing`` (of ``pre_for``;
    default: as the chain's images, else the model's)."""
    p.add_argument("--model", default=None, help="'default' or torchvision:NAME (default: the chain's model)")
    p.add_argument("--weights", default=None, help="state_dict file for --model torchvision:NAME")
    p.add_argument("--num-classes", type=int, default=None, help="outputs of a torchvision model")
    p.add_argument("--images", default=None, help=images_help)
    p.add_argument("--size", type=int, default=None,
                   help=f"image size for {pre_for} (default: as the chain's images, else the model's)")
    p.add_argument("--preprocessing", choices=["imagenet", "fashion-mnist", "none"], default=None,
                   help=f"preprocessing of {pre_for} (default: as the chain's images, else the model's)")


def csv_list(text: Optional[str], arg: str = "--classes") -> Optional[List[str]]:
    """``"a, b"`` -> ``["a", "b"]``; ValueError for a list without names or with repeats."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{arg} must be a comma-separated list of class names, got {text!r}")
    repeated = sorted({t for t in items if items.count(t) > 1})
    if repeated:
        raise ValueError(f"{arg} must not repeat a class, got {', '.join(repeated)} more than once in {text!r}")
    return items


def parse_target(text: str) -> Union[str, int]:
    """``--target``: ``'pred'`` (the predicted class) or a class index (an int >= 0); ValueError
    naming --target otherwise. Whether the index is below the model's outputs is checked by the
    library once the model is loaded."""
    if text == "pred":
        return "pred"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--target must be 'pred' or a class index (an int >= 0), got {text!r}") from None
    if value < 0:
        raise ValueError(f"--target must be 'pred' or a class index (an int >= 0), got {value}")
    return value


def check_input_args(args) -> None:
    """ValueError for every out-of-range number or option that does not apply, before any work."""
    if args.per_class is not None and args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    if args.size is not None and not 1 <= args.size <= MAX_SIZE:
        raise ValueError(f"--size must be between 1 and {MAX_SIZE} pixels, got {args.size}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.confident is not None and not (math.isfinite(args.confident) and 0.0 < args.confident <= 1.0):
        raise ValueError(f"--confident must be a probability in (0, 1], got {args.confident}")
    if args.images is None:
        for flag, value in (("--size", args.size), ("--preprocessing", args.preprocessing)):
            if value is not None:
                raise ValueError(f"{flag} applies to --images DIR (the shipped images are Fashion-MNIST's 28x28)")
    else:
        if not os.path.isdir(args.images):
            what = "is not a folder" if os.path.exists(args.images) else "does not exist"
            raise ValueError(f"--images {args.images!r} {what}; expected a folder of images or of class sub-folders")
        if args.confident is not None:
            raise ValueError("--confident applies to the shipped images only, not to --images DIR")


def in_channels(model: nn.Module) -> int:
    """Input channels of the model's first conv (3 when it has none)."""
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _per_class(args) -> int:
    return getattr(args, "per_class_default", DEFAULT_PER_CLASS) if args.per_class is None else args.per_class


def _default_images(args) -> Tuple[torch.Tensor, str, Dict[str, Any]]:
    from nchains.models.image_source import default_source, images_from_source

    confident = getattr(args, "confident_default", DEFAULT_CONFIDENT) if args.confident is None else args.confident
    source = default_source(csv_list(args.classes), _per_class(args), args.seed, confident)
    try:
        images, what = images_from_source(source)
    except ValueError as exc:  # name the CLI flags, not the Python arguments
        text = str(exc).replace("per_class", "--per-class").replace("classes:", "--classes:", 1)
        raise ValueError(text.replace("confident=None", "a lower --confident")) from None
    return images, what, source


def _folder_images(args, spec, model, warn) -> Tuple[torch.Tensor, Optional[List[str]], str, Dict[str, Any]]:
    """Images, output names, description and record of ``--images DIR``."""
    from nchains.models.class_names import label_agreement, name_classes
    from nchains.models.image_source import folder_selection, folder_source
    from nchains.models.spec import spec_class_names, spec_preprocessing

    pre = spec_preprocessing(spec, in_channels(model))
    per_class = _per_class(args)
    source = folder_source(args.images, size=args.size or pre["size"],
                           preprocessing=args.preprocessing or pre["preprocessing"], grayscale=pre["grayscale"],
                           classes=csv_list(args.classes), per_class=per_class)
    sel = folder_selection(source)
    short = {c: n for c, n in sel.available.items() if n < per_class}
    if args.per_class is not None and short:
        warn(f"--per-class {per_class} but the folder has fewer images: "
             + ", ".join(f"{c} {n}" for c, n in short.items()) + f"; using all of them ({len(sel.images)} images)")
    elif args.per_class is not None and sel.labels is None:
        warn(f"--per-class applies to class sub-folders; {args.images!r} is a flat folder, using all its "
             f"{len(sel.images)} images")
    with torch.no_grad():
        logits = model(sel.images)
    naming = name_classes(sel.folder_classes, spec_class_names(spec, logits.shape[1]), logits.shape[1],
                          default_model=spec.get("kind") == "default")
    if naming.how == "model-unmatched":
        warn(f"the class sub-folders {sel.folder_classes} are not all class names of the model; the model's "
             "names are used and the folder labels are not checked")
    elif naming.output_of is not None and sel.labels is not None:
        agree = label_agreement(logits, sel.labels, naming.output_of)
        if agree < _LOW_AGREEMENT:
            warn(f"the original model classifies only {agree:.0%} of the images as their folder's class; the "
                 f"results describe the model on inputs it does not recognise (check --preprocessing/--size: "
                 f"applied {source['preprocessing']} at {source['size']}x{source['size']})")
    what = (f"{len(sel.images)} images from {source['path']} ({source['preprocessing']} preprocessing, "
            f"{source['size']}x{source['size']}{', grayscale' if source['grayscale'] else ''})")
    return sel.images, naming.class_names, what, source


def load_inputs(args, warn: Callable[[str], None]) -> Inputs:
    """The model and images the options of :func:`add_input_args` name (checked first).

    Args:
        args (argparse.Namespace): parsed options of a parser given :func:`add_input_args`.
        warn (callable): ``warn(text)`` reports a doubt that does not stop the run.

    Returns:
        Inputs.
    """
    from nchains.models import zoo
    from nchains.models.spec import load_model, parse_model_spec

    check_input_args(args)
    spec = parse_model_spec(args.model, args.weights, args.num_classes)
    if spec["kind"] == "default" and args.images is None:
        model = load_model(spec)
        images, what, source = _default_images(args)
        return Inputs(spec, model, images, zoo.default_class_names(), what, source)
    if args.images is None:
        raise ValueError("--images DIR is required with a --model other than the default")
    model = load_model(spec)
    images, class_names, what, source = _folder_images(args, spec, model, warn)
    return Inputs(spec, model, images, class_names, what, source)
