"""Independent references for the contribution tests: plain forward hooks, keyed per call.

A forward hook sees every call of a module; counting the calls gives the per-call keys
(``layer1.0.relu``, ``layer1.0.relu@1``) without any of nchains' graph machinery. In-place
modules are made out-of-place on a copy so a recorded output is never overwritten."""

import copy
from contextlib import contextmanager

import torch
from torch import nn


def out_of_place(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    return model


@contextmanager
def per_call(model: nn.Module, names, replace=None, retain=True):
    """Records ``{call key: output}`` of the modules ``names`` during the forwards in the block;
    ``replace[key](out)`` substitutes a call's output; outputs keep their gradient (retain_grad)."""
    replace = replace or {}
    seen, calls, handles = {}, {}, []

    def hook_for(name):
        def hook(module, inputs, out):
            k = calls.get(name, 0)
            calls[name] = k + 1
            key = name if k == 0 else f"{name}@{k}"
            if key in replace:
                out = replace[key](out)
            if retain and out.requires_grad:
                out.retain_grad()
            seen[key] = out
            return out
        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def relu_names(model: nn.Module):
    return [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
