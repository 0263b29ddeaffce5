"""Train the same run twice from the same seed, eager fp32 and the default (fastest) path, and
compare their losses; optionally score both with ddpm.eval.

    python -m bench.compare_losses --steps 2000 [--config configs/mnist.yaml] [--eval-samples 2000] [--out DIR]

Real digits when the run's data source has them (the offline subset at least), so the losses mean
something. Prints a table and writes loss_comparison.json (and .md) to --out.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import sync, synthetic_digits
from bench.variants import EAGER
from ddpm import cli, config, data
from ddpm.runtime import has_bf16, resolve_precision, resolve_train_compile
from ddpm.train import Trainer


def run(cfg, device, images, steps: int, window: int) -> dict:
    """Train `steps` steps; the time counts the steps after the first `window` (compilation, warm-up)."""
    trainer = Trainer(cfg, device, images)
    losses = torch.zeros(steps, device=device)
    for step in range(steps):
        if step == window:
            sync(device)
            start = time.perf_counter()
        losses[step] = trainer.step(step)
    sync(device)
    losses = losses.cpu()
    seconds = time.perf_counter() - start
    curve = losses[: steps // window * window].view(-1, window).mean(1)
    return {"trainer": trainer, "curve": curve.tolist(), "final_loss": curve[-1].item(), "seconds": seconds,
            "precision": resolve_precision(cfg.train.precision, device), "compile": resolve_train_compile(cfg.train.compile, device, 1),
            "kernels": cfg.model.kernels, "attention": cfg.model.attention}


def main():
    parser = cli.ArgumentParser(prog="bench.compare_losses", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist.yaml", help="the run (default: %(default)s)")
    parser.add_argument("--steps", type=cli.positive, default=2000, help="training steps of each run (default: %(default)s)")
    parser.add_argument("--window", type=cli.positive, default=100,
                        help="steps averaged per loss point; the first window is not timed (default: %(default)s)")
    parser.add_argument("--eval-samples", type=cli.non_negative, default=0,
                        help="score both runs' EMA weights with ddpm.eval (default: 0, no scores)")
    parser.add_argument("--out", default="bench/results", help="for loss_comparison.json and .md (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both runs")
    args = parser.parse_intermixed_args()
    with cli.user_errors("bench.compare_losses"):
        compare(args)


def compare(args) -> None:
    if args.steps < 2 * args.window:
        raise config.UserError(f"--steps {args.steps} leaves no timed window after the first of --window "
                               f"{args.window}; pass --steps of at least {2 * args.window}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = config.load(args.config, [*args.overrides, f"train.device={device.type}"])
    try:
        digits = data.load_digits(base.data)
        images, description = digits.images, digits.description
    except data.DataError as e:  # no real digits on this machine: compare losses, skip the scores
        images, description = synthetic_digits(60_000), f"synthetic digits ({e})"
        args.eval_samples = 0
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, no permission: before minutes of training
        raise config.UserError(f"--out {out} cannot be made a directory ({e.strerror}); pass another --out") from None
    results = {}
    for name, overrides in (("eager-fp32", EAGER), ("default", [])):
        cfg = config.load(args.config, [*args.overrides, *overrides, f"train.device={device.type}"])
        results[name] = run(cfg, device, images, args.steps, args.window)
        if args.eval_samples:
            from ddpm import eval as eval_lib
            # eager sampling: compiling the step for a one-off evaluation costs more than it saves
            eval_cfg = cli.with_sample_overrides(cfg, compile="none", cuda_graph="disabled")
            results[name]["eval"] = eval_lib.evaluate(results[name]["trainer"].ema.module.eval(), eval_cfg, device,
                                                      num_samples=args.eval_samples, progress=False)
        del results[name]["trainer"]
        (out / "loss_comparison.json").write_text(json.dumps({"partial": True, "runs": results}, indent=1) + "\n")
    eager, fast = results["eager-fp32"], results["default"]
    # PyTorch's default, kept by the eager baseline: fp32 convolutions run in TF32 from sm_80 on (not a T4)
    tf32_convolutions = has_bf16(device) and torch.backends.cudnn.allow_tf32
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "data": description,
              "steps": args.steps, "batch": base.train.batch_size, "tf32_convolutions": tf32_convolutions, "runs": results,
              "relative_final_loss_difference": (fast["final_loss"] - eager["final_loss"]) / eager["final_loss"],
              "speedup": eager["seconds"] / fast["seconds"]}
    lines = [f"# Same seed, {args.steps} steps at batch {base.train.batch_size} on {report['device']}, {description}",
             *(["", "fp32 convolutions ran in TF32 (PyTorch's default on this card)"] if tf32_convolutions else []),
             "", "| run | precision | compile | kernels | attention | final loss (mean of last window) | seconds after the first window |"
             + (" FD | KID | recognizable | floor FD |" if args.eval_samples else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|---|---|" if args.eval_samples else "")]
    for name, r in results.items():
        row = (f"| {name} | {r['precision']} | {r['compile']} | {r['kernels']} | {r['attention']} | "
               f"{r['final_loss']:.5f} | {r['seconds']:.1f} |")
        if "eval" in r:
            e = r["eval"]
            row += f" {e['fid']:.3f} | {e['kid']:.4f} | {e['recognizable']:.3f} | {e['floor_fid']:.3f} |"
        lines.append(row)
    lines += ["", f"relative final-loss difference (default vs eager): {report['relative_final_loss_difference']:+.2%}; "
                  f"speed-up after warm-up: {report['speedup']:.2f}x"]
    (out / "loss_comparison.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "loss_comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
