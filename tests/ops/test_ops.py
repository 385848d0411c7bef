"""The compiled ops against the pure-PyTorch references, on many random configurations."""

import itertools
import random

import pytest
import torch

from nchains.ops import _reference as ref
from nchains import ops


def _layout(t, kind):
    """Returns t laid out as 'contiguous', 'channels_last' or a non-contiguous view (same values)."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    # A non-contiguous view: every other element of a tensor twice as wide on the last dim.
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    view = big[..., ::2]
    assert not view.is_contiguous()
    return view


def _conv_configs(count=60, seed=1234):
    rng = random.Random(seed)
    configs = []
    for i in range(count):
        groups_kind = rng.choice(["one", "grouped", "depthwise"])
        g = {"one": 1, "grouped": rng.choice([2, 3]), "depthwise": rng.choice([3, 4, 6])}[groups_kind]
        cin = g * rng.choice([1, 2]) if groups_kind != "depthwise" else g
        cout = g * rng.choice([1, 2, 3]) if groups_kind != "depthwise" else g
        k = rng.choice([1, 3, 5])
        stride = rng.choice([1, 2, (1, 2)])
        dilation = rng.choice([1, 1, 2])
        padding = rng.choice([0, 1, 2, (1, 0)])
        h, w = rng.choice([5, 7, 9, 12]), rng.choice([5, 8, 11])
        n = rng.choice([1, 2, 3])
        act = rng.choice(["none", "relu"])
        layout = rng.choice(["contiguous", "channels_last", "strided"])
        dtype = rng.choice([torch.float32, torch.float64])
        bias = rng.random() < 0.7
        pad_w = padding[1] if isinstance(padding, tuple) else padding
        if w + 2 * pad_w - dilation * (k - 1) - 1 < 0 or h + 2 * (padding[0] if isinstance(padding, tuple)
                                                                   else padding) - dilation * (k - 1) - 1 < 0:
            dilation, k = 1, 3
        # A fused residual add, and a gate blending with another tensor (a block's input):
        # both take the output's shape, so any configuration can have them.
        fused = rng.choice(["", "", "residual", "gate_input", "residual+gate_input"])
        configs.append(dict(n=n, cin=cin, cout=cout, k=k, stride=stride, padding=padding, dilation=dilation,
                            groups=g, h=h, w=w, act=act, layout=layout, dtype=dtype, bias=bias,
                            residual="residual" in fused, gated="gate_input" in fused,
                            gate_input="gate_input" in fused))
    # Gated configs need output shape == input shape: stride 1, C_out == C_in, 'same' padding.
    for i in range(24):
        g = rng.choice([1, 2, 4])
        c = g * rng.choice([1, 2])
        k = rng.choice([1, 3])
        dilation = rng.choice([1, 2])
        configs.append(dict(n=rng.choice([1, 2]), cin=c, cout=c, k=k, stride=1, padding=dilation * (k // 2),
                            dilation=dilation, groups=g, h=rng.choice([5, 8]), w=rng.choice([6, 7]),
                            act=rng.choice(["none", "relu"]), layout=rng.choice(["contiguous", "channels_last",
                                                                                 "strided"]),
                            dtype=rng.choice([torch.float32, torch.float64]), bias=rng.random() < 0.5, gated=True))
    return configs


def _conv_args(cfg, requires_grad=True):
    """([x, w, b, s, gate, residual, gate_input], kwargs); absent optionals are None."""
    dt = cfg["dtype"]
    x = torch.randn(cfg["n"], cfg["cin"], cfg["h"], cfg["w"], dtype=dt)
    w = torch.randn(cfg["cout"], cfg["cin"] // cfg["groups"], cfg["k"], cfg["k"], dtype=dt)
    b = torch.randn(cfg["cout"], dtype=dt) if cfg["bias"] else None
    s = torch.randn(cfg["cout"], dtype=dt)
    s[0] = 0.0  # a removed filter
    gate = torch.tensor(random.Random(cfg["h"] * 7 + cfg["w"]).uniform(-0.4, 0.4), dtype=dt) \
        if cfg.get("gated") else None
    out_shape = torch.nn.functional.conv2d(x, w, None, cfg["stride"], cfg["padding"], cfg["dilation"],
                                           cfg["groups"]).shape
    residual = _layout(torch.randn(out_shape, dtype=dt), cfg["layout"]) if cfg.get("residual") else None
    gate_input = _layout(torch.randn(out_shape, dtype=dt), cfg["layout"]) if cfg.get("gate_input") else None
    x = _layout(x, cfg["layout"])
    tensors = [x, w, b, s, gate, residual, gate_input]
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    kwargs = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"],
                  activation=cfg["act"], gate_logit=gate, residual=residual, gate_input=gate_input)
    return tensors, kwargs


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cfg", _conv_configs(), ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()
                                                                       if k in ("groups", "stride", "act",
                                                                                "layout", "gated", "residual",
                                                                                "gate_input")))
def test_masked_conv2d_matches_reference(cfg):
    tensors, kwargs = _conv_args(cfg)
    x, w, b, s, gate, residual, gate_input = tensors
    out = ops.masked_conv2d(x, w, b, s, **kwargs)
    expected = ref.masked_conv2d(x, w, b, s, **kwargs)
    torch.testing.assert_close(out, expected, **_tol(cfg["dtype"]))
    # The removed filter is an exactly-zero map (before the residual add and the gate blend).
    if gate is None and residual is None:
        assert torch.all(out[:, 0] == 0)
    grad = torch.randn_like(out)
    inputs = [t for t in tensors if t is not None]
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, **_tol(cfg["dtype"]))


def test_masked_conv2d_channels_last_output_layout():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    out = ops.masked_conv2d(x, torch.randn(4, 4, 3, 3), None, torch.ones(4), padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_masked_conv2d_score_gradient_is_channel_taylor_sum():
    # DESIGN.md: at S = 1 the score gradient is sum_{n,h,w} dL/dy * z (the filter's Taylor sum).
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    s = torch.ones(5, dtype=torch.float64, requires_grad=True)
    out = ops.masked_conv2d(x, w, None, s, padding=1)
    g = torch.randn_like(out)
    (gs,) = torch.autograd.grad(out, s, g)
    z = torch.nn.functional.conv2d(x, w, None, padding=1)
    torch.testing.assert_close(gs, ops.taylor_contributions(z, g).sum(0))


@pytest.mark.parametrize("shape,layout,dtype", [
    ((2, 3, 5, 7), "contiguous", torch.float64), ((1, 8, 4, 4), "channels_last", torch.float32),
    ((3, 5, 6), "strided", torch.float64), ((4, 6), "contiguous", torch.float32),
    ((2, 16, 9, 9), "channels_last", torch.float64), ((2, 3, 4, 5, 6), "contiguous", torch.float32),
])
def test_gate_matches_reference(shape, layout, dtype):
    y = _layout(torch.randn(shape, dtype=dtype), layout).requires_grad_()
    x = torch.randn(shape, dtype=dtype).requires_grad_()
    a = torch.tensor(0.13, dtype=dtype, requires_grad=True)
    out = ops.gate(y, x, a, 0.2)
    expected = ref.gate(y, x, a, 0.2)
    torch.testing.assert_close(out, expected, **_tol(dtype))
    g = torch.randn_like(out)
    for g1, g2 in zip(torch.autograd.grad(out, [y, x, a], g), torch.autograd.grad(expected, [y, x, a], g)):
        torch.testing.assert_close(g1, g2, **_tol(dtype))


@pytest.mark.parametrize("reduction,absolute,layout,shape,dtype", [
    (r, a, l, s, d) for (r, a, l), (s, d) in itertools.product(
        itertools.product(["channel", "none"], [False, True], ["contiguous", "channels_last", "strided"]),
        [((2, 3, 5, 7), torch.float64), ((3, 16, 4, 4), torch.float32), ((5, 7), torch.float64),
         ((2, 4, 3, 3, 3), torch.float32), ((1, 32, 56, 56), torch.float32)])
])
def test_taylor_matches_reference(reduction, absolute, layout, shape, dtype):
    a = _layout(torch.randn(shape, dtype=dtype), layout).requires_grad_()
    g = torch.randn(shape, dtype=dtype).requires_grad_()
    out = ops.taylor_contributions(a, g, reduction=reduction, absolute=absolute)
    expected = ref.taylor_contributions(a, g, reduction=reduction, absolute=absolute)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, **_tol(dtype))
    go = torch.randn_like(out)
    for g1, g2 in zip(torch.autograd.grad(out, [a, g], go), torch.autograd.grad(expected, [a, g], go)):
        torch.testing.assert_close(g1, g2, **_tol(dtype))


def test_gradcheck_float64():
    dt = torch.float64
    x = torch.randn(2, 4, 6, 5, dtype=dt, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, dtype=dt, requires_grad=True)
    b = torch.randn(4, dtype=dt, requires_grad=True)
    s = torch.randn(4, dtype=dt, requires_grad=True)
    a = torch.tensor(0.2, dtype=dt, requires_grad=True)
    for act in ("none", "relu"):
        f = lambda x, w, b, s, a: ops.masked_conv2d(x, w, b, s, padding=1, groups=2, activation=act,  # noqa: E731
                                                    gate_logit=a)
        assert torch.autograd.gradcheck(f, (x, w, b, s, a))
        f2 = lambda x, w, s: ops.masked_conv2d(x, w, None, s, stride=2, dilation=2, groups=2, activation=act)  # noqa: E731
        assert torch.autograd.gradcheck(f2, (x, w, s))
        # A residual block's tail: conv, score, + shortcut, act, gate with the block's input.
        r = torch.randn(2, 4, 3, 3, dtype=dt, requires_grad=True)
        xin = torch.randn(2, 4, 3, 3, dtype=dt, requires_grad=True)
        f3 = lambda x, w, s, a, r, xin: ops.masked_conv2d(  # noqa: E731
            x, w, None, s, stride=2, padding=1, groups=2, activation=act, gate_logit=a, residual=r, gate_input=xin)
        assert torch.autograd.gradcheck(f3, (x, w, s, a, r, xin))
        # ... with an identity shortcut: the residual is the block's input (one tensor, one gradient).
        f4 = lambda x, w, s, a, r: ops.masked_conv2d(  # noqa: E731
            x, w, None, s, stride=2, padding=1, groups=2, activation=act, gate_logit=a, residual=r, gate_input=r)
        assert torch.autograd.gradcheck(f4, (x, w, s, a, r))
        want = torch.autograd.grad(ref.masked_conv2d(x, w, None, s, stride=2, padding=1, groups=2, activation=act,
                                                     gate_logit=a, residual=r, gate_input=r).sum(), (r, a))
        got = torch.autograd.grad(f4(x, w, s, a, r).sum(), (r, a))
        for g1, g2 in zip(got, want):
            torch.testing.assert_close(g1, g2)
    y = torch.randn(2, 3, 4, 4, dtype=dt, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, x, a: ops.gate(y, x, a), (y, torch.randn_like(y).requires_grad_(), a))
    for red, ab in itertools.product(["channel", "none"], [False, True]):
        assert torch.autograd.gradcheck(
            lambda p, q: ops.taylor_contributions(p, q, reduction=red, absolute=ab),
            (torch.randn(2, 3, 4, 4, dtype=dt, requires_grad=True), torch.randn(2, 3, 4, 4, dtype=dt,
                                                                                 requires_grad=True)))


def _opcheck_samples():
    dt = torch.float64
    x = torch.randn(2, 4, 6, 6, dtype=dt, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, dtype=dt, requires_grad=True)
    b = torch.randn(4, dtype=dt, requires_grad=True)
    s = torch.randn(4, dtype=dt, requires_grad=True)
    a = torch.tensor(0.1, dtype=dt, requires_grad=True)
    xcl = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    shortcut = torch.randn_like(x).requires_grad_()  # residual and gate_input at once
    return [
        (torch.ops.nchains.masked_conv2d, (x, w, b, s, [1, 1], [1, 1], [1, 1], 1, "relu", a, 0.2)),
        # grouped: weight [C_out, C_in / groups, kh, kw]
        (torch.ops.nchains.masked_conv2d, (x, w[:, :2].detach().clone().requires_grad_(), None, s, [2, 1], [0, 1],
                                           [1, 2], 2, "none", None, 0.2)),
        (torch.ops.nchains._masked_conv2d, (xcl, torch.randn(4, 4, 3, 3), None, torch.randn(4), [1, 1], [1, 1],
                                            [1, 1], 1, "relu", torch.tensor(0.0), 0.2)),
        (torch.ops.nchains.masked_conv2d, (x, w, b, s, [1, 1], [1, 1], [1, 1], 1, "relu", a, 0.2,
                                           torch.randn_like(x).requires_grad_(), torch.randn_like(x).requires_grad_())),
        (torch.ops.nchains.masked_conv2d, (x, w, None, s, [1, 1], [1, 1], [1, 1], 1, "relu", a, 0.2, shortcut,
                                           shortcut)),
        (torch.ops.nchains._masked_conv2d, (xcl, torch.randn(4, 4, 3, 3), None, torch.randn(4), [2, 2], [1, 1],
                                            [1, 1], 1, "none", None, 0.2, torch.randn(2, 4, 3, 3), None)),
        (torch.ops.nchains.gate, (x, torch.randn_like(x).requires_grad_(), a, 0.2)),
        (torch.ops.nchains.gate, (xcl, torch.randn(2, 4, 6, 6), torch.tensor(0.3), 0.5)),
        (torch.ops.nchains.taylor_contributions, (x, torch.randn_like(x), "channel", False)),
        (torch.ops.nchains.taylor_contributions, (xcl, torch.randn(2, 4, 6, 6), "none", True)),
    ]


@pytest.mark.parametrize("index", range(10))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


def test_opcheck_samples_include_a_grouped_conv():
    grouped = [args for op, args in _opcheck_samples() if op is torch.ops.nchains.masked_conv2d and args[7] > 1]
    assert grouped and all(args[1].shape[1] * args[7] == args[0].shape[1] for args in grouped)


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.scale1 = torch.nn.Parameter(torch.ones(8))
        self.scale2 = torch.nn.Parameter(torch.ones(8))
        self.alpha = torch.nn.Parameter(torch.tensor(0.0))
        self.beta = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        h = ops.masked_conv2d(x, self.w1, None, self.scale1, padding=1, activation="relu")
        h2 = ops.masked_conv2d(h, self.w2, None, self.scale2, padding=1, activation="relu", gate_logit=self.alpha)
        h3 = ops.gate(h2 * 2, h, self.beta)
        t = ops.taylor_contributions(h3, torch.ones_like(h3))
        return t.sum(1)


def test_torch_compile_fullgraph_forward_and_backward():
    net = _TinyNet()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out, expected = compiled(x), net(x)
    torch.testing.assert_close(out, expected)
    g_c = torch.autograd.grad(out.sum(), list(net.parameters()))
    g_e = torch.autograd.grad(net(x).sum(), list(net.parameters()))
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_forward():
    net = _TinyNet()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x))


def test_torch_export_roundtrip(tmp_path):
    net = _TinyNet().eval()
    x = torch.randn(2, 3, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(net, (x,), dynamic_shapes={"x": {0: batch}})
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("nchains" in n for n in names), names
    path = tmp_path / "tiny.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    x5 = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(loaded(x5), net(x5))


@pytest.mark.parametrize("call,match,exc", [
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 5, 5).int(), torch.randn(4, 4, 3, 3), None, torch.ones(4)),
     "input must be float32 or float64", TypeError),
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3).double(), None, torch.ones(4)),
     "weight must have the dtype of input", TypeError),
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), None, torch.ones(3)),
     r"scale must have shape \[4\]", ValueError),
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), None, torch.ones(4),
                               activation="gelu"), "activation must be one of", ValueError),
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), None, torch.ones(4),
                               gate_logit=torch.tensor(0.0)), "gated masked_conv2d needs an output shaped", ValueError),
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), None, torch.ones(4), padding=1,
                               gate_logit=torch.zeros(1)), "gate_logit must be a 0-d tensor", ValueError),
    (lambda: ops.masked_conv2d(torch.randn(1, 6, 5, 5), torch.randn(4, 4, 3, 3), None, torch.ones(4)),
     "input has 6 channels", ValueError),
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), None, torch.ones(4),
                               residual=torch.randn(1, 4, 5, 5)), r"residual must have the output's shape", ValueError),
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), None, torch.ones(4),
                               gate_input=torch.randn(1, 4, 3, 3)), "gate_input needs gate_logit", ValueError),
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), None, torch.ones(4),
                               gate_logit=torch.tensor(0.0), gate_input=torch.randn(1, 4, 5, 5)),
     "needs an output shaped like gate_input", ValueError),
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), None, torch.ones(4), stride=0),
     "stride must be >= 1", ValueError),
    (lambda: ops.masked_conv2d(torch.randn(1, 4, 2, 2), torch.randn(4, 4, 3, 3), None, torch.ones(4)),
     "too small for kernel", ValueError),
    (lambda: ops.gate(torch.randn(2, 3), torch.randn(2, 4), torch.tensor(0.0)), "block_in must have the shape",
     ValueError),
    (lambda: ops.gate(torch.randn(2, 3), torch.randn(2, 3), torch.tensor(0.0), temperature=0.0),
     "temperature must be > 0", ValueError),
    (lambda: ops.taylor_contributions(torch.randn(2, 3), torch.randn(2, 3), reduction="mean"),
     "reduction must be one of", ValueError),
    (lambda: ops.taylor_contributions(torch.randn(3), torch.randn(3)), "activation must have shape", ValueError),
    (lambda: ops.taylor_contributions(torch.randn(2, 3), torch.randn(2, 3, 1)), "grad must have the shape",
     ValueError),
])
def test_bad_arguments_raise_clear_errors(call, match, exc):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.cuda
def test_cuda_matches_cpu():
    for cfg in _conv_configs(count=10):
        (x, w, b, s, gate, r, xin), kwargs = _conv_args(cfg)
        out = ops.masked_conv2d(x, w, b, s, **kwargs)
        to = lambda t: None if t is None else t.detach().cuda().requires_grad_()  # noqa: E731
        xc, wc, bc, sc, gc, rc, xinc = map(to, (x, w, b, s, gate, r, xin))
        out_c = ops.masked_conv2d(xc, wc, bc, sc, **{**kwargs, "gate_logit": gc, "residual": rc, "gate_input": xinc})
        torch.testing.assert_close(out_c.cpu(), out, **_tol(cfg["dtype"]))
    a, g = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(ops.taylor_contributions(a.cuda(), g.cuda()).cpu(), ops.taylor_contributions(a, g))
    torch.testing.assert_close(ops.gate(a.cuda(), g.cuda(), torch.tensor(0.3).cuda()).cpu(),
                               ops.gate(a, g, torch.tensor(0.3)))
