"""An export (and a chain JSON) is all or nothing: killed at any step, the destination holds the
previous complete result or the new one; the next run cleans what a killed run left; files
honour the umask; a manifest never points outside its folder.

Kill tests run an export in a subprocess that stops at a named step (the test-only hook
``NCHAINS_TEST_PAUSE_AT``) and SIGKILL it there, so the timing is deterministic.
"""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from _default_chain import default_chain
from nchains._util.io import write_atomic
from nchains._util.publish import StagedFolder, clean_leftovers
from nchains.export.artifacts import inspect_artifact
from nchains.export.exporter import export
from nchains.export.folder import replace_problem
from nchains.neurochains.chain import Chain

_EXPORT = ("import sys\n"
           "from nchains.neurochains.chain import Chain\n"
           "from nchains.models import zoo\n"
           "from nchains.export.exporter import export\n"
           "export(Chain.load(sys.argv[1]), zoo.default_model(), sys.argv[2], formats=sys.argv[3])\n")
_SAVE = ("import sys\n"
         "from nchains.neurochains.chain import Chain\n"
         "c = Chain.load(sys.argv[1]); c.class_names = [f'renamed{i}' for i in range(10)]; c.save(sys.argv[2])\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, _, chain = default_chain()
    base = tmp_path_factory.mktemp("publish")
    chain_path = base / "chain.json"
    chain.save(chain_path)
    old = base / "old"
    export(chain, model, old, formats="pt2")
    return model, chain, chain_path, old


def _killed_at(step, script, args, extra_env=None):
    """Runs ``script`` in a subprocess until it pauses at ``step``, then SIGKILLs it."""
    env = {**os.environ, "NCHAINS_TEST_PAUSE_AT": step, **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(600, proc.kill)  # a broken hook must not hang the suite
    watchdog.start()
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.strip() == f"nchains-test-paused {step}":
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"never paused at {step}: {''.join(seen)[-3000:]}"


def _same_tree(a, b):
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    match, mismatch, errors = filecmp.cmpfiles(a, b, os.listdir(a), shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def _formats_in(out):
    report = inspect_artifact(out)
    assert report["ok"], report["checks"]
    return sorted(report["metadata"]["artifacts"])


def test_kill_while_writing_fresh_export_then_next_export_cleans(setup, tmp_path):
    model, chain, chain_path, _ = setup
    out = tmp_path / "out"
    _killed_at("partial:chain.ts", _EXPORT, [chain_path, out, "ts"])
    assert not out.exists()  # nothing half-written under the destination's name
    left = [n for n in os.listdir(tmp_path) if ".nchains-staging-" in n]
    assert len(left) == 1 and os.listdir(tmp_path / left[0]) == ["chain.ts"]
    old_umask = os.umask(0o022)
    try:
        export(chain, model, out, formats="ts")
    finally:
        os.umask(old_umask)
    assert os.listdir(tmp_path) == ["out"]  # the killed run's staging folder is gone
    assert sorted(os.listdir(out)) == ["chain.ts", "manifest.json"]
    assert _formats_in(out) == ["torchscript"]
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o755)
    assert {oct(os.stat(out / f).st_mode & 0o777) for f in os.listdir(out)} == {oct(0o644)}


@pytest.mark.parametrize("step, published", [pytest.param("staging-created", False, marks=pytest.mark.slow),
                                             pytest.param("partial:chain.ts", False, marks=pytest.mark.slow),
                                             ("before-publish", False), ("after-publish", True)])
def test_kill_over_previous_export_keeps_old_or_new(setup, tmp_path, step, published):
    _, _, chain_path, old = setup
    out = tmp_path / "out"
    shutil.copytree(old, out)
    _killed_at(step, _EXPORT, [chain_path, out, "ts"])
    if published:
        assert sorted(os.listdir(out)) == ["chain.ts", "manifest.json"] and _formats_in(out) == ["torchscript"]
    else:
        _same_tree(out, old)
        assert _formats_in(out) == ["pt2"]
    after = sorted(os.listdir(out))
    clean_leftovers(out)  # what the next export does first
    assert os.listdir(tmp_path) == ["out"] and sorted(os.listdir(out)) == after


def test_kill_between_renames_restores_previous_export(setup, tmp_path):
    _, _, chain_path, old = setup
    out = tmp_path / "out"
    shutil.copytree(old, out)
    # where the kernel cannot exchange two names, publishing takes two renames
    _killed_at("between-renames", _EXPORT, [chain_path, out, "ts"], {"NCHAINS_TEST_NO_EXCHANGE": "1"})
    assert not out.exists()
    aside = [n for n in os.listdir(tmp_path) if ".nchains-old-" in n]
    assert len(aside) == 1
    _same_tree(tmp_path / aside[0], old)
    clean_leftovers(out)
    assert os.listdir(tmp_path) == ["out"]
    _same_tree(out, old)
    assert _formats_in(out) == ["pt2"]


def test_export_over_older_export_leaves_only_new_files(setup, tmp_path):
    model, chain, _, old = setup
    out = tmp_path / "out"
    shutil.copytree(old, out)
    (out / ".tmp-abc123chain.ts").write_bytes(b"partial")  # what nchains <= 0.x left after a kill
    old_umask = os.umask(0o077)
    try:
        manifest = export(chain, model, out, formats="ts")
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(out)) == ["chain.ts", "manifest.json"]
    assert os.listdir(tmp_path) == ["out"]
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert _formats_in(out) == ["torchscript"]
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o700)
    assert {oct(os.stat(out / f).st_mode & 0o777) for f in os.listdir(out)} == {oct(0o600)}


@pytest.mark.parametrize("exchange", ["1", "0"])
@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o027, 0o640, 0o750)])
def test_staged_folder_publishes_whole_set_with_umask(tmp_path, monkeypatch, exchange, umask, file_mode, dir_mode):
    if exchange == "0":
        monkeypatch.setenv("NCHAINS_TEST_NO_EXCHANGE", "1")
    out = tmp_path / "deep" / "out"
    old_umask = os.umask(umask)
    try:
        for files in ({"a.bin": b"1", "manifest.json": b"{}"}, {"b.bin": b"22"}):
            with StagedFolder(out, lambda folder: None) as staging:
                for name, data in files.items():
                    staging.write(name, data)
                staging.publish()
            assert {n: (out / n).read_bytes() for n in os.listdir(out)} == files
        write_atomic(tmp_path / "deep" / "chain.json", "{}")
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(tmp_path / "deep")) == ["chain.json", "out"]
    for folder in (tmp_path / "deep", out):
        assert oct(os.stat(folder).st_mode & 0o777) == oct(dir_mode)
    for f in (out / "b.bin", tmp_path / "deep" / "chain.json"):
        assert oct(os.stat(f).st_mode & 0o777) == oct(file_mode)


def test_refuses_current_folder_and_above(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for out in (".", "..", str(tmp_path), "/"):
        with pytest.raises(ValueError, match="is the current folder, one above it or the root"):
            with StagedFolder(out, lambda folder: None):
                pass
    assert os.listdir(tmp_path) == ["work"] and os.listdir(tmp_path / "work") == []


def test_failed_work_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with StagedFolder(out, lambda folder: None) as staging:
            staging.write("a.bin", b"1")
            raise RuntimeError("verification failed")
    assert os.listdir(tmp_path) == []  # neither the staging folder nor the parents it made


def test_leftovers_of_live_runs_and_other_names_are_kept(tmp_path):
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = [f".out.nchains-staging-{live.pid}-ab12", f".out.nchains-staging-{dead.pid}-cd34",
                 f".out.nchains-old-{dead.pid}-ef56", f".other.nchains-staging-{dead.pid}-0a0b", "notes"]
        for n in names:
            (tmp_path / n).mkdir()
        (tmp_path / names[2] / "manifest.json").write_text("{}")
        clean_leftovers(out)
        # the dead run's folder set aside while out was missing is the previous export: restored
        assert sorted(os.listdir(tmp_path)) == sorted([names[0], names[3], "notes", "out"])
        assert os.listdir(out) == ["manifest.json"]
        clean_leftovers(out)
        assert sorted(os.listdir(tmp_path)) == sorted([names[0], names[3], "notes", "out"])
    finally:
        live.kill()
        live.wait()


def test_replace_problem(setup, tmp_path):
    _, _, _, old = setup
    assert replace_problem(str(old)) is None
    (tmp_path / "empty").mkdir()
    assert replace_problem(str(tmp_path / "empty")) is None
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    assert "manifest.json" in replace_problem(str(user))
    mixed = tmp_path / "mixed"
    shutil.copytree(old, mixed)
    for leftover in (".nchains-probe-k2x_9q", ".tmp-abc123chain.ts", f".manifest.json.nchains-tmp-{os.getpid()}-0f"):
        (mixed / leftover).write_text("")  # what killed runs of nchains left inside an export
    assert replace_problem(str(mixed)) is None
    (mixed / "notes.txt").write_text("mine")
    assert "'notes.txt'" in replace_problem(str(mixed))
    (mixed / "notes.txt").unlink()
    (mixed / "sub").mkdir()
    assert "'sub'" in replace_problem(str(mixed))


def test_export_refuses_foreign_folder_and_file(setup, tmp_path):
    model, chain, _, _ = setup
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="not an nchains export"):
        export(chain, model, user, formats="ts")
    assert os.listdir(user) == ["thesis.tex"] and sorted(os.listdir(tmp_path)) == ["user"]
    with pytest.raises(ValueError, match="not a directory"):
        export(chain, model, user / "thesis.tex", formats="ts")
    assert (user / "thesis.tex").read_text() == "mine"


def _tamper(folder, file_value):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"]["pt2"]["file"] = file_value
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("value", ["../other/chain.pt2", "/etc/passwd", "sub/chain.pt2", "..", ".", "", None, 5,
                                   "..\\other\\chain.pt2", "chain.pt2\x00"])
def test_inspect_refuses_paths_leaving_the_folder(setup, tmp_path, value):
    _, _, _, old = setup
    exp, other = tmp_path / "exp", tmp_path / "other"
    shutil.copytree(old, exp)
    shutil.copytree(old, other)  # following "../other/chain.pt2" would find a genuine artifact
    (exp / "sub").mkdir()
    shutil.copy(old / "chain.pt2", exp / "sub" / "chain.pt2")
    _tamper(exp, value)
    for target in (exp, exp / "manifest.json", exp / "chain.pt2"):
        with pytest.raises(ValueError, match=r"artifacts\.pt2\.file"):
            inspect_artifact(target)


def test_inspect_symlinks(setup, tmp_path):
    _, _, _, old = setup
    exp = tmp_path / "exp"
    shutil.copytree(old, exp)
    (exp / "chain.pt2").rename(exp / "real.pt2")
    os.symlink("real.pt2", exp / "chain.pt2")  # inside the folder: allowed
    assert inspect_artifact(exp)["ok"]
    (exp / "chain.pt2").unlink()
    shutil.copytree(old, tmp_path / "other")
    os.symlink(tmp_path / "other" / "chain.pt2", exp / "chain.pt2")
    with pytest.raises(ValueError, match=r"artifacts\.pt2\.file: 'chain.pt2' is a symlink leaving"):
        inspect_artifact(exp)


def test_kill_while_saving_chain_keeps_old_then_cleans(setup, tmp_path):
    _, chain, chain_path, _ = setup
    dst = tmp_path / "chain.json"
    shutil.copy(chain_path, dst)
    before = dst.read_bytes()
    _killed_at("tmp-written:chain.json", _SAVE, [chain_path, dst])
    assert dst.read_bytes() == before
    temps = [n for n in os.listdir(tmp_path) if n.startswith(".chain.json.nchains-tmp-")]
    assert len(temps) == 1
    renamed = json.loads((tmp_path / temps[0]).read_text())["class_names"]
    assert renamed == [f"renamed{i}" for i in range(10)]  # the new chain was complete but never renamed
    chain.save(tmp_path / "other.json")  # any later save into the folder cleans the killed run's temp
    assert sorted(os.listdir(tmp_path)) == ["chain.json", "other.json"]
    assert Chain.load(dst).class_names == chain.class_names
