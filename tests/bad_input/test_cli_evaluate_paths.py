"""Bad arguments to ``nchains evaluate-paths``: each is refused before any work (exit 2, one line,
no traceback, nothing written), with a message naming the argument and what is accepted."""

import json

import pytest


@pytest.mark.parametrize("argv,needle", [
    # methods
    (["--methods", "intgrad,lrp"], "--methods: unknown method 'lrp'; accepted: intgrad, mct"),
    (["--methods", ","], "--methods must be a comma-separated list"),
    (["--methods", "mct,mct"], "--methods must not repeat"),
    (["--methods", "mct", "--sanity-methods", "input-mct"], "--sanity-methods: unknown method 'input-mct'"),
    # sparsities
    (["--sparsity", "1.5"], "--sparsity must be numbers in [0, 1], got 1.5"),
    (["--sparsity", "0.9,abc"], "--sparsity must be numbers in [0, 1], got 'abc'"),
    (["--sparsity", "nan"], "--sparsity must be numbers in [0, 1]"),
    (["--sparsity", "0.9,0.9"], "--sparsity must not repeat a value"),
    (["--sparsity", ""], "--sparsity must be 1 to 32"),
    # schedules
    (["--steps", "0"], "--steps must be an int in [1, 100000], got 0"),
    (["--steps", "x"], "argument --steps: invalid int value"),
    (["--dgr-steps", "0"], "--dgr-steps must be an int in [1, 1000000], got 0"),
    (["--dgr-lam", "-1"], "--dgr-lam must be a number in [0, 1e+06], got -1.0"),
    (["--dgr-lam", "nan"], "--dgr-lam must be a number in [0"),
    (["--dgr-lr", "0"], "--dgr-lr must be a number in (0, 1e+06], got 0.0"),
    (["--dgr-lr", "inf"], "--dgr-lr must be a number in (0"),
    (["--greedy-step", "0"], "--greedy-step must be a number in (0, 1], got 0.0"),
    (["--greedy-step", "2"], "--greedy-step must be a number in (0, 1], got 2.0"),
    (["--batch", "0"], "--batch must be an int in [1, 10000], got 0"),
    (["--sanity-images", "-1"], "--sanity-images must be an int in [0, 100000], got -1"),
    (["--fill", "noise"], "argument --fill: invalid choice: 'noise'"),
    # the shared model and image options
    (["--per-class", "0"], "--per-class must be >= 1, got 0"),
    (["--classes", "sneaker,unicorn"], "unknown class 'unicorn'"),
    (["--size", "32"], "--size applies to --images DIR"),
    (["--model", "missing.pt2"], "--model 'missing.pt2' does not exist or is not a file"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    # the output
    (["--out", "/proc/nchains-test/out"], "cannot"),
])
def test_bad_argument_is_refused_before_work(refused, argv, needle):
    argv = [*argv, "--out", "evaluation"] if "--out" not in argv else argv
    refused(["evaluate-paths", *argv], needle)


def test_out_must_be_given(refused):
    refused(["evaluate-paths"], "the following arguments are required: --out")


def test_out_that_is_a_file_is_refused(refused, tmp_path):
    (tmp_path / "f").write_text("x")
    refused(["evaluate-paths", "--out", "f"], "exists and is not a directory")


def test_foreign_folder_is_not_replaced(refused, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused(["evaluate-paths", "--out", "mine"], "no nchains results.json in it")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_earlier_output_with_a_foreign_file_is_not_replaced(refused, tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"format": "nchains-evaluate-paths", "files": ["lerf.png"]}))
    (out / "lerf.png").write_bytes(b"png")
    (out / "mine.txt").write_text("keep me")
    refused(["evaluate-paths", "--out", "ev"], "it holds 'mine.txt' besides an nchains evaluate-paths output")


def test_current_folder_is_refused(refused):
    refused(["evaluate-paths", "--out", "."], "is the current folder")
