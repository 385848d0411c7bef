"""The ``nchains`` command line: the parser and the error handling; one module per command
(:mod:`.extract`, :mod:`.export`, :mod:`.inspect`).

Bad input is reported as one line ``nchains: error: ...`` with exit code 2, never a traceback:
ValueError/TypeError (the library's argument checks), OSError (unreadable or unwritable files),
image-decoding errors and refused pickles. Anything else is a bug in nchains: one line, exit
code 1. ``nchains --debug COMMAND ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from typing import List, Optional

EXIT_USAGE = 2
EXIT_INTERNAL = 1
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"nchains: error: {message}\n")


def _expected_errors() -> tuple:
    """Exception types that mean bad input (the user can fix it), not a bug."""
    types = [ValueError, TypeError, OSError, EOFError, pickle.UnpicklingError]
    try:
        from PIL import Image

        types.append(Image.DecompressionBombError)  # not an OSError
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pass
    return tuple(types)


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal escape codes (the
    exception's type name when the message is empty)."""
    text = _ANSI.sub("", str(exc)).strip()
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename!r}"  # "[Errno 13] ..." reads worse
    return text.splitlines()[0].strip() if text else type(exc).__name__


def build_parser() -> argparse.ArgumentParser:
    from nchains.cli import analyze as cli_analyze
    from nchains.cli import batch as cli_batch
    from nchains.cli import contributions as cli_contributions
    from nchains.cli import evaluate_paths as cli_evaluate_paths
    from nchains.cli import export as cli_export
    from nchains.cli import extract as cli_extract
    from nchains.cli import inspect as cli_inspect
    from nchains.cli import serve as cli_serve
    from nchains.cli import paths as cli_paths
    from nchains.cli import report as cli_report
    from nchains.cli import ssa as cli_ssa

    parser = _Parser(prog="nchains", description="Extract, export and analyse local inference chains of CNNs.")
    parser.add_argument("--version", action="version", version=f"nchains {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback instead of a one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (cli_extract, cli_export, cli_inspect, cli_paths, cli_analyze, cli_contributions,
                   cli_evaluate_paths, cli_ssa, cli_report, cli_batch, cli_serve):
        module.add_command(sub)
    return parser


def _version() -> str:
    from nchains import __version__

    return __version__


def main(argv: Optional[List[str]] = None) -> int:
    """Runs ``nchains`` with ``argv`` (default ``sys.argv[1:]``) and returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("nchains: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as exc:
        print(f"nchains: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback behind --debug
        print(f"nchains: error: internal error ({type(exc).__name__}: {one_line(exc)}); "
              "run `nchains --debug ...` for the traceback", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
