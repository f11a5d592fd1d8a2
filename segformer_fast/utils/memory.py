"""Measure what autograd keeps for backward: the bytes of saved activations, parameters excluded."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["SavedTensorRecorder", "saved_activation_bytes"]


class SavedTensorRecorder:
    """Context manager recording every tensor autograd saves for backward.

    Storages are counted once (views of one buffer share it); tensors whose storage belongs to one
    of ``exclude`` (the model's parameters and buffers) are not counted.

    Example:
        >>> with SavedTensorRecorder(model.parameters()) as rec:
        ...     loss = model(x).sum()
        >>> rec.bytes, rec.shapes[:3]
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[tuple, int] = {}
        self.shapes: list[tuple[int, ...]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(t.shape))
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr != 0:
            key = (t.device.type, t.device.index, ptr)
            self._seen[key] = max(self._seen.get(key, 0), storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "SavedTensorRecorder":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves while running ``fn()`` (a forward pass), parameters in ``exclude`` not counted."""
    with SavedTensorRecorder(exclude) as rec:
        out = fn()
    del out
    return rec.bytes
