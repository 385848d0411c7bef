"""Independent references for the baseline tests: masked forwards with module hooks (not the fx
rewrite nchains uses), and small networks whose ReLU modules are each called once."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-relu (8x6x6) -> conv-relu (6x4x4) -> linear-relu (12) -> linear (4): three sites."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.act2 = nn.ReLU()
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.act3 = nn.ReLU()
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc2(self.act3(self.fc1(torch.flatten(x, 1))))


def small_cnn(seed: int = 0, bias: float = 0.1) -> SmallCNN:
    """Seeded random SmallCNN; ``bias`` shifts every bias (positive: more neurons alive)."""
    torch.manual_seed(seed)
    model = SmallCNN().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.add_(bias)
    return model


def relu_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """name -> ReLU module, in definition order (= execution order for SmallCNN / Sequential nets)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.ReLU)}


def masked_scores(model: nn.Module, image: torch.Tensor, masks: Dict[str, torch.Tensor], target: int
                  ) -> Dict[str, torch.Tensor]:
    """|a·∂Φ/∂a| per ReLU of the network whose ReLU outputs are multiplied by ``masks`` (forward
    hooks), at one image: dict name -> Tensor[*site shape]."""
    outs, handles = {}, []
    for name, m in relu_modules(model).items():
        def hook(_m, _inp, out, name=name):
            gated = out * masks[name].to(out.dtype)
            outs[name] = gated
            return gated
        handles.append(m.register_forward_hook(hook))
    try:
        logits = model(image)
        grads = torch.autograd.grad(logits[0, target], list(outs.values()))
    finally:
        for h in handles:
            h.remove()
    return {k: (v * g)[0].abs().detach() for (k, v), g in zip(outs.items(), grads)}


def original_activations(model: nn.Module, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Each ReLU's output at one image (forward hooks): dict name -> Tensor[*site shape]."""
    outs, handles = {}, []
    for name, m in relu_modules(model).items():
        handles.append(m.register_forward_hook(lambda _m, _i, out, name=name: outs.__setitem__(name, out[0].detach())))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for h in handles:
            h.remove()
    return outs


def greedy_by_hand(model: nn.Module, image: torch.Tensor, kappa: int, target: int, step: float = 0.01,
                   max_steps: int = 10_000):
    """Algorithm 1 step by step with hooks and a stable sort of one flat list per step.

    Returns:
        (masks dict name -> BoolTensor, whether it stopped because the non-zero scores ran out).
    """
    names = list(relu_modules(model))
    acts = original_activations(model, image)
    masks = {k: torch.ones_like(acts[k], dtype=torch.bool) for k in names}
    for _ in range(max_steps):
        scores = masked_scores(model, image, masks, target)
        m = torch.cat([masks[k].flatten() for k in names])
        s = torch.cat([scores[k].flatten() for k in names])
        kept = int(m.sum())
        if kept <= kappa:
            return masks, False
        live = torch.nonzero(m & (s != 0)).flatten()
        if len(live) == 0:
            return masks, True
        n_rm = min(max(1, round(step * kept)), kept - kappa, len(live))
        order = torch.sort(s[live], stable=True).indices[:n_rm]
        m[live[order]] = False
        start = 0
        for k in names:
            size = masks[k].numel()
            masks[k] = m[start:start + size].reshape(masks[k].shape)
            start += size
    raise AssertionError("greedy_by_hand did not finish")
