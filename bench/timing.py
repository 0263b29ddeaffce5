"""Timing shared by the kernel microbenchmarks: GPU time from CUDA events on a GPU, perf_counter on
CPU; median and spread. And their command line (run_microbenchmark)."""
import argparse
import statistics
import time

import torch

from ddpm import cli

# Larger than any GPU's L2 (H100: 50 MB): zeroing it before each call leaves the kernel a cold L2,
# as triton.testing.do_bench does, so a batch-512 activation cannot be read from cache call after call.
L2_FLUSH_BYTES = 256 * 2**20
# The GPU spins this long before each call, so the host has queued the call before the GPU reaches
# it: the events time the kernels, not Python's launch overhead (the whole-step benchmarks have that).
HOST_LEAD_CYCLES = 4_000_000  # ~2 ms at a T4's or an H100's clock


def time_fn(fn, *, warmup: int = 3, repeats: int = 10, device: str | torch.device = "cpu") -> dict:
    """Run `fn()` `warmup` times, then time `repeats` calls one by one. Milliseconds."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        with torch.cuda.device(device):  # the spin and the events go to the current device's stream
            flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(repeats)]
            torch.cuda.synchronize(device)
            for start, end in events:
                torch.cuda._sleep(HOST_LEAD_CYCLES)
                flush.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q1, q3 = times[len(times) // 4], times[(3 * len(times)) // 4]
    return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1],
            "iqr_ms": q3 - q1, "repeats": repeats}


def run_microbenchmark(prog: str, doc: str, quick_help: str, run, print_table) -> None:
    """`python -m bench.<prog> [--device D] [--batch-sizes B ...] [--quick]`: print_table(run(device, batch_sizes, quick))."""
    parser = cli.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=cli.device, default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--batch-sizes", type=cli.positive, nargs="+", default=[64, 512], help="default: 64 512")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args()
    print_table(run(args.device, tuple(args.batch_sizes), args.quick))
