"""The ``nchains inspect`` command: describe and verify an export folder, a manifest, an artifact
or a chain JSON. The exit code is 1 when an artifact is tampered, missing or unreadable."""

from __future__ import annotations

import json


def add_command(subparsers) -> None:
    """Registers ``inspect`` on an argparse sub-parsers object."""
    q = subparsers.add_parser(
        "inspect", help="describe and verify an exported artifact or manifest",
        description="Show the layers and filters kept, parameters, MACs (multiply-accumulates) and their ratio to "
                    "the original, the classes (region) the chain was extracted for, class names and verification "
                    "status of an export folder, its manifest.json, chain.ts/.onnx/.pt2/.aoti.pt2 or a chain JSON, "
                    "and which runtime loads each file. Artifacts are re-hashed against the manifest: a tampered "
                    "file is reported and the exit code is 1.")
    q.add_argument("file", help="export folder, manifest.json, chain.ts, chain.onnx, chain.pt2, chain.aoti.pt2 or "
                                "chain JSON")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from nchains.export.artifacts import format_report, inspect_artifact

    report = inspect_artifact(args.file)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1
