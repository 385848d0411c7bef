"""Malformed chain JSON files: `nchains inspect` and `nchains export` refuse each with one line
naming the field (exit 2, no traceback, nothing written), and so does `Chain.from_dict`.

Every variant is the valid chain of a small model with one field broken, the way a hand edit,
a truncated script or a hostile file would break it."""

import json

import pytest

from nchains import Chain

from _small_chain import small_digits_chain


def _layer(d, kept=True):
    """The first layer with kept filters (or, with ``kept=False``, the first emptied one)."""
    return next(name for name, idx in d["kept"].items() if bool(idx) == kept)


def _region(d, gate):
    return next(name for name, g in d["gates"].items() if g == gate)


def _set(path, value):
    """A mutation setting ``d[path[0]][path[1]]...`` to ``value`` (callables get the dict)."""
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key(d) if callable(key) else key]
        last = path[-1]
        target[last(d) if callable(last) else last] = value(d) if callable(value) else value
    return mutate


def _unkept(d):
    """A filter index of the first kept layer that the chain does not keep."""
    return min(set(range(d["layer_sizes"][L(d)])) - set(d["kept"][L(d)]))


def _delete(key):
    return lambda d: d.pop(key)


L, E = _layer, (lambda d: _layer(d, kept=False))
# (id, mutation, needle in the one-line error)
VARIANTS = [
    ("index -1", _set(["kept", L, 0], -1), "kept['conv1'][0]: index -1 out of range [0, 16)"),
    ("index 9999", _set(["kept", L, 0], 9999), "kept['conv1'][0]: index 9999 out of range [0, 16)"),
    ("index float", _set(["kept", L, 0], 1.5), "kept['conv1'][0]: must be an int, got float"),
    ("index bool", _set(["kept", L, 0], True), "kept['conv1'][0]: must be an int, got bool"),
    ("index string", _set(["kept", L, 0], "3"), "kept['conv1'][0]: must be an int, got str"),
    ("duplicated index", _set(["kept", L], lambda d: [d["kept"][L(d)][0]] * 2), "repeats: kept indices must be"),
    ("unsorted", _set(["kept", L], lambda d: d["kept"][L(d)][::-1]), "is out of order"),
    ("kept a string", _set(["kept", L], "1,2,3"), "kept['conv1']: must be a list, got str"),
    ("kept a list", _set(["kept"], [[1, 2]]), "kept: must be an object (dict), got list"),
    ("kept unknown layer", _set(["kept", "conv9"], [0]), "kept['conv9']: names no layer of layer_sizes"),
    ("scores short", _set(["scores", L], lambda d: d["scores"][L(d)][:-1]), "one score per kept filter"),
    ("scores long", _set(["scores", L], lambda d: d["scores"][L(d)] + [1.0]), "one score per kept filter"),
    ("score NaN", _set(["scores", L, 0], float("nan")), "scores['conv1'][0]: must be a finite number, got nan"),
    ("score Infinity", _set(["scores", L, 0], float("inf")), "must be a finite number, got inf"),
    ("score string", _set(["scores", L, 0], "0.5"), "scores['conv1'][0]: must be a number, got str"),
    ("scores unknown layer", _set(["scores", "conv9"], []), "scores['conv9']: names no layer of kept"),
    ("layer_sizes too small", _set(["layer_sizes", L], lambda d: d["kept"][L(d)][-1]), "out of range [0, "),
    ("layer size 0", _set(["layer_sizes", E], 0), "size 0 out of range [1, inf)"),
    ("layer size string", _set(["layer_sizes", E], "16"), "must be an int, got str"),
    ("gate 2", _set(["gates", lambda d: _region(d, 1)], 2), "must be 0 (region removed) or 1 (kept), got 2"),
    ("gate 0.5", _set(["gates", lambda d: _region(d, 1)], 0.5), "must be 0 (region removed) or 1 (kept)"),
    ("gate unknown region", _set(["gates", "layer9"], 1), "gates['layer9']: names no region of regions"),
    ("gate true", _set(["gates", lambda d: _region(d, 1)], True), "must be 0 (region removed) or 1 (kept), got True"),
    ("region unknown layer", _set(["regions", lambda d: _region(d, 1), "layers", 0], "conv9"),
     "'conv9' is not a layer of layer_sizes"),
    ("region kind", _set(["regions", lambda d: _region(d, 1), "kind"], "stage"), "must be one of ['block', 'layer']"),
    ("region extra key", _set(["regions", lambda d: _region(d, 1), "gate"], 1), "must have exactly the keys"),
    ("labels unknown", _set(["labels", "conv9"], "C9"), "labels['conv9']: names neither a layer"),
    ("label not a string", _set(["labels", L], 3), "labels['conv1']: must be a non-empty string"),
    ("input_shape 2 ints", _set(["input_shape"], [1, 8]), "input_shape: must be 3 positive ints [C, H, W]"),
    ("input_shape 0", _set(["input_shape", 0], 0), "input_shape[0]: size 0 out of range"),
    ("input_shape string", _set(["input_shape"], "1x8x8"), "input_shape: must be a list, got str"),
    ("class string", _set(["classes", 0], "three"), "classes[0]: must be an int, got str"),
    ("class repeated", _set(["classes"], lambda d: [d["classes"][0]] * 2), "classes[1]: class 3 repeats"),
    ("class negative", _set(["classes", 0], -3), "classes[0]: class -3 out of range"),
    ("class_names a string", _set(["class_names"], "a,b"), "class_names: must be a list, got str"),
    ("family", _set(["family"], "alexnet"), "family: must be one of ['resnet', 'vgg', 'other']"),
    ("strongest not kept", _set(["strongest_filters", "3", 0, 1], _unkept),
     "is not a kept filter of 'conv1'"),
    ("strongest layer", _set(["strongest_filters", "3", 0, 0], "conv9"), "'conv9' names no layer of kept"),
    ("strongest class", _set(["strongest_filters", "5"], []), "strongest_filters['5']: must be keyed by one of"),
    ("strongest negative", _set(["strongest_filters", "3", 0, 2], -1.0), "a contribution |a * dy/da| is >= 0"),
    ("strongest short", _set(["strongest_filters", "3", 0], ["conv1", 1]), "must be [layer, filter index, contrib"),
    ("history NaN", _set(["history", "scoring", 0], float("nan")), "history['scoring'][0]: must be a finite"),
    ("metric string", _set(["metrics", "kl"], "low"), "metrics['kl']: must be a number, got str"),
    ("metric NaN", _set(["metrics", "kl"], float("nan")), "metrics['kl']: must be a finite number"),
    ("filters_kept claim", _set(["metrics", "filters_kept"], 1), "metrics['filters_kept']: claims 1 but the chain"),
    ("config lam NaN", _set(["config", "lam"], float("nan")), "config: lam must be a number >= 0"),
    ("config steps", _set(["config", "steps"], -5), "config: steps must be an int >= 0"),
    ("config unknown", _set(["config", "lamda"], 0.1), "config: unknown NeuroChainsConfig field(s) ['lamda']"),
    ("config a list", _set(["config"], [1]), "config: must be an object (dict), got list"),
    ("seed -1", _set(["seed"], -1), "seed: value -1 out of range [0, "),
    ("seed differs", _set(["seed"], 7), "seed: 7 differs from config['seed'] 0"),
    ("model_hash short", _set(["model_hash"], "abc"), "model_hash: must be a SHA-256 digest"),
    ("images_hash upper", _set(["images_hash"], lambda d: d["images_hash"].upper()), "images_hash: must be a SHA"),
    ("model_spec list", _set(["model_spec"], ["default"]), "model_spec: must be an object (dict), got list"),
    ("images_source string", _set(["images_source"], "folder"), "images_source: must be an object (dict)"),
    ("missing kept", _delete("kept"), "chain: missing field(s) ['kept']"),
    ("unknown field", _set(["colour"], "red"), "unknown field(s) ['colour'] for version 3"),
    ("old name in version 3", _set(["paths"], {}), "unknown field(s) ['paths'] for version 3"),
    ("version string", _set(["version"], "3"), "chain version '3' is not supported"),
    ("version 4", _set(["version"], 4), "chain version 4 is not supported"),
]


@pytest.fixture(scope="module")
def valid():
    _, _, chain = small_digits_chain()
    data = json.loads(json.dumps(chain.to_dict()))
    # the variants name these: a chain of DigitsNet on digits 3 and 8, with a kept and a removed block
    assert "conv1" in data["kept"] and data["kept"]["conv1"] and data["classes"] == [3, 8]
    assert set(data["gates"].values()) == {0, 1} and data["layer_sizes"]["conv1"] == 16
    return data


def _variant(valid, mutate, folder):
    data = json.loads(json.dumps(valid))
    mutate(data)
    path = folder / "chain.json"
    path.write_text(json.dumps(data))  # NaN/Infinity as Python's json writes them
    return path


IDS = [v[0] for v in VARIANTS]


@pytest.mark.parametrize("name,mutate,needle", VARIANTS, ids=IDS)
def test_from_dict_names_the_field(valid, name, mutate, needle):
    data = json.loads(json.dumps(valid))
    mutate(data)
    with pytest.raises(ValueError) as info:
        Chain.from_dict(data)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name,mutate,needle", VARIANTS, ids=IDS)
def test_inspect_refuses(refused, tmp_path, valid, name, mutate, needle):
    path = _variant(valid, mutate, tmp_path)
    refused(["inspect", path], needle)


@pytest.mark.parametrize("name,mutate,needle", VARIANTS[::3], ids=IDS[::3])
def test_export_refuses(refused, tmp_path, valid, name, mutate, needle):
    path = _variant(valid, mutate, tmp_path)
    refused(["export", path, "--out", tmp_path / "out", "--model", "default"], needle)


def test_the_valid_chain_passes_inspect(valid, tmp_path, capsys):
    from nchains import cli

    path = tmp_path / "chain.json"
    path.write_text(json.dumps(valid))
    assert cli.main(["inspect", str(path)]) == 0
    assert "chain of model" in capsys.readouterr().out
