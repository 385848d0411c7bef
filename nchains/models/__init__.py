"""Models and their data: the shipped model (:mod:`.zoo`, its data :mod:`.fashion_mnist`), model
specs with their preprocessing and class names (:mod:`.spec`), ``--weights`` files
(:mod:`.weights`), image folders (:mod:`.images`), image-source records (:mod:`.image_source`),
naming a folder's classes (:mod:`.class_names`) and ``--model FILE`` import (:mod:`.file_import`)."""

from nchains.models import zoo
from nchains.models.spec import load_model, parse_model_spec

__all__ = ["load_model", "parse_model_spec", "zoo"]
