"""Autocast policy of the fused layers.

torch.autocast does not reach inside custom ops, so each fused layer states its policy: under
autocast it runs in fp32 (inputs upcast, autocast off inside), like the precision-sensitive ops
autocast already keeps in fp32 (softmax, layer_norm). Its output is fp32; the next autocast op
casts it down again.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["fp32_under_autocast"]


def _float(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_float(t) for t in x)
    return x


def _device_type(x) -> str:
    return x.device.type if isinstance(x, torch.Tensor) else x[0].device.type


def fp32_under_autocast(forward):
    """Decorate a fused layer's ``forward(self, x, ...)``: under autocast, run it in fp32."""

    @functools.wraps(forward)
    def wrapper(self, x, *args, **kwargs):
        dev = _device_type(x)
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return forward(self, _float(x), *args, **kwargs)
        return forward(self, x, *args, **kwargs)

    return wrapper
