"""Microbenchmark of the bottleneck attention core: torch (einsum), sdpa and triton backends.

    python -m bench.bench_attention [--device cuda] [--quick]

Times forward and forward+backward at the model's shape (C=256, N=64 tokens, one head) for
fp32, fp16 and, where the GPU has it, bf16. FLOPs counted: 4*B*heads*N*N*d forward (two
matmuls), 2.5 times that for the backward.
"""
import os

import torch

from bench.timing import run_microbenchmark, time_fn
from ddpm.runtime import has_bf16

MODEL_SHAPE = dict(channels=256, seq=64, heads=1)
QUICK_SHAPE = dict(channels=64, seq=16, heads=1)


def _dtypes(device: torch.device):
    """The dtype the model runs under autocast first (bf16 where the GPU has it, else fp16), so a
    run cut short by a time limit has measured it; then fp32. bf16 only on a GPU that has it: the
    CPU path is the Triton interpreter, where bf16 tl.dot is wrong."""
    if has_bf16(device):
        return [torch.bfloat16, torch.float32, torch.float16]
    return [torch.float16, torch.float32]


def run(device: str, batch_sizes=(64, 512), quick: bool = False):
    """Yields one row per measurement, as it is taken (a run cut short keeps what it measured)."""
    device = torch.device(device)
    if device.type == "cpu":
        # Must precede the first import of the Triton kernels (see tests/conftest.py).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kernels import reference
    from kernels.attention import attention as triton_attention
    backends = {"torch": reference.attention, "sdpa": reference.attention_sdpa, "triton": triton_attention}

    shape = QUICK_SHAPE if quick else MODEL_SHAPE
    if quick:
        batch_sizes = (2,)
    channels, seq, heads = shape["channels"], shape["seq"], shape["heads"]
    head_dim = channels // heads
    timing = dict(warmup=1, repeats=3) if quick else dict(warmup=5, repeats=30)
    for dtype in _dtypes(device):
        for batch in batch_sizes:
            fwd_flops = 4 * batch * heads * seq * seq * head_dim
            qkv = torch.randn(batch, 3 * channels, seq, device=device, dtype=dtype)
            dout = torch.randn(batch, channels, seq, device=device, dtype=dtype)
            qkv_grad = qkv.clone().requires_grad_()
            for backend, attention in backends.items():
                def forward(attention=attention):
                    return attention(qkv, heads)

                def forward_backward(attention=attention):
                    out = attention(qkv_grad, heads)
                    return torch.autograd.grad(out, qkv_grad, dout)

                for pass_name, fn, flops in (("fwd", forward, fwd_flops),
                                             ("fwd+bwd", forward_backward, 3.5 * fwd_flops)):
                    t = time_fn(fn, device=device, **timing)
                    yield {"op": "attention", "variant": backend,
                           "shape": f"B{batch} C{channels} N{seq} h{heads}",
                           "dtype": str(dtype).removeprefix("torch."), "pass": pass_name,
                           "median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"],
                           "tflops": flops / (t["median_ms"] * 1e-3) / 1e12}


def _print_table(rows):
    header = f"{'variant':<8} {'shape':<20} {'dtype':<9} {'pass':<8} {'median_ms':>10} {'iqr_ms':>8} {'TFLOP/s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['variant']:<8} {r['shape']:<20} {r['dtype']:<9} {r['pass']:<8} "
              f"{r['median_ms']:>10.3f} {r['iqr_ms']:>8.3f} {r['tflops']:>8.3g}")


def main():
    run_microbenchmark("bench.bench_attention", __doc__,
                       "batch 2, C=64, N=16: a few seconds on CPU", run, _print_table)


if __name__ == "__main__":
    main()
