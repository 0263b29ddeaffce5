"""torchrun / DDP set-up. One process per GPU (or per CPU process with gloo); rank 0 alone writes."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group that torchrun describes in the environment (nothing to do without it).
    On CUDA each process takes the GPU of its local rank and talks NCCL; on CPU, gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(), device
    world = World(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def from_main(world: World, value):
    """Rank 0's value (any picklable object; others pass None) on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across(world: World, tensor: torch.Tensor) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor)
    return tensor
