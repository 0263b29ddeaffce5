"""Microbenchmark of GroupNorm(x + t) + SiLU at the UNet's shapes: Triton op vs eager vs torch.compile.
"triton-tiled" is the op made to walk a group in tiles where it would hold it whole in registers.

    python -m bench.bench_group_norm_silu [--device cuda] [--quick] [--batch-sizes 64 512]

Without a GPU the Triton variant runs in the interpreter (~3 ms per program): use --quick there.
"""
import os
from contextlib import nullcontext
from unittest.mock import patch

import torch  # noqa: E402  (does not import triton)

# The interpreter must be chosen before triton is first imported (same rule as tests/conftest.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.timing import run_microbenchmark, time_fn  # noqa: E402
from ddpm.runtime import has_bf16  # noqa: E402
from kernels import group_norm_silu as group_norm_silu_kernels, reference  # noqa: E402
from kernels.group_norm_silu import group_norm_silu as triton_group_norm_silu  # noqa: E402

# (C, H, W, groups) of every GroupNorm in the UNet, largest first: a run cut short by a time limit
# has measured the shapes where bandwidth counts most.
UNET_SHAPES = [(128, 32, 32, 8), (64, 32, 32, 8), (256, 16, 16, 8), (128, 16, 16, 8),
               (64, 16, 16, 8), (256, 8, 8, 8), (128, 8, 8, 8), (1, 32, 32, 1)]
QUICK_SHAPES = [(8, 8, 8, 2), (1, 32, 32, 1)]  # 16 and 8 programs at batch 8: seconds in the interpreter
QUICK_BATCH = 8


def _bytes_moved(n, c, h, w, dtype, with_backward):
    """Minimal traffic: read x, t, gamma, beta (fp32) and write y; backward adds read dy, x, t,
    gamma, beta and write dx, dt, dgamma, dbeta."""
    act = n * c * h * w * dtype.itemsize
    small = n * c * dtype.itemsize + 2 * c * 4
    forward = 2 * act + small
    return forward + (3 * act + 2 * small if with_backward else 0)


def _composite(x, *args):
    """The PyTorch form as the model runs it: under autocast, group_norm computes and returns fp32,
    and the next convolution casts that to the activations' dtype (the Triton op writes it directly)."""
    return reference.group_norm_silu(x, *args).to(x.dtype)


def _variants():
    """name -> (make the op, the context it is timed in)."""
    # A fresh dynamo cache per compiled variant: 8 shapes x batches x dtypes would otherwise pass
    # the recompile limit and silently fall back to eager.
    def compiled():
        torch._dynamo.reset()
        return torch.compile(_composite)

    def walking_tiles():  # the kernels' path for larger groups, forced: two reads of the inputs
        return patch.multiple(group_norm_silu_kernels, _MAX_ONE_TILE_FWD=0, _MAX_ONE_TILE_BWD=0)

    return {"triton": (lambda: triton_group_norm_silu, nullcontext),
            "triton-tiled": (lambda: triton_group_norm_silu, walking_tiles),
            "eager": (lambda: _composite, nullcontext), "compile": (compiled, nullcontext)}


def run(device: str, batch_sizes=(64, 512), quick: bool = False, dtypes=None):
    """Yields one row per measurement, as it is taken (a run cut short keeps what it measured)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if dtypes is None:
        half = torch.bfloat16 if has_bf16(device) else torch.float16
        dtypes = (torch.float32,) if quick or not on_gpu else (torch.float32, half)
    shapes = QUICK_SHAPES if quick else UNET_SHAPES
    batch_sizes = (QUICK_BATCH,) if quick else batch_sizes
    timing = dict(warmup=5, repeats=30) if on_gpu else dict(warmup=1, repeats=3)
    for dtype in dtypes:
        for n in batch_sizes:
            for c, h, w, groups in shapes:
                yield from _measure(device, n, c, h, w, groups, dtype, torch.contiguous_format, timing)
            if n == batch_sizes[0] and dtype == dtypes[-1]:
                # The sampling step's layout (inductor runs an inference graph channels-last on CUDA),
                # forward only, in the model's dtype, before the other batch sizes: a stage cut short
                # by its time limit lost these rows first. (One channel is both layouts.)
                for c, h, w, groups in (shape for shape in shapes if shape[0] > 1):
                    yield from _measure(device, n, c, h, w, groups, dtype, torch.channels_last, timing,
                                        passes=("fwd",))


def _measure(device, n, c, h, w, groups, dtype, memory_format, timing, passes=("fwd", "fwd+bwd")):
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(n, c, h, w, generator=gen).to(device, dtype).contiguous(memory_format=memory_format)
             for _ in range(2))
    t = torch.randn(n, c, generator=gen).to(device, dtype)
    # As in the model under autocast: half activations, fp32 affine parameters, and
    # the composite's group_norm running in fp32 (autocast's rule for it).
    gamma, beta = (torch.randn(c, generator=gen).to(device) for _ in range(2))
    leaves = [v.detach().requires_grad_() for v in (x, t, gamma, beta)]
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    layout = "" if memory_format == torch.contiguous_format else " channels-last"
    one_tile = group_norm_silu_kernels._launch_config(c // groups, h * w, False, backward=False)["ONE_TILE"]
    for variant, (make, context) in _variants().items():
        if variant == "triton-tiled" and not one_tile:
            continue  # "triton" walks tiles here already
        op = make()

        def forward(op=op):
            with torch.no_grad(), torch.autocast(**autocast):
                return op(x, gamma, beta, groups, 1e-5, t, True)

        def forward_backward(op=op):
            lx, lt, lg, lb = leaves
            with torch.autocast(**autocast):
                y = op(lx, lg, lb, groups, 1e-5, lt, True)
            return torch.autograd.grad(y, leaves, dy)

        for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            if name not in passes:
                continue
            with context():
                res = time_fn(fn, device=device, **timing)
            moved = _bytes_moved(n, c, h, w, dtype, name == "fwd+bwd")
            yield dict(op="group_norm_silu", variant=variant, shape=f"{n}x{c}x{h}x{w}/g{groups}{layout}",
                       dtype=str(dtype).removeprefix("torch."), **{"pass": name},
                       median_ms=res["median_ms"], iqr_ms=res["iqr_ms"],
                       gb_per_s=moved / (res["median_ms"] * 1e-3) / 1e9)


def _print_table(rows):
    rows = list(rows)
    cols = ["op", "variant", "shape", "dtype", "pass", "median_ms", "iqr_ms", "gb_per_s"]
    cells = [[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in cols] for r in rows]
    widths = [max(len(k), *(len(row[i]) for row in cells)) for i, k in enumerate(cols)]
    print("  ".join(k.ljust(wd) for k, wd in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(wd) for v, wd in zip(row, widths)))


def main():
    run_microbenchmark("bench.bench_group_norm_silu", __doc__,
                       "small shapes: the Triton interpreter takes ~3 ms per program on a CPU", run, _print_table)


if __name__ == "__main__":
    main()
