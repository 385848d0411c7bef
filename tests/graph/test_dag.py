"""The unit DAG (``ModelGraph.dag``) against hand-written expectations: torchvision ResNet-18
(residual adds, downsample shortcuts), VGG-11 (a plain chain through pools and flatten) and a
user CNN with a residual add and a channel concat; the topological order on every edge.

torchvision models are built on the meta device: the DAG only needs the traced graph."""

import pytest
import torch
import torchvision
from torch import nn

from nchains.graph.analysis import analyze
from nchains.graph.dag import UnitDAG
from test_analysis import UserCNN


def _meta(name: str):
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    return analyze(model, torch.empty(1, 3, 32, 32, device="meta"))


@pytest.fixture(scope="module")
def resnet18():
    return _meta("resnet18")


def assert_topological(dag: UnitDAG) -> None:
    rank = {n: i for i, n in enumerate(dag.order)}
    assert len(rank) == len(dag.order)
    edges = dag.edges()
    assert edges
    for p, c in edges:
        assert rank[p] < rank[c], (p, c)
        assert p in dag.producers(c) and c in dag.consumers(p)
    # consumers are exactly the inverse of producers
    inverse = {(p, c) for c in dag.order for p in dag.producers(c)}
    assert inverse == {(p, c) for p in dag.order for c in dag.consumers(p)} == set(edges)


def test_resnet18_blocks_and_shortcuts(resnet18):
    dag = resnet18.dag
    assert set(dag.order) == set(resnet18.layers) | set(resnet18.linears)
    assert dag.inputs == ("conv1",) and dag.outputs == ("fc",)
    assert dag.producers("conv1") == ()
    # the stem reaches the first three blocks through identity shortcuts
    assert dag.consumers("conv1") == ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0")
    assert dag.consumers("layer1.0.conv1") == ("layer1.0.conv2",)
    # a block's last conv feeds the next block directly and, through its identity add, the one after
    assert dag.consumers("layer1.0.conv2") == ("layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0")
    assert dag.producers("layer1.1.conv1") == ("conv1", "layer1.0.conv2")
    # the downsample conv and conv2 of layer2.0 feed the same add
    for name in ("layer2.0.conv2", "layer2.0.downsample.0"):
        assert dag.consumers(name) == ("layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0")
    assert dag.producers("layer2.1.conv1") == ("layer2.0.conv2", "layer2.0.downsample.0")  # forward's order
    # pooling and flatten are walked through to the classifier
    assert dag.producers("fc") == ("layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2")
    assert dag.consumers("fc") == ()
    assert_topological(dag)


def test_vgg11_is_a_plain_chain():
    g = _meta("vgg11")
    dag = g.dag
    convs = [n for n, m in g.graph_module.named_modules() if isinstance(m, nn.Conv2d)]
    linears = ["classifier.0", "classifier.3", "classifier.6"]
    assert list(dag.order) == convs + linears
    chain = list(dag.order)
    for prev, name in zip(chain, chain[1:]):
        assert dag.producers(name) == (prev,)
        assert dag.consumers(prev) == (name,)
    assert dag.inputs == (chain[0],) and dag.outputs == ("classifier.6",)
    assert_topological(dag)


def test_concat_and_residual_user_cnn():
    g = analyze(UserCNN(), torch.randn(2, 3, 32, 32))
    dag = g.dag
    assert dag.order == ("stem", "same", "res.dw", "res.pw", "branches.a", "branches.b", "grouped",
                         "hidden", "head")
    assert dag.producers("res.dw") == ("same",)
    # the residual add: both its operands feed both concat branches
    assert dag.consumers("same") == ("res.dw", "branches.a", "branches.b")
    assert dag.producers("branches.a") == dag.producers("branches.b") == ("same", "res.pw")
    # the concat: every branch feeds the consumer of the concatenation (through a max pool)
    assert dag.producers("grouped") == ("branches.a", "branches.b")
    assert dag.consumers("branches.b") == ("grouped",)
    assert dag.producers("hidden") == ("grouped",) and dag.producers("head") == ("hidden",)
    assert dag.inputs == ("stem",) and dag.outputs == ("head",)
    assert_topological(dag)


def test_dag_is_built_once_and_names_are_checked(resnet18):
    assert resnet18.dag is resnet18.dag
    with pytest.raises(ValueError, match="name must be a unit.*'layer9'"):
        resnet18.dag.producers("layer9")
    with pytest.raises(ValueError, match="name must be a unit"):
        resnet18.dag.consumers("layer1.0")  # a region, not a unit
    # source_units reads one cached producer map, built on first use
    add = resnet18.adds[1].node
    assert resnet18.source_units(add) == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    cached = resnet18.__dict__["_unit_of_last"]
    resnet18.source_units(resnet18.adds[2].node)
    assert resnet18.__dict__["_unit_of_last"] is cached


def test_input_fed_twice_and_shape_queries_are_not_edges():
    class TwoStems(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.a(x)) * torch.sigmoid(self.b(x))
            y = y.view(y.size(0), 4, -1).mean(2)  # size() reads a shape only
            return self.head(y)

    dag = analyze(TwoStems(), torch.randn(1, 3, 8, 8)).dag
    assert dag.inputs == ("a", "b")
    assert dag.producers("head") == ("a", "b")
    assert dag.outputs == ("head",)
    assert_topological(dag)
