"""Models and their data: the shipped model (:mod:`.zoo`), model specs (:mod:`.spec`), image
folders (:mod:`.images`), image-source records (:mod:`.image_source`) and ``--model FILE``
import (:mod:`.file_import`)."""

from nchains.models import zoo
from nchains.models.spec import load_model, parse_model_spec

__all__ = ["load_model", "parse_model_spec", "zoo"]
