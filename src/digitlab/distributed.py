"""Data-parallel training through torch.distributed, as launched by `torchrun`.

`torchrun --nproc-per-node 2 -m digitlab train ...` sets RANK/WORLD_SIZE/MASTER_ADDR; each
rank then trains on its shard of every epoch with gloo (CPU) or NCCL (CUDA), and only
rank 0 writes the run folder. Without those variables everything here is a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from digitlab.errors import DigitlabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(ctx: DistContext, device: torch.device) -> torch.device:
    """Join the process group (once); returns the device this rank trains on."""
    if not ctx.enabled:
        return device
    if not dist.is_available():
        raise DigitlabError("this torch build has no torch.distributed support")
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)
        log.info("rank %d/%d joined (%s)", ctx.rank, ctx.world_size, backend)
    return device


def sum_values(ctx: DistContext, values: list[float], device: torch.device) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any: all ranks stop at the same step."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_tensor(ctx: DistContext, tensor: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped CPU tensor (RNG states), indexed by rank."""
    if not ctx.enabled:
        return [tensor]
    local = tensor.to(device).contiguous()  # NCCL only moves device tensors
    out = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(out, local)
    return [t.cpu() for t in out]


def ordered_mean_hook(process_group: dist.ProcessGroup | None,
                      bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the mean of every rank's gradients, summed in rank order.

    DDP's own all-reduce sums each element in an order set by where it sits in its bucket, and DDP
    lays its buckets out anew after a process's first step: with three or more ranks a resumed
    process (whose first step is the fresh layout) then rounds its first update differently from
    the uninterrupted run. Gathering the buckets and adding them rank 0 first makes every element's
    sum the same whatever the layout, on every rank and after any resume.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    local = bucket.buffer()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]

    def mean(fut: torch.futures.Future) -> torch.Tensor:
        fut.wait()  # on CUDA: this callback's stream waits for the gather
        if local.is_cuda:  # `parts` are read on that stream, and freed once this returns
            stream = torch.cuda.current_stream(local.device)
            for part in parts:
                part.record_stream(stream)
        total = parts[0].clone()
        for part in parts[1:]:
            total.add_(part)
        return total.div_(len(parts))

    return dist.all_gather(parts, local, group=group, async_op=True).get_future().then(mean)


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """`model` wrapped for this process group, its gradients averaged by `ordered_mean_hook`."""
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # DDP refuses a hook whose annotations it cannot compare (this module's are strings): an unannotated shim
    wrapped.register_comm_hook(None, lambda group, bucket: ordered_mean_hook(group, bucket))
    return wrapped


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
