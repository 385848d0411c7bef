"""Which existing ``--out`` folders ``nchains ssa``, ``analyze`` and ``report`` replace: an
empty folder, or an earlier output of the same command holding exactly the files its index
lists (ssa's summary.json, analyze's results.json ``files``, the report's report.json). Anything
else (a foreign file alone, a foreign file or a sub-folder beside an earlier output, an index of
another kind) is refused before any work with one line naming --out and the foreign entry, and
the folder is left as it was.

Each command runs twice for real, on cheap settings: once into an empty folder (the earlier
output the refusals start from) and once over that output with settings that write fewer files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from nchains import cli
from nchains.models import zoo

from _analyses_cli_chain import write_chain

pytestmark = pytest.mark.usefixtures("one_thread")

BAG, SNEAKER = "08-bag", "07-sneaker"  # the shipped model's outputs 8 and 7
GRAPH_FILES = ("json", "graphml", "dot", "svg")


def _report_chain(folder: Path) -> str:
    """A chain of the shipped model that records its model and images and keeps few filters (a
    high lam and lr: the report's page, one strip per kept filter, is written in seconds)."""
    from nchains.models.image_source import default_source
    from nchains.neurochains.extraction import extract

    classes = ["sneaker", "ankle-boot"]
    images, _, _ = zoo.default_images(classes, per_class=2, seed=0, confident=None)
    torch.manual_seed(0)
    chain = extract(zoo.default_model(), images, steps=20, finetune_steps=0, seed=0, lam=1.0, lr=0.1,
                    model_spec={"kind": "default"}, progress=False)
    chain = dataclasses.replace(chain, images_source=default_source(classes, 2, 0, None))
    path = folder / "report-chain.json"
    chain.save(path)
    return str(path)


def _listed(folder: Path, command: str) -> list:
    """Every file the index of ``command``'s output in ``folder`` names, the index included."""
    if command == "ssa":
        s = json.loads((folder / "summary.json").read_text())
        files = [n for c in s["classes"] for n in c["files"].values()]
        return sorted(files + ([s["clusters"]["file"]] if s["clusters"] else []) + ["summary.json"])
    name = "results.json" if command == "analyze" else "report.json"
    return sorted(json.loads((folder / name).read_text())["files"] + [name])


def _argv(command: str, chains: dict, out, second: bool) -> list:
    """The command line of the first run (into an empty folder) or of the second (fewer files)."""
    if command == "ssa":
        classes = "bag" if second else "bag,sneaker"
        return ["ssa", "--classes", classes, "--per-class", "2", "--branching", "1", "--engine", "matplotlib",
                "--out", out, "--quiet"]
    if command == "analyze":
        which = "quotient" if second else "quotient,faithfulness"
        return ["analyze", chains["analyze"], "--which", which, "--out", out, "--quiet"]
    return ["report", chains["report"], "--analyses", "none" if second else "quotient", "--steps", "0", "--out", out,
            "--quiet"]


#: What each run writes, named independently of the indexes.
WRITTEN = {
    ("ssa", False): sorted([f"{s}.{e}" for s in (BAG, SNEAKER) for e in GRAPH_FILES] + ["dendrogram.png", "summary.json"]),
    ("ssa", True): sorted([f"{BAG}.{e}" for e in GRAPH_FILES] + ["summary.json"]),
    ("analyze", False): ["faithfulness.png", "quotient.png", "results.json"],
    ("analyze", True): ["quotient.png", "results.json"],
    ("report", False): ["analyses.json", "index.html", "report.json"],
    ("report", True): ["index.html", "report.json"],
}
COMMANDS = ("ssa", "analyze", "report")


def _run(argv) -> None:
    assert cli.main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chains")
    return {"analyze": write_chain(folder), "report": _report_chain(folder)}


class _Earlier(dict):
    """command -> an output folder of it, written (on first use) into a folder that existed empty."""

    def __init__(self, tmp_path_factory, chains):
        super().__init__()
        self.factory, self.chains = tmp_path_factory, chains

    def __missing__(self, command: str) -> Path:
        out = self.factory.mktemp(f"earlier-{command}") / "out"
        out.mkdir()
        _run(_argv(command, self.chains, out, second=False))
        self[command] = out
        return out


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, chains):
    return _Earlier(tmp_path_factory, chains)


@pytest.mark.parametrize("command", COMMANDS)
def test_an_empty_folder_is_accepted_and_the_index_lists_every_file(earlier, command):
    out = earlier[command]
    assert sorted(os.listdir(out)) == WRITTEN[command, False] == _listed(out, command)


@pytest.mark.parametrize("command", COMMANDS)
def test_an_earlier_output_is_replaced_as_a_whole(earlier, chains, tmp_path, command):
    out = tmp_path / "out"
    shutil.copytree(earlier[command], out)
    _run(_argv(command, chains, out, second=True))
    assert sorted(os.listdir(out)) == WRITTEN[command, True] == _listed(out, command)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def _copy(earlier, command: str, tmp_path: Path) -> Path:
    out = tmp_path / "mine"
    shutil.copytree(earlier[command], out)
    return out


def _refused_naming(refused, command, chains, out: Path, foreign: str, why: str):
    r = refused(_argv(command, chains, out.name, second=True), f"--out {out.name!r}", watch=[out])
    assert f"{foreign!r}" in r.lines[0] and why in r.lines[0], r.lines[0]
    return r


INDEX = {"ssa": "summary.json", "analyze": "results.json", "report": "report.json"}
#: How the refusal names an earlier output of each command.
KIND = {"ssa": "ssa output", "analyze": "analyze output", "report": "report"}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_foreign_file_alone_is_refused(refused, chains, tmp_path, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = _refused_naming(refused, command, chains, out, "notes.txt", f"no nchains {INDEX[command]} in it")
    assert f"is a non-empty folder that is not an nchains {KIND[command]} (" in r.lines[0], r.lines[0]
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_foreign_file_beside_an_earlier_output_is_refused(refused, earlier, chains, tmp_path, command):
    out = _copy(earlier, command, tmp_path)
    (out / "notes.txt").write_text("keep me")
    _refused_naming(refused, command, chains, out, "notes.txt", f"besides an nchains {command} output")
    assert sorted(os.listdir(out)) == sorted(WRITTEN[command, False] + ["notes.txt"])


@pytest.mark.parametrize("command", COMMANDS)
def test_a_subfolder_beside_an_earlier_output_is_refused(refused, earlier, chains, tmp_path, command):
    out = _copy(earlier, command, tmp_path)
    (out / "figures").mkdir()
    (out / "figures" / "mine.png").write_bytes(b"keep me")
    _refused_naming(refused, command, chains, out, "figures", f"besides an nchains {command} output")
    assert (out / "figures" / "mine.png").read_bytes() == b"keep me"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_listed_name_that_is_a_folder_is_refused(refused, earlier, chains, tmp_path, command):
    """A sub-folder under a name the index lists is not the command's file."""
    out = _copy(earlier, command, tmp_path)
    victim = WRITTEN[command, False][0]
    (out / victim).unlink()
    (out / victim).mkdir()
    (out / victim / "thesis.tex").write_text("keep me")
    _refused_naming(refused, command, chains, out, victim, f"besides an nchains {command} output")


@pytest.mark.parametrize("command", COMMANDS)
def test_an_index_of_another_kind_is_refused(refused, chains, tmp_path, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / INDEX[command]).write_text(json.dumps({"format": "something-else", "files": ["notes.txt"]}))
    (out / "notes.txt").write_text("keep me")
    _refused_naming(refused, command, chains, out, "notes.txt",
                    f"its {INDEX[command]} is not an nchains {command} index")


def test_an_analyze_output_that_does_not_list_its_files_gets_one_png_per_analysis(refused, earlier, chains,
                                                                                  tmp_path):
    """results.json of an nchains that did not write ``files``: its PNGs are one per analysis it
    holds; such an output is replaced, one with another PNG beside it refused."""
    out = _copy(earlier, "analyze", tmp_path)
    results = json.loads((out / "results.json").read_text())
    del results["files"]
    (out / "results.json").write_text(json.dumps(results))
    (out / "robustness.png").write_bytes(b"not of this output")  # robustness did not run
    _refused_naming(refused, "analyze", chains, out, "robustness.png", "besides an nchains analyze output")
    (out / "robustness.png").unlink()
    _run(_argv("analyze", chains, out, second=True))
    assert sorted(os.listdir(out)) == WRITTEN["analyze", True]


def test_a_report_folder_without_report_json_is_refused(refused, earlier, chains, tmp_path):
    """index.html and analyses.json alone may be anyone's (an nchains before report.json, or the
    user's own page): without the index that lists them they are not replaced."""
    out = _copy(earlier, "report", tmp_path)
    (out / "report.json").unlink()
    _refused_naming(refused, "report", chains, out, "analyses.json", "no nchains report.json in it")
