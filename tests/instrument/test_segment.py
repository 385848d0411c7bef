"""Segments: the suffix of the traced model from a site, fed the site's true value, is the model."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nchains.graph.analysis import analyze
from nchains.instrument.segment import segment, segments, values_at
from nchains.instrument.taps import sites

pytestmark = pytest.mark.usefixtures("one_thread")


class SkipAround(nn.Module):
    """A skip from before the site to after it, the model input read again at the end, and
    in-place ops (ReLU(inplace=True), ``+=``) around the site."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        skip = self.act1(self.conv1(x))
        y = self.act2(self.conv2(skip))    # the site
        y = self.conv3(y + skip)           # skip computed before the site
        y += x                             # the model input, in place
        y = F.relu(y)
        return self.fc(y.mean((2, 3)))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    return model, x, analyze(model, x[:1])


def test_resnet18_segment_fed_the_true_value_is_the_model(resnet):
    model, x, graph = resnet
    with torch.no_grad():
        want = model(x)
        for site in sites(graph):
            seg = segment(graph, [site])
            (a,), frontier = seg.prefix(x)
            assert a.shape == (2, *site.shape[1:])
            torch.testing.assert_close(seg.run([a], frontier), want, rtol=0, atol=0)


def test_resnet18_reused_relu_calls_are_different_segments(resnet):
    _, x, graph = resnet
    by_key = {s.key: s for s in sites(graph)}
    first, second = by_key["layer1.0.relu"], by_key["layer1.0.relu@1"]
    (a1,), _ = segment(graph, [first]).prefix(x)
    (a2,), fr2 = segment(graph, [second]).prefix(x)
    assert a1.shape == a2.shape and not torch.equal(a1, a2)
    # the second call's suffix does not contain the block's second conv; the first's does
    assert "layer1_0_conv2" in segment(graph, [first]).module.code
    assert "layer1_0_conv2" not in segment(graph, [second]).module.code


def test_skip_around_site_is_in_the_frontier_and_rows_index_images():
    torch.manual_seed(1)
    model = SkipAround().eval()
    x = torch.randn(3, 3, 8, 8)
    graph = analyze(model, x[:1])
    site = next(s for s in sites(graph) if s.key == "act2")
    seg = segment(graph, [site])
    names = {n.name for n in seg.frontier_nodes}
    assert names == {"act1", "x"}, names       # the skip and the model input
    assert all(seg.batched)
    with torch.no_grad():
        (a,), frontier = seg.prefix(x)
        want = model(x.clone())
        torch.testing.assert_close(seg.run([a], frontier), want, rtol=0, atol=0)
        # rows built from images 2, 0, 2 with a scaled activation: equal to a hand-made forward
        index = torch.tensor([2, 0, 2])
        got = seg.run([a[index] * 0.5], frontier, index)
        skip = F.relu(model.conv1(x))
        y = model.conv3(0.5 * F.relu(model.conv2(skip))[index] + skip[index]) + x[index]
        ref = model.fc(F.relu(y).mean((2, 3)))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_outputs_and_values_at():
    model = SkipAround().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = analyze(model, x[:1])
    by_key = {s.key: s for s in sites(graph)}
    seg = segment(graph, [by_key["act1"]], outputs=[by_key["act2"]])
    (a,), frontier = seg.prefix(x)
    out = seg.run([a], frontier)
    with torch.no_grad():
        torch.testing.assert_close(out["act2"], F.relu(model.conv2(F.relu(model.conv1(x)))))
    vals = values_at(graph, [by_key["act1"].node, by_key["act2"].node])(x)
    torch.testing.assert_close(vals[1], out["act2"])
    with pytest.raises(ValueError, match="not downstream"):
        segment(graph, [by_key["act2"]], outputs=[by_key["act1"]])


def test_bad_arguments(resnet):
    _, x, graph = resnet
    s = sites(graph)[0]
    with pytest.raises(TypeError, match="ModelGraph"):
        segment(object(), [s])
    with pytest.raises(ValueError, match="at least one"):
        segment(graph, [])
    with pytest.raises(TypeError, match="Site"):
        segment(graph, ["relu"])
    seg = segment(graph, [s])
    with pytest.raises(ValueError, match="takes 1 input"):
        seg.run([], [])


def test_segments_from_one_copy_equal_single_segments(resnet):
    _, x, graph = resnet
    chosen = sites(graph)[::4]
    many = segments(graph, [[s] for s in chosen])
    with torch.no_grad():
        for s, seg in zip(chosen, many):
            one = segment(graph, [s])
            assert seg.frontier_nodes == one.frontier_nodes and seg.inputs == one.inputs
            (a,), frontier = seg.prefix(x)
            torch.testing.assert_close(seg.run([2 * a], frontier), one.run([2 * a], frontier), rtol=0, atol=0)


class SizeBeforeSite(nn.Module):
    """Reads the batch size before the site and uses it after: not re-indexable by rows."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        n = x.size(0)
        return self.fc(self.act(self.conv(x)).view(n, -1))


def test_batch_dependent_non_tensor_frontier_is_refused_for_rows():
    model = SizeBeforeSite().eval()
    x = torch.randn(2, 1, 6, 6)
    graph = analyze(model, x[:1])
    seg = segment(graph, [sites(graph)[0]])
    (a,), frontier = seg.prefix(x)
    with torch.no_grad():
        torch.testing.assert_close(seg.run([a], frontier), model(x))
    with pytest.raises(ValueError, match="cannot be re-indexed"):
        seg.run([a[[0, 0, 1]]], frontier, torch.tensor([0, 0, 1]))
