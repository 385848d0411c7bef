"""The ``nchains`` command line: :mod:`.main` (parser, error handling) and one module per
command (:mod:`.extract`, :mod:`.export`, :mod:`.inspect`)."""

from nchains.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
