"""The quotient metric Q(p, q) of Eq. 9 against numbers worked out by hand and against a loop
over the chain's images."""

from __future__ import annotations

import math

import pytest
import torch

from nchains.neurochains.analyses import plot_quotient, quotient
from nchains.neurochains.analyses.quotient import quotient_values

from _analyses_chain import analyses_chain


def test_q_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.45, 0.45, 0.1]])
    q = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    got = quotient_values(p.log(), q.log())  # softmax of log-probabilities gives them back
    # y = 0: (0.6 - 0.3) / (0.7 - 0.2) = 0.6; y = 1: (0.2 - 0.5) / (0.5 - 0.4) = -3 (class changed);
    # y = 2: (0.6 - 0.2) / (0.4 - 0.3) = 4; a tie of the original's top two: no quotient
    assert got[:3].tolist() == pytest.approx([0.6, -3.0, 4.0])
    assert math.isnan(got[3])


def test_quotient_of_a_chain_by_a_loop():
    net, images, _, chain = analyses_chain()
    res = quotient(chain, net, images)
    with torch.no_grad():
        p = torch.softmax(net(images).double(), 1)
        q = torch.softmax(chain.apply(net)(images).double(), 1)
    for n in range(len(images)):
        y = int(p[n].argmax())
        others = [z for z in range(p.shape[1]) if z != y]
        expected = (q[n, y] - q[n, others].max()) / (p[n, y] - p[n, others].max())
        assert res["q"][n] == pytest.approx(float(expected), rel=1e-5)
        assert res["changed"][n] == (int(q[n].argmax()) != y)
    assert res["fraction_negative"] == pytest.approx(sum(res["changed"]) / len(images))
    assert 0 < sum(res["changed"]) < len(images)  # the test chain keeps some classes, not all
    fig = plot_quotient(res)
    assert fig.axes[0].get_title().startswith("Quotient metric Q(p, q) (Eq. 9)")
    assert sum(p.get_height() for p in fig.axes[0].patches) == len(images)
