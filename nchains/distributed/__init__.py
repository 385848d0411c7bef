"""Ray batch runs and serving (optional: ``pip install nchains[ray]``).

Importing this package does not import Ray; the functions that need it import it when called
and raise a one-line ValueError (``... needs Ray: pip install nchains[ray]``) without it.

- :func:`run_batch` with :func:`pair_regions` / :func:`load_region_spec`: one Ray task per
  region, resumable ``results.jsonl``, chains, exports, summary and plots.
- :class:`Predictor`: an export folder's model behind ``predict`` (no Ray needed);
  :func:`serve_export` puts it on Ray Serve (``POST /predict``, ``GET /``).
"""

from nchains.distributed.batch import region_key, run_batch
from nchains.distributed.predictor import Predictor, RequestError
from nchains.distributed.regions import load_region_spec, pair_regions
from nchains.distributed.serve import serve_export, stop_serving

__all__ = ["Predictor", "RequestError", "load_region_spec", "pair_regions", "region_key", "run_batch",
           "serve_export", "stop_serving"]
