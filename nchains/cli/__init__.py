"""The ``nchains`` command line: :mod:`.main` (parser, error handling, ``extract``) and one
module per further command."""

from nchains.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
