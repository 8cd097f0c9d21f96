"""What the ranks of a torchrun job exchange inside a training step: each rank's shard of a global batch, the
averaged gradients, sums over the ranks, rank 0's module state, and BatchNorm statistics over every rank. Each is
the identity in a single process. Who the ranks are and how a command's process group lives and ends is
`flexslim.system.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from flexslim.system.distributed import _CUDA_RANKS, rank, world_size

if TYPE_CHECKING:
    import torch
    from torch import nn


# -- the collectives of a training step -----------------------------------------------------------------------
def shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global batch (rank r gets the r-th of N near-equal, contiguous slices)."""
    n = world_size()
    return t if n == 1 else t.tensor_split(n)[rank()]


def average_gradients(params: Sequence[nn.Parameter], local: int, total: int, scalars: Sequence[float] = ()) -> list:
    """Make every .grad the global-batch gradient: sum over ranks of grad_r * local_r / total (the mean over
    ranks when the shards are equal), in one all-reduce. `scalars` (e.g. this shard's mean loss) are averaged
    the same way and returned; parameters without a gradient stay without one on every rank."""
    if world_size() == 1:
        return list(scalars)
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    parts = [g.reshape(-1).float() for g in grads] + [torch.tensor(list(scalars), dtype=torch.float32, device=device)]
    flat = torch.cat(parts).mul_(local / total)
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[offset:].tolist()


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum of `values` over the ranks (float64)."""
    if world_size() == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers (BatchNorm statistics) into every rank's copy of `module`, in place."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


# -- BatchNorm over all ranks ---------------------------------------------------------------------------------
def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Batch statistics over the global batch instead of each rank's shard: torch's SyncBatchNorm on CUDA; on
    the CPU (which SyncBatchNorm refuses) every BatchNorm2d becomes a `CpuSyncBatchNorm2d` in place. The
    parameters, buffers and state_dict keys stay the same. A single process gets the module unchanged."""
    if world_size() == 1:
        return module
    from torch import nn

    if _CUDA_RANKS[0]:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = _cpu_sync_bn_class()
    return module


_CPU_SYNC_BN = None


def _cpu_sync_bn_class():
    """The CPU SyncBatchNorm class (defined on first use so importing this module does not import torch)."""
    global _CPU_SYNC_BN
    if _CPU_SYNC_BN is not None:
        return _CPU_SYNC_BN
    import torch
    import torch.distributed as dist
    from torch import nn

    class AllReduce(torch.autograd.Function):
        """Sum over the ranks; the gradient of a sum that every rank holds is the sum of the ranks' gradients."""

        @staticmethod
        def forward(ctx, t):
            t = t.clone()
            dist.all_reduce(t)
            return t

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    all_reduce = AllReduce.apply

    class CpuSyncBatchNorm2d(nn.BatchNorm2d):
        """BatchNorm2d whose training statistics are those of the whole global batch: two differentiable
        all-reduces (mean, then variance), so the backward pass also sums over the ranks, as SyncBatchNorm's."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or world_size() == 1:
                return super().forward(x)
            c = x.shape[1]
            sums = all_reduce(torch.cat([x.sum((0, 2, 3)), x.new_tensor([x.numel() / c])]))  # channel sums, count
            count = sums[c]
            mean = sums[:c] / count
            centred = x - mean.view(1, c, 1, 1)
            var = all_reduce(centred.pow(2).sum((0, 2, 3))) / count  # biased, as BatchNorm normalises with
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    n = float(count)
                    self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                    self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1.0)), alpha=m)
            y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
            if self.affine:
                y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
            return y

    _CPU_SYNC_BN = CpuSyncBatchNorm2d
    return _CPU_SYNC_BN
