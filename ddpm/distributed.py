"""torchrun / DDP set-up. One process per GPU (or per CPU process with gloo); rank 0 alone writes.

  python -m ddpm.distributed [torchrun's options] train.py [its arguments]   (make train NPROC=N)

is torchrun, whose failures are one line (launch)."""
import contextlib
import inspect
import logging
import os
import signal
import socket
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ddpm.config import UserError

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
        processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world.local_rank + 1)), torch.cuda.device_count()
        if processes > gpus:
            raise UserError(f"torchrun started {processes} processes on this node, which has {gpus} GPU"
                            f"{'s' if gpus != 1 else ''}: one process per GPU, so set NPROC (--nproc_per_node) "
                            f"to at most {gpus}")
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


def launch(argv: list[str] | None = None) -> int:
    """`make train NPROC=N`: torchrun itself (torch.distributed.run: its options, its workers and its
    signal forwarding), whose failures read as one line instead of its traceback and failure table.
    A worker that stopped on bad input has printed its one-line error and exited with status 2;
    for any other failure this names the first rank that failed and how. Returns the exit status:
    the first failed worker's (128 + N for signal N)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, parse_args, run

    args = parse_args(argv)
    script = os.path.basename(args.training_script)
    try:
        local_world_size = determine_local_world_size(args.nproc_per_node)
        if local_world_size < 1:
            raise ValueError("no processes to start")
    except ValueError as e:
        print(f"torchrun: error: --nproc_per_node={args.nproc_per_node}: {e}; pass a count >= 1", file=sys.stderr)
        return 2
    if "OMP_NUM_THREADS" not in os.environ and local_world_size > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # torchrun's own default, without the banner it prints
    # its lines on stopping the other workers and on the failure, which the line below replaces
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        status = failure.exitcode
        if status < 0:
            print(f"{script}: rank {rank} was killed by {failure.signal_name()}"
                  f"{' (out of memory?)' if -status == signal.SIGKILL else ''}", file=sys.stderr)
            return 128 - status
        if status == 2 and failure.local_rank != 0:  # a quiet twin first: its reporter did not exit before it
            print(f"{script}: rank {rank} stopped on bad input (exit status 2) without printing it", file=sys.stderr)
        elif status not in (2, 128 + signal.SIGINT, 128 + signal.SIGTERM):  # said: bad input, stopped by a signal
            print(f"{script}: rank {rank} failed with exit status {status} (its error is above)", file=sys.stderr)
        return status
    except SignalException as e:  # the workers got the signal too, and have stopped
        return 128 + e.sigval
    return 0


if __name__ == "__main__":
    sys.exit(launch())
