"""The Chain artifact: persistence, application to the model, comparison, reports."""

import json
import os

import pytest
import torch

import nchains
from nchains import Chain

from _models import DigitsNet, digits_region, trained_digits_net


@pytest.fixture(scope="module")
def chains():
    net = trained_digits_net()
    a_images, _ = digits_region((3, 8))
    b_images, _ = digits_region((1, 7))
    kw = dict(steps=60, finetune_steps=10, lam=0.004, lam_gate=0.3)
    return net, a_images, nchains.extract(net, a_images, **kw), nchains.extract(net, b_images, **kw)


def test_save_load_round_trip(tmp_path, chains):
    net, images, chain, _ = chains
    path = tmp_path / "chain.json"
    chain.save(path)
    loaded = Chain.load(path)
    assert loaded.to_dict() == json.loads(json.dumps(chain.to_dict()))
    with torch.no_grad():
        torch.testing.assert_close(loaded.apply(net)(images), chain.apply(net)(images), rtol=0, atol=0)
    data = json.loads(path.read_text())
    assert data["format"] == "nchains.chain" and data["version"] == 3
    assert "strongest_filters" in data and "paths" not in data
    assert data["images_source"] is None  # extracted from Python on a tensor: no record of its choice


def test_version_1_file_without_images_source_loads(tmp_path, chains):
    _, _, chain, _ = chains
    data = json.loads(json.dumps(chain.to_dict()))
    del data["images_source"]
    data["paths"] = data.pop("strongest_filters")  # its name before version 3
    data["version"] = 1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = Chain.load(path)
    assert loaded.images_source is None
    assert {k: v for k, v in loaded.to_dict().items() if k != "version"} == \
        {k: v for k, v in json.loads(json.dumps(chain.to_dict())).items() if k != "version"}


def test_save_is_atomic(tmp_path, chains, monkeypatch):
    _, _, chain, _ = chains
    path = tmp_path / "chain.json"
    path.write_text("previous")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(RuntimeError):
        chain.save(path)
    assert path.read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["chain.json"]


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"), ("not json", "not a chain JSON file"), ('{"a": 1}', "not an nchains chain"),
    ('{"format": "nchains.chain", "version": 99}', "version 99 is not supported"),
    ('{"format": "nchains.chain", "version": 1, "kept": {}}', "malformed chain"),
])
def test_load_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match):
        Chain.load(path)


def test_apply_refuses_another_model(chains):
    _, _, chain, _ = chains
    with pytest.raises(ValueError, match="weights hash"):
        chain.apply(DigitsNet())


def test_jaccard_and_shared_match_set_arithmetic(chains):
    _, _, a, b = chains
    sa = {(l, i) for l, idx in a.kept.items() for i in idx}
    sb = {(l, i) for l, idx in b.kept.items() for i in idx}
    assert a.jaccard(b) == pytest.approx(len(sa & sb) / len(sa | sb))
    assert a.jaccard(b) == b.jaccard(a)
    assert a.jaccard(a) == 1.0
    shared = a.shared(b)
    assert {(l, i) for l, idx in shared.items() for i in idx} == sa & sb
    assert all(idx == sorted(idx) and idx for idx in shared.values())
    with pytest.raises(TypeError, match="other must be a Chain"):
        a.jaccard("b")


def test_summary_lists_every_layer_and_the_metrics(chains):
    _, _, chain, _ = chains
    text = chain.summary()
    for name, size in chain.layer_sizes.items():
        assert f"{len(chain.kept[name])}/{size}" in text
        assert chain.labels[name] in text
    assert f"filters kept {chain.metrics['filters_kept']}/{chain.metrics['filters_total']}" in text
    assert "Conv1" in text and "L2B1SC" in text


def _hand_made_chain(**changes) -> Chain:
    """A small chain written out by hand: four layers of 16 filters, one removed block."""
    fields = dict(
        kept={"conv1": [2, 5, 9], "layer1.0.conv1": [], "layer1.0.conv2": [], "layer2.0.conv1": [0, 11]},
        scores={"conv1": [0.5, 1.25, 0.75], "layer1.0.conv1": [], "layer1.0.conv2": [],
                "layer2.0.conv1": [1.0, 0.2]},
        gates={"layer1.0": 0}, config={}, seed=0, model_hash="a" * 64, images_hash="b" * 64,
        metrics={"filters_kept": 5, "filters_total": 64, "layers_kept": 2, "layers_total": 4},
        layer_sizes={"conv1": 16, "layer1.0.conv1": 16, "layer1.0.conv2": 16, "layer2.0.conv1": 16},
        labels={"conv1": "Conv1", "layer1.0.conv1": "L1B1C1", "layer1.0.conv2": "L1B1C2", "layer1.0": "L1B1"},
        regions={"layer1.0": {"kind": "block", "layers": ["layer1.0.conv1", "layer1.0.conv2"]}},
        classes=[0, 2, 7], class_names=["zero", "one", "two"],
        strongest_filters={"2": [["conv1", 5, 0.7], ["layer2.0.conv1", 11, 0.3]],
                           "0": [["conv1", 9, 0.1], ["layer2.0.conv1", 0, 0.05]],
                           "7": []})
    fields.update(changes)
    return Chain(**fields)


def test_describe_is_paper_style():
    # layer2.0.conv1 has no label: its filters are named by module path; class 7 has no name
    assert _hand_made_chain().describe() == (
        "Inference chain: 5/64 filters, 2/4 layers\n"
        "two: Conv1_5 → layer2.0.conv1_11\n"
        "zero: Conv1_9 → layer2.0.conv1_0\n"
        "7: (empty)")
    assert _hand_made_chain(class_names=None, strongest_filters={"1": [["conv1", 2, 1.0]]}).describe() == (
        "Inference chain: 5/64 filters, 2/4 layers\n"
        "1: Conv1_2")
