"""In-place ops whose result is dropped: the scored, compact and exported models still compute
what the original computes (the analysis points later readers of a mutated tensor at the op)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nchains
from nchains.graph.aliases import redirect_mutated_readers
from nchains.instrument.scored_model import ScoredModel
from test_compact import make_chain


class DroppedResults(nn.Module):
    """``y.add_(...)`` and ``F.relu(..., inplace=True)`` as statements and one in-place ReLU
    module called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.relu(self.bn(self.a(x)))
        y.add_(self.b(x))                 # result dropped: later readers of y see the sum
        F.relu(y, inplace=True)           # statement: y is now relu(y)
        y += self.c(y)
        return self.head(self.relu(y * 0.5).mean((2, 3)))


def _model():
    torch.manual_seed(0)
    m = DroppedResults().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def _reference(m, x):
    """The forward written out-of-place by hand."""
    y = F.relu(m.bn(m.a(x)))
    y = F.relu(y + m.b(x))
    y = y + m.c(y)
    return m.head(F.relu(y * 0.5).mean((2, 3)))


def test_later_readers_are_pointed_at_the_in_place_op():
    m = _model()
    gm = torch.fx.symbolic_trace(m)
    assert redirect_mutated_readers(gm) >= 2
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x.clone()), _reference(m, x))


def test_scored_compact_and_export_reproduce_the_original(tmp_path):
    m, x = _model(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = _reference(m, x)
        torch.testing.assert_close(m(x.clone()), ref)
    graph = nchains.analyze(m, x[:1])
    ScoredModel(graph)  # the self-check compares it with the original: it used to miss the add
    chain = make_chain(m, x, p_keep=1.0, p_gate=1.0, p_dead=0.0)
    chain.scores = {name: [1.0] * len(kept) for name, kept in chain.kept.items()}  # the whole model
    with torch.no_grad():
        torch.testing.assert_close(chain.apply(m)(x.clone()), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(nchains.compact(chain, m)(x.clone()), ref, rtol=1e-4, atol=1e-5)
    manifest = nchains.export(chain, m, tmp_path / "out", formats="pt2")
    assert manifest["verification"]["formats"]["pt2"]["passed"]


class AliasAfterAugmentedAdd(DroppedResults):
    """``keep = y; y += ...; use keep``: torch.fx traces ``+=`` on a proxy as an out-of-place
    add, so the traced graph itself differs from the model: the analysis must refuse it."""

    def forward(self, x):
        y = self.relu(self.bn(self.a(x)))
        keep = y
        y += self.c(y)
        return self.head(keep.mean((2, 3)))


def test_a_traced_graph_that_differs_from_the_model_is_refused():
    torch.manual_seed(0)
    m, x = AliasAfterAugmentedAdd().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="trace does not compute what the model computes"):
        nchains.analyze(m, x[:1])
