"""Exporting chains as verified standalone models, and reading exported artifacts back.

:mod:`.exporter` builds, verifies and writes the artifacts; :mod:`.artifacts` reads and checks
an export folder, a manifest or one artifact without running model code.
"""

from nchains.export.artifacts import format_report, inspect_artifact, model_stats, read_embedded
from nchains.export.exporter import FORMATS, RTOL, ExportError, export

__all__ = ["ExportError", "FORMATS", "RTOL", "export", "format_report", "inspect_artifact", "model_stats",
           "read_embedded"]
