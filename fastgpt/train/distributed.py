"""Process layout: one process, or torchrun's DDP/FSDP ranks (gloo on CPU, NCCL on GPUs), and the device each uses.

Multi-node runs are the same command under torchrun's rendezvous flags, e.g. on each of 2 nodes:
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=run1 \\
      -m fastgpt pretrain --preset gpt1
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


class LaunchError(ValueError):
    """A device or process layout that cannot run here (no GPU, more processes than GPUs...)."""


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int, world_size: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:  # not a device string at all ("foo")
        raise LaunchError(f"--device must be auto, cpu, cuda or cuda:N, got {requested!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise LaunchError(f"--device {requested}: no CUDA GPU is visible (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda is not None})")
        index = local_rank if device.index is None else device.index
        if world_size > 1 and device.index is None and local_rank >= count:
            raise LaunchError(
                f"this node runs at least {local_rank + 1} processes (torchrun --nproc_per_node) but has only "
                f"{count} GPU(s): use --nproc_per_node={count} or fewer"
            )
        if index >= count:
            raise LaunchError(f"--device {requested}: GPU index {index} asked for, only {count} GPU(s) visible")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise LaunchError(f"--device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    return device


def setup(requested_device: str) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group when there are ranks."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=30),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(rank, local_rank, world_size, device)


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
