"""What the benchmark files share: base configs, synthetic digits, peaks, model FLOPs."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpm import config, model
from ddpm.runtime import has_bf16

REPO_CONFIGS = {"full": "configs/mnist.yaml", "quick": "configs/ci.yaml"}
T4_MEMORY_BYTES = 15 * 2**30  # a 16 GB T4 leaves about 15 GiB to a process


def load_config(quick: bool, overrides, device) -> config.Config:
    cfg_path = REPO_CONFIGS["quick" if quick else "full"]
    return config.load(cfg_path, [*overrides, f"train.device={device.type}"])


def synthetic_digits(n: int = 4096, seed: int = 0) -> torch.Tensor:
    """uint8 28x28 images: throughput does not depend on what the pixels show."""
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def consecutive_steps(fn, steps: int, device):
    """A benchmark round: fn(step) for the next `steps` step numbers, then a device sync. Rounds
    continue where the last stopped, so a trainer or loader never repeats a step."""
    state = {"next": 0}

    def run():
        for _ in range(steps):
            fn(state["next"])
            state["next"] += 1
        sync(device)
    return run


def flops_per_image(cfg) -> dict:
    """Forward and forward+backward FLOPs of the UNet for one image (torch.utils.flop_counter)."""
    values = cfg.to_dict()
    values["model"].update(kernels="torch", attention="torch")
    net = model.build(config.from_dict(values))
    x, t = torch.randn(2, 1, cfg.data.image_size, cfg.data.image_size), torch.tensor([1, 500])
    with FlopCounterMode(display=False) as fwd:
        out = net(x, t)
    with FlopCounterMode(display=False) as bwd:
        out.square().mean().backward()
    return {"forward": fwd.get_total_flops() / 2, "forward_backward": (fwd.get_total_flops() + bwd.get_total_flops()) / 2}


def measure_peaks(device, quick: bool) -> dict:
    """Dense matmul FLOP/s (bf16 where the card has it, else fp16; fp32 on CPU) and copy bandwidth."""
    from bench.timing import time_fn
    if device.type == "cuda":
        dtype = torch.bfloat16 if has_bf16(device) else torch.float16
        n, copy_bytes = 8192, 2**30
    else:
        dtype, n, copy_bytes = torch.float32, 1024, 2**26
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    mm = time_fn(lambda: a @ b, warmup=3, repeats=5 if quick else 20, device=device)
    src = torch.empty(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    cp = time_fn(lambda: dst.copy_(src), warmup=3, repeats=5 if quick else 20, device=device)
    return {"matmul_dtype": str(dtype).removeprefix("torch."),
            "matmul_tflop_per_s": 2 * n**3 / (mm["median_ms"] * 1e-3) / 1e12,
            "copy_gb_per_s": 2 * copy_bytes / (cp["median_ms"] * 1e-3) / 1e9}


