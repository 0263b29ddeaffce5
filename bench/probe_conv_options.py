"""What two switches buy on this GPU: cuDNN's autotuner (torch.backends.cudnn.benchmark, global) and
inductor's freezing of the sampling step (weights folded as constants: no per-step casts to the
autocast dtype; ddpm.sample does it, the rows without it patch it out).

  python -m bench.probe_conv_options --out DIR

Rows, in one process: the 1000-step DDPM sampling step (64 images, seed UNet) per option set, ms per
step by the wall clock over timed rounds after the capture, each round ending in a device sync; the
eager fp32 loop for the ratio; then the default training step with and without cudnn.benchmark.
Each row prints as it is measured and is appended to DIR/conv-options.md, so a time limit leaves
what was measured."""
import argparse
import contextlib
import time
from pathlib import Path
from unittest import mock

import torch

from bench import variants
from bench.common import load_config, sync, synthetic_digits
import ddpm.sample
from ddpm import model
from ddpm.diffusion import Diffusion
from ddpm.runtime import compile_model
from ddpm.sample import FastStep
from ddpm.train import Trainer


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: to test this script
QUICK = DEVICE.type == "cpu"


def per_step_ms(fn, steps: int, rounds: int = 3) -> float:
    """The median over rounds of a round's time per step; a round ends in a device sync."""
    times = []
    for _ in range(rounds):
        sync(DEVICE)
        started = time.perf_counter()
        for i in range(steps):
            fn(i)
        sync(DEVICE)
        times.append((time.perf_counter() - started) * 1e3 / steps)
    return sorted(times)[len(times) // 2]


def sampling_row(name, overrides, cudnn_benchmark, freezing, steps):
    device = DEVICE
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch._dynamo.reset()  # else the step's code reuses the last row's graph: dynamo's guards ignore both switches
    cfg = load_config(QUICK, overrides, device)
    torch.manual_seed(0)
    net = model.build(cfg, device).eval()
    diffusion = Diffusion.from_config(cfg.diffusion, device)
    plan = diffusion.plan(cfg.sample)
    s = cfg.sample
    shape = (8 if QUICK else 64, 1, cfg.data.image_size, cfg.data.image_size)
    x, noise = torch.randn(shape, device=device), torch.randn(shape, device=device)
    started = time.perf_counter()
    # the step freezes its weights (ddpm.sample.compile_with_frozen_weights); the rows without: plain compile_model
    unfrozen = mock.patch.object(ddpm.sample, "compile_with_frozen_weights", compile_model)
    with contextlib.nullcontext() if freezing else unfrozen, torch.inference_mode():
        step = FastStep(net, plan, s.clip_x0, device, s.precision, s.compile, s.cuda_graph)
        step(0, x, noise)
        sync(DEVICE)
        setup = time.perf_counter() - started
        ms = per_step_ms(lambda i: step(i % len(plan.timesteps), x, noise), steps)
    return f"| sample ddpm x64 | {name} | cudnn.benchmark={cudnn_benchmark} freezing={freezing} | {ms:.4f} | {setup:.1f} |"


def train_row(name, overrides, cudnn_benchmark):
    device = DEVICE
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch._dynamo.reset()
    cfg = load_config(QUICK, [*overrides, "train.batch_size=64"], device)
    started = time.perf_counter()
    trainer = Trainer(cfg, device, synthetic_digits())
    for step in range(2 if QUICK else 20):
        trainer.step(step)
    sync(DEVICE)
    setup = time.perf_counter() - started
    ms = per_step_ms(lambda i: trainer.step(100 + i), 3 if QUICK else 30)
    return f"| train step x64 | {name} | cudnn.benchmark={cudnn_benchmark} | {ms:.4f} | {setup:.1f} |"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "conv-options.md"
    table.write_text(f"# cudnn.benchmark and inductor freezing on {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'CPU'} "
                     f"(torch {torch.__version__})\n\n| workload | variant | options | ms per step | setup s |\n|---|---|---|---|---|\n")
    rows = [
        lambda: sampling_row("eager-fp32", variants.SAMPLE["eager-fp32"], False, False, 20),
        lambda: sampling_row("eager-fp32", variants.SAMPLE["eager-fp32"], True, False, 20),
        *[lambda b=b, f=f: sampling_row("default", ["sample.compile=default"] if QUICK else [], b, f, 300 // (10 if QUICK else 1))
          for b, f in [(False, False), (True, False), (False, True), (True, True), (False, False)]],  # drift check: the first default row again
        lambda: train_row("default", [], False),
        lambda: train_row("default", [], True),
        lambda: train_row("eager-fp32", variants.EAGER, False),
        lambda: train_row("eager-fp32", variants.EAGER, True),
    ]
    for row in rows:
        try:
            line = row()
        except Exception as e:  # one failing option set must not hide the others
            line = f"| failed | {type(e).__name__}: {str(e).splitlines()[0][:200]} | | | |"
        print(line, flush=True)
        with table.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
