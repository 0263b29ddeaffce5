"""torchrun / DDP set-up. One process per GPU (or per CPU process with gloo); rank 0 alone writes."""
import contextlib
import inspect
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_DDP_PARAMETERS = inspect.signature(DistributedDataParallel.__init__).parameters


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


def wrap(module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP as training uses it: around the compiled UNet (compile first, as nanoGPT does: one graph,
    DDP's hooks on the same parameters), gradients as views of DDP's buckets, a static graph."""
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    # The one buffer, the sinusoid frequencies, is a constant: no broadcast before each forward
    # (torch >= 2.13 names that forward_sync_buffers and deprecates broadcast_buffers=False).
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_PARAMETERS
                      else {"broadcast_buffers": False})
    # The compiled backward gives the input convolution's [C, 1, 3, 3] weight the gradient strides
    # (9, 1, 3, 1), DDP's bucket view has (9, 9, 3, 1): the same memory, since a size-1 dimension's
    # stride is never used, but DDP compares strides and warns of a slow copy at every run.
    warnings.filterwarnings("ignore", message=r"(?s)Grad strides do not match bucket view strides"
                                              r".*grad\.sizes\(\) = \[\d+, 1, 3, 3\]")
    return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True, static_graph=True,
                                   **no_buffer_sync)


@contextlib.contextmanager
def solo_group(device: torch.device):
    """A process group of this process alone (NCCL on CUDA, gloo on CPU): DDP's machinery (its hooks,
    buckets and all-reduce) without a second GPU, to measure what it costs on one and to test that it
    composes with CUDA graphs. torchrun's own runs never need it."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized")
    with socket.socket() as s:  # a free port for the rendezvous of one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


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
