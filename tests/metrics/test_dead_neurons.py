import pytest
import torch
from torch import nn

from nchains.critical_paths import CriticalPath
from nchains.metrics import dead_neuron_prevalence
from tests.metrics._paths import site_values, top_mask
from tests._models import digits_region, random_digits_net

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act1 = nn.ReLU()
        self.fc = nn.Linear(3 * 5 * 5, 6)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.act2(self.fc(self.act1(self.conv(x)).flatten(1))))


def test_by_hand_on_a_small_model():
    torch.manual_seed(3)
    net = TwoReLU().eval()
    x = torch.randn(1, 1, 5, 5)
    with torch.no_grad():
        a1 = torch.relu(net.conv(x))[0]
        a2 = torch.relu(net.fc(a1.flatten()[None]))[0]
    gen = torch.Generator().manual_seed(1)
    mask = {"act1": torch.rand(a1.shape, generator=gen) < 0.5, "act2": torch.rand(a2.shape, generator=gen) < 0.7}
    r = dead_neuron_prevalence(mask, net, x)
    dead1, dead2 = int(((a1 == 0) & mask["act1"]).sum()), int(((a2 == 0) & mask["act2"]).sum())
    kept = int(mask["act1"].sum() + mask["act2"].sum())
    assert dead1 + dead2 > 0  # the check below is not vacuous
    assert r["kept"] == kept and r["dead"] == dead1 + dead2
    assert r["fraction"] == pytest.approx((dead1 + dead2) / kept)
    assert r["per_layer"]["act1"]["dead"] == dead1 and r["per_layer"]["act2"]["dead"] == dead2
    assert r["dead_overall"] == pytest.approx(float((a1 == 0).sum() + (a2 == 0).sum()) / (a1.numel() + a2.numel()))
    # a partial mapping covers only its sites
    only = dead_neuron_prevalence({"act2": mask["act2"]}, net, x)
    assert list(only["per_layer"]) == ["act2"] and only["dead"] == dead2


def test_contribution_path_has_no_dead_neuron_and_its_complement_has_many():
    net = random_digits_net(0)
    image = digits_region()[0][:1]
    acts, contrib, target = site_values(net, image)
    mask = top_mask(contrib, 0.1)
    path = CriticalPath(net, image, mask, target=target, method="mct")
    r = dead_neuron_prevalence(path)
    assert r["kept"] == path.n_kept > 0
    assert r["dead"] == 0 and r["fraction"] == 0.0
    rest = dead_neuron_prevalence({k: ~m for k, m in mask.items()}, net, image)
    expected = sum(int(((acts[k] == 0) & ~m).sum()) for k, m in mask.items())
    assert rest["dead"] == expected > 0
    assert dead_neuron_prevalence(mask, net, image) == r  # a mapping and the CriticalPath agree


def test_an_empty_path_has_no_fraction():
    net = TwoReLU().eval()
    x = torch.randn(1, 1, 5, 5)
    r = dead_neuron_prevalence({"act1": torch.zeros(3, 5, 5, dtype=torch.bool)}, net, x)
    assert r["kept"] == 0 and r["fraction"] is None and r["per_layer"]["act1"]["fraction"] is None


@pytest.mark.parametrize("mask, needle", [
    ({"nope": torch.ones(6, dtype=torch.bool)}, "unknown site 'nope'"),
    ({"act2": torch.ones(5, dtype=torch.bool)}, "neuron shape [6]"),
    ({"act2": torch.ones(6)}, "must be a BoolTensor"),
    ({}, "no sites"),
    ([torch.ones(6, dtype=torch.bool)], "CriticalPath or a mapping"),
])
def test_bad_paths_are_refused(mask, needle):
    with pytest.raises((TypeError, ValueError), match=None) as e:
        dead_neuron_prevalence(mask, TwoReLU().eval(), torch.randn(1, 1, 5, 5))
    assert needle in str(e.value)


def test_a_mapping_needs_model_and_image():
    with pytest.raises(ValueError, match="model and image are required"):
        dead_neuron_prevalence({"act2": torch.ones(6, dtype=torch.bool)})


@pytest.mark.parametrize("method", ["mct", "intgrad"])
def test_critical_paths_contain_no_dead_neuron(method):
    pytest.importorskip("nchains.contrib")
    from nchains import critical_path

    net = random_digits_net(1)
    image = digits_region()[0][:1]
    path = critical_path(net, image, sparsity=0.9, method=method, steps=8)
    assert path.threshold > 0  # Remark 2: a dead neuron scores 0, below a positive threshold
    r = dead_neuron_prevalence(path)
    assert r["kept"] == path.n_kept and r["dead"] == 0
    assert r["dead_overall"] > 0.1  # the network has dead neurons to pick from
