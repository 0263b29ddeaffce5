"""Run by tests/test_kernels_compile_for_gpus.py, without TRITON_INTERPRET: compiles every Triton kernel
launch of the seed UNet's training step (forward and backward, fp32 and fp16 autocast; bf16 where the
card has it) and of its channels-last sampling step ahead of time for a T4 (sm_75), an H100
(sm_90) and, in bf16, an A100 (sm_80), with no GPU, and prints one JSON line per compiled kernel: its launch, shared memory, and
registers and spill bytes per thread.

The kernels' launch sites are run for real on CPU tensors with each @triton.jit kernel replaced by a
recorder, so the launch configs are the ones the code picks (attention's depends on the card: its SM
count and compute capability are patched in).
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ddpm import config, model
from kernels import attention, group_norm_silu

ROOT = Path(__file__).resolve().parents[1]
GPUS = {  # compute capability, SMs, shared memory per block (bytes), dtypes it runs
    "T4": (75, 40, 64 * 1024, (torch.float32, torch.float16)),
    "H100": (90, 132, 227 * 1024, (torch.float32, torch.float16, torch.bfloat16)),
    # compute capability 8.x: attention's tensor-core tiles without Hopper's 32-row cap, in bf16
    # (`auto` there; fp16's tiles are the same)
    "A100": (80, 108, 163 * 1024, (torch.bfloat16,)),
}
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNELS = [(group_norm_silu, "_fwd_kernel"), (group_norm_silu, "_bwd_kernel"), (attention, "_fwd_kernel"),
           (attention, "_bwd_dq_kernel"), (attention, "_bwd_dkdv_kernel")]


class Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    case = "seed UNet"

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((Recorder.case, self.fn, args, kwargs))
        return launch


def signature(fn, args, kwargs):
    sig, constants = {}, {}
    runtime_args = iter(args)
    for param in fn.params:
        if param.is_constexpr:
            sig[param.name], constants[param.name] = "constexpr", kwargs[param.name]
            continue
        arg = next(runtime_args)
        if isinstance(arg, torch.Tensor):
            sig[param.name] = "*" + TRITON_DTYPES[arg.dtype]
        elif isinstance(arg, bool):
            sig[param.name] = "i1"
        elif isinstance(arg, int) and arg == 1:  # Triton's launcher compiles an int equal to 1 as a constant
            sig[param.name], constants[param.name] = "constexpr", 1
        elif isinstance(arg, int):
            sig[param.name] = "i32" if -2**31 <= arg < 2**31 else "i64"
        elif isinstance(arg, float):
            sig[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {param.name}={arg!r}")
    return sig, constants


def resource_usage(ptx: str) -> dict:
    """Registers and spill bytes per thread, from ptxas -v (the assembler Triton itself runs)."""
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    arch = re.search(r"^\.target (\w+)", ptx, re.MULTILINE).group(1)  # sm_75, sm_90a
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", str(src), "-o", str(src.with_suffix(".o"))],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_stores, spill_loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return {"registers": registers, "spill_bytes": spill_stores + spill_loads}


def record_launches(sms: int, major: int, dtype: torch.dtype) -> list:
    launches = []
    for module, name in KERNELS:
        setattr(module, name, Recorder(getattr(module, name), launches))
    torch.cuda.get_device_properties = lambda device: SimpleNamespace(major=major, multi_processor_count=sms)
    choose = attention._launch_config
    attention._launch_config = lambda *args: choose(*args[:-1], torch.device("cuda"))
    cfg = config.load(ROOT / "configs/mnist.yaml", ["model.kernels=triton", "model.attention=triton"])
    net = model.build(cfg, "cpu")
    x, t = torch.randn(2, 1, 32, 32), torch.randint(0, 1000, (2,))
    Recorder.case = "seed UNet"
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        net(x, t).float().sum().backward()
    # Sampling: inductor runs an inference graph's convolutions channels-last, and the GroupNorm
    # op reads and writes that layout as it is; the compiled step's time biases are one [1, C] row
    # of a table for the whole batch (ddpm.sample.FastStep).
    Recorder.case = "seed UNet, channels-last sampling"
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        table = net.time_biases(torch.arange(999, -1, -1))
        net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last),
                                                  time_biases=[biases[:1] for biases in table])
    # Attention's tiles depend on the batch (enough programs to fill the SMs): the seed's training
    # batches; then wider models' heads and attention at 16x16.
    for case, batch, heads, seq in (("seed UNet", 64, 1, 64), ("seed UNet", 512, 1, 64),
                                    ("4 heads", 64, 4, 64), ("256 tokens", 64, 1, 256)):
        Recorder.case = case
        qkv = torch.randn(batch, 768, seq, dtype=dtype, requires_grad=True)
        attention.attention(qkv, heads).sum().backward()
    for module, name in KERNELS:
        setattr(module, name, getattr(module, name).fn)
    attention._launch_config = choose
    return launches


def main():
    seen = set()
    for gpu, (capability, sms, smem_limit, dtypes) in GPUS.items():
        for dtype in dtypes:
            for case, fn, args, kwargs in record_launches(sms, capability // 10, dtype):
                sig, constants = signature(fn, args, kwargs)
                options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
                key = (gpu, fn.__name__, fn.__module__, json.dumps(sig), json.dumps(constants), json.dumps(options))
                if key in seen:
                    continue
                seen.add(key)
                compiled = triton.compile(ASTSource(fn, sig, constants), target=GPUTarget("cuda", capability, 32),
                                          options=options)
                print(json.dumps({"gpu": gpu, "case": case, "kernel": f"{fn.__module__}.{fn.__name__}", "signature": sig,
                                  "constants": constants, "options": options,
                                  "shared_bytes": compiled.metadata.shared, "shared_limit": smem_limit,
                                  **resource_usage(compiled.asm["ptx"])}), flush=True)


if __name__ == "__main__":
    assert "TRITON_INTERPRET" not in os.environ, "compiling for a GPU needs Triton's compiler, not its interpreter"
    sys.exit(main())
