"""contributions(): argument checks before work, float64 models, layer lists, the result mapping."""

import pytest
import torch

from nchains.contrib import Contributions, contributions
from nchains.graph.analysis import analyze

from _hooks import out_of_place, per_call
from _models import random_digits_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net():
    model = random_digits_net(7)
    x = torch.randn(2, 1, 8, 8)
    return model, x, analyze(model, x[:1])


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"method": "shap"}, ValueError, "method must be one of taylor, intgrad, ablation, got 'shap'"),
    ({"unit": "pixel"}, ValueError, "unit must be one of channel, neuron, got 'pixel'"),
    ({"absolute": 1}, TypeError, "absolute must be a bool, got int"),
    ({"steps": 0}, ValueError, "steps must be an int in [1, 100000], got 0"),
    ({"steps": True}, ValueError, "steps must be an int in [1, 100000], got True"),
    ({"steps": 2.0}, ValueError, "steps must be an int in [1, 100000], got 2.0"),
    ({"batch_size": 0}, ValueError, "batch_size must be None or an int >= 1"),
    ({"progress": "yes"}, TypeError, "progress must be a bool or None"),
    ({"target": "max"}, ValueError, "target must be 'pred', an int class index or a LongTensor[N], got 'max'"),
    ({"target": 10}, ValueError, "target must be a class index in [0, 10) (the model has 10 outputs), got 10"),
    ({"target": -1}, ValueError, "target must be a class index in [0, 10)"),
    ({"target": 1.0}, TypeError, "target must be 'pred', an int class index or a LongTensor[N], got float"),
    ({"target": True}, TypeError, "got bool"),
    ({"target": torch.tensor([1.0, 2.0])}, TypeError, "target must be an integer tensor"),
    ({"target": torch.tensor([1, 2, 3])}, ValueError, "LongTensor[N] with N = 2"),
    ({"target": torch.tensor([1, 12])}, ValueError, "got 12 for image 1"),
    ({"layers": "all"}, ValueError, "layers must be 'activations', 'units' or a list of module paths, got 'all'"),
    ({"layers": []}, ValueError, "layers must name at least one module path"),
    ({"layers": [3]}, TypeError, "layers must be 'activations', 'units' or a list of module paths (str)"),
    ({"layers": ["layer3.0"]}, ValueError, "layers: 'layer3.0' is not a module of the model; valid module paths"),
    ({"graph": "g"}, TypeError, "graph must be a ModelGraph"),
])
def test_bad_arguments(net, kwargs, error, needle):
    model, x, _ = net
    with pytest.raises(error) as info:
        contributions(model, x, **kwargs)
    assert needle in str(info.value)


def test_bad_images_and_model(net):
    model, x, _ = net
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        contributions(lambda t: t, x)
    with pytest.raises(TypeError, match="images must be a Tensor"):
        contributions(model, x.numpy())
    bad = x.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite value.*at image 1"):
        contributions(model, bad)
    with pytest.raises(ValueError, match="floating-point"):
        contributions(model, torch.ones(1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="analysed on inputs of shape"):
        contributions(model, torch.randn(1, 1, 10, 10), graph=analyze(model, x[:1]))


def test_float64_model_follows_the_model_dtype(net):
    model, x, _ = net
    m64 = out_of_place(model).double()
    for method in ("taylor", "intgrad", "ablation"):
        c = contributions(m64, x, method=method, steps=3)        # float32 images, float64 model
        assert all(v.dtype == torch.float64 for v in c.values()) and c.logits.dtype == torch.float64
        c32 = contributions(model, x, method=method, steps=3)
        for k in c:
            torch.testing.assert_close(c[k].float(), c32[k], rtol=1e-3, atol=1e-4)
    ig = contributions(m64, x, method="intgrad", steps=3)
    # in float64 the delta is the quadrature error alone; a 1-step check of the arithmetic:
    one = contributions(m64, x, method="intgrad", steps=1, unit="neuron", layers=["layer2.1.relu"])
    with per_call(m64, ["layer2.1.relu"]) as seen:
        m64(x.double())
    a = seen["layer2.1.relu@1"].detach()
    half = (0.5 * a).requires_grad_(True)
    with per_call(m64, ["layer2.1.relu"], replace={"layer2.1.relu@1": lambda out: half}):
        m64(x.double()).gather(1, one.target[:, None]).sum().backward()
    torch.testing.assert_close(one["layer2.1.relu@1"], a * half.grad, rtol=1e-10, atol=1e-12)
    assert set(ig.delta) == set(ig)


def test_layers_list_keys_labels_and_mapping(net):
    model, x, graph = net
    c = contributions(model, x, graph=graph, layers=["layer1.1", "layer1.0.relu", "fc"])
    assert isinstance(c, Contributions) and len(c) == 4
    assert list(c) == ["layer1.0.relu", "layer1.0.relu@1", "layer1.1", "fc"]   # execution order
    sites = {s.key: s for s in c.sites}
    assert sites["layer1.1"].label == "L1B2" and sites["fc"].shape == (1, 10)
    assert c["fc"].shape == (2, 10)
    # the classifier's own logits: a * dPhi/da is the target logit's value in its column
    torch.testing.assert_close(c["fc"].gather(1, c.target[:, None])[:, 0],
                               c.logits.gather(1, c.target[:, None])[:, 0])
    with pytest.raises(KeyError, match="not a site"):
        c["layer9"]
    top = c.top("layer1.1", 2)
    mean = c["layer1.1"].mean(0)
    assert [i for i, _ in top] == mean.argsort(descending=True)[:2].tolist()
    assert "method='taylor'" in repr(c)
