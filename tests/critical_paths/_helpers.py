"""Independent references for the critical-path tests: neuron MCT from per-call taps, and
small models (a plain CNN whose layers differ in size, hence in contribution scale)."""

from __future__ import annotations

import torch
from torch import nn

from nchains.instrument.taps import sites, tap


def neuron_mct(graph, image, target=None):
    """|a * dPhi/da| per activation site at one image (dict key -> Tensor[*site shape]), and the target."""
    chosen = sites(graph)
    logits, values = tap(graph, chosen)(image)
    t = int(logits[0].argmax()) if target is None else target
    grads = torch.autograd.grad(logits[0, t], list(values.values()))
    return {k: (v * g)[0].abs().detach() for (k, v), g in zip(values.items(), grads)}, t


class PlainCNN(nn.Module):
    """conv-relu (16x8x8 neurons) -> conv-relu (4x1x1 neurons) -> linear: two sites of very
    different sizes, so a neuron of the small one carries far more of the response."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 4, 8)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


def plain_cnn(seed: int = 0) -> PlainCNN:
    torch.manual_seed(seed)
    model = PlainCNN().eval()
    with torch.no_grad():  # positive biases: most neurons active, every site contributes
        model.conv1.bias.uniform_(0.0, 0.5)
        model.conv2.bias.uniform_(0.5, 1.0)
    return model
