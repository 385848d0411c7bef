"""One analysis per export, and a ModelGraph passed in is reused everywhere, checked to be the
model's, and never modified by the scored model, compact or export.

Analyses are counted at the fx trace every :func:`nchains.analyze` starts with."""

import copy

import pytest
import torch

import nchains
from nchains._util.io import hash_model
from nchains.graph import analysis
from nchains.graph.analysis import analyze
from nchains.instrument.scored_model import ScoredModel
from _models import random_digits_net


pytestmark = pytest.mark.usefixtures("one_thread")


EXTRACT = dict(steps=8, finetune_steps=3, finetune_kl=0.0, lam=0.02, lam_gate=0.02, seed=1, progress=False)


@pytest.fixture(scope="module")
def digits():
    model = random_digits_net()
    images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, images, nchains.extract(model, images, **EXTRACT)


@pytest.fixture
def analyses(monkeypatch):
    """The models traced (one entry per analysis) while the test runs."""
    calls = []
    trace = analysis._trace

    def counting(model):
        calls.append(type(model).__name__)
        return trace(model)

    monkeypatch.setattr(analysis, "_trace", counting)
    return calls


def test_export_analyses_the_model_once(digits, analyses, tmp_path):
    model, images, chain = digits
    manifest = nchains.export(chain, model, tmp_path / "out", ("torchscript", "onnx", "pt2"), images=images)
    # before: Chain.apply and one compact per option set (default, onnx's, ts/pt2's) each analysed: 4
    assert analyses == ["DigitsNet"]
    assert all(check["passed"] for check in manifest["verification"]["formats"].values())


def test_a_passed_graph_is_reused_by_every_entry_point(digits, analyses, tmp_path):
    model, images, chain = digits
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        fresh = (chain.apply(model)(x), nchains.compact(chain, model, channel_multiple=8)(x))
    fresh_chain = nchains.extract(model, images, **EXTRACT)
    del analyses[:]
    g = analyze(model, images[:1])
    assert analyses == ["DigitsNet"]
    again = nchains.extract(model, images, graph=g, **EXTRACT)
    with torch.no_grad():
        masked = chain.apply(model, graph=g)(x)
        small = nchains.compact(chain, model, graph=g, channel_multiple=8)(x)
    nchains.export(chain, model, tmp_path / "out", "torchscript", images=images, graph=g)
    assert analyses == ["DigitsNet"]  # nothing analysed again
    # the same results as with their own analyses
    assert again.kept == fresh_chain.kept and again.scores == fresh_chain.scores
    assert again.history == fresh_chain.history
    assert torch.equal(masked, fresh[0]) and torch.equal(small, fresh[1])


def test_a_graph_of_another_model_shape_or_dtype_is_refused(digits, tmp_path):
    model, images, chain = digits
    other = analyze(random_digits_net(seed=5), images[:1])
    for call in (lambda g: chain.apply(model, graph=g), lambda g: nchains.compact(chain, model, graph=g),
                 lambda g: nchains.export(chain, model, tmp_path / "out", "ts", graph=g),
                 lambda g: nchains.extract(model, images, graph=g, steps=1)):
        with pytest.raises(ValueError, match="graph was not analysed from this model: its module 'conv1'"):
            call(other)
    wide = analyze(model, torch.randn(1, 1, 12, 12))
    with pytest.raises(ValueError, match=r"graph was analysed on inputs of shape \[1, 12, 12\], expected \[1, 8, 8\]"):
        chain.apply(model, graph=wide)
    with pytest.raises(TypeError, match="graph must be a ModelGraph .* got str"):
        nchains.compact(chain, model, graph="graph")
    m64 = copy.deepcopy(model)
    g32 = analyze(m64, images[:1])
    m64.double()  # the same modules, now float64: the graph's shapes were propagated in float32
    with pytest.raises(ValueError, match="graph was analysed on torch.float32 inputs, expected torch.float64"):
        nchains.extract(m64, images.double(), graph=g32, steps=1)
    assert not (tmp_path / "out").exists()


def _fingerprint(g) -> dict:
    """Everything of a ModelGraph its users could change: nodes, code, tensors, unit/region fields."""
    gm = g.graph_module
    nodes = [(n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs), sorted(u.name for u in n.users),
              str(n.meta.get("tensor_meta"))) for n in gm.graph.nodes]

    def fields(obj):
        return {k: (v.name if isinstance(v, torch.fx.Node) else
                    tuple(x.name if isinstance(x, torch.fx.Node) else x for x in v) if isinstance(v, tuple) else
                    repr(v)) for k, v in vars(obj).items()}

    return {"nodes": nodes, "code": gm.code, "training": [m.training for m in gm.modules()],
            "units": {n: fields(u) for n, u in g.units.items()}, "regions": {n: fields(r) for n, r in g.regions.items()},
            "adds": [fields(a) for a in g.adds], "concats": [fields(c) for c in g.concats],
            "kinds": {n.name: k for n, k in g.node_kinds.items()}, "labels": dict(g.label_of),
            "input_shape": g.input_shape, "classifier": g.classifier}


def test_the_shared_graph_is_not_modified(digits, tmp_path):
    model, images, chain = digits
    g = analyze(model, images[:1])
    before, weights = _fingerprint(g), {k: v.clone() for k, v in g.graph_module.state_dict().items()}
    model_hash = hash_model(model)
    sm = ScoredModel(g)
    sm.set_hard()
    chain.apply(model, graph=g)
    for kw in ({}, {"keep_scores": True}, {"channel_multiple": 8, "scatter": "gather"},
               {"channel_multiple": 8, "memory_format": "channels_last"}):
        nchains.compact(chain, model, graph=g, **kw)
    nchains.export(chain, model, tmp_path / "out", ("ts", "pt2"), graph=g)
    assert _fingerprint(g) == before
    after = g.graph_module.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())
    assert hash_model(model) == model_hash
