"""Profile training steps and sampling steps with torch.profiler.

    python -m bench.profile [--config configs/mnist.yaml] [--train-steps 10] [--sample-steps 20]
                            [--rows 15] [--out runs/profile] [key=value ...]

Traces go to OUT/tb (tensorboard_trace_handler), where `make tensorboard` shows them in the
PyTorch Profiler tab (torch-tb-profiler, in the dev extra; deprecated upstream). The same
*.pt.trace.json files open in Perfetto (ui.perfetto.dev) or chrome://tracing. The top operators
of each phase are printed as a table. --train-steps 0 profiles sampling alone; with
sample.cuda_graph=disabled the compiled step's kernels show one by one.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from bench.common import synthetic_digits
from ddpm import cli, config, data
from ddpm.sample import FastStep
from ddpm.train import Trainer


def trace(name: str, out: Path, steps: int, fn, device, sort_by: str, rows: int) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    warmup = 2
    write_trace = tensorboard_trace_handler(str(out / "tb"), worker_name=name)

    def on_trace_ready(prof):
        write_trace(prof)
        print(f"\n== {name}: top operators over {steps} steps")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=rows))

    with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
                 on_trace_ready=on_trace_ready, record_shapes=True) as prof:
        for i in range(warmup + steps):
            fn(i)
            prof.step()


def main():
    parser = cli.ArgumentParser(prog="bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist.yaml", help="the run profiled (default: %(default)s)")
    parser.add_argument("--train-steps", type=cli.non_negative, default=10,
                        help="training steps profiled; 0: sampling alone (default: %(default)s)")
    parser.add_argument("--sample-steps", type=cli.positive, default=20, help="sampling steps profiled (default: %(default)s)")
    parser.add_argument("--rows", type=cli.positive, default=15, help="operators in each printed table (default: %(default)s)")
    parser.add_argument("--out", default="runs/profile", help="traces go to OUT/tb (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=128")
    args = parser.parse_intermixed_args()
    with cli.user_errors("bench.profile"):
        profile_run(args)


def profile_run(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config.load(args.config, [*args.overrides, f"train.device={device.type}"])
    out = Path(args.out)
    cli.check_writable_dir(out, "--out")  # now, not after the profiling
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"

    try:
        images = data.load_digits(cfg.data).images
    except data.DataError as e:  # no real digits on this machine: the steps' kernels are the same
        print(f"profiling on synthetic digits ({e})", file=sys.stderr)
        images = synthetic_digits(4096)
    trainer = Trainer(cfg, device, images)
    if args.train_steps > 0:
        trace("train", out, args.train_steps, trainer.step, device, sort_by, args.rows)

    net = trainer.ema.module.eval()
    plan = trainer.diffusion.plan(cfg.sample)
    s = cfg.sample
    step = FastStep.from_config(net, plan, s, device)
    x = torch.randn(cfg.sample.num_images, 1, cfg.data.image_size, cfg.data.image_size, device=device)

    @torch.inference_mode()
    def sample_step(i):
        step(i % len(plan.timesteps), x, torch.randn_like(x))

    trace("sample", out, args.sample_steps, sample_step, device, sort_by, args.rows)
    print(f"\ntraces: {out / 'tb'} (make tensorboard -> PyTorch Profiler tab; or open the .pt.trace.json in Perfetto)")


if __name__ == "__main__":
    main()
