"""Timing shared by every benchmark: CUDA events on a GPU, perf_counter on CPU; median and spread."""
import statistics
import time

import torch


def time_fn(fn, *, warmup: int = 3, repeats: int = 10, device: str | torch.device = "cpu") -> dict:
    """Run `fn()` `warmup` times, then time `repeats` calls one by one. Milliseconds."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q1, q3 = times[len(times) // 4], times[(3 * len(times)) // 4]
    return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1],
            "iqr_ms": q3 - q1, "repeats": repeats}
