"""SyncBatchNorm arithmetic shared by the fused layers that normalise with batch statistics."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["sync_batch_stats", "all_reduce_sum", "default_group"]


def default_group(enabled: bool, group=None):
    """The process group to sync BatchNorm statistics over, or None (not distributed / not enabled)."""
    if enabled and dist.is_available() and dist.is_initialized():
        return group if group is not None else dist.group.WORLD
    return None


def sync_batch_stats(mean: torch.Tensor, var: torch.Tensor, count: int, group) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's per-channel (mean, biased variance, count) combined exactly into the global batch's.

    Args:
        mean, var: (C,) this rank's batch mean and biased variance. count: its values per channel.
        group: the process group.
    Returns:
        (global mean, global biased variance, global count), the same on every rank.
    """
    c = mean.numel()
    stats = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, stats, group=group)
    stats = torch.stack(gathered)  # (world, 2C + 1)
    means, variances, counts = stats[:, :c], stats[:, c: 2 * c], stats[:, 2 * c:]
    total = counts.sum()
    gmean = (means * counts).sum(0) / total
    gvar = ((variances + (means - gmean) ** 2) * counts).sum(0) / total
    return gmean, gvar, int(total.item())


def all_reduce_sum(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """The sums over ranks of same-shaped tensors, in one all_reduce."""
    both = torch.stack(tensors)
    dist.all_reduce(both, group=group)
    return list(both.unbind(0))
