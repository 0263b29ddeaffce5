"""Sample from a trained DDPM: python sample.py --ckpt RUN/checkpoint.pt --out DIR [options]

Writes DIR/samples.png (the grid), DIR/denoising.gif (the whole grid from noise to t = 0) and
DIR/forward.png (the first sample destroyed by the forward process, step by step)."""
import argparse

import torch

from ddpm import cli
from ddpm.config import UserError
from ddpm.runtime import resolve_device
from ddpm.sample import MAX_GRID_IMAGES, load_model, write_samples


def main():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint.pt written by train.py")
    parser.add_argument("--out", required=True, help="directory for the pictures")
    parser.add_argument("--n", type=cli.positive, help="number of images (default: the config's sample.num_images, 64)")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), help="default: the checkpoint config's (ddpm)")
    parser.add_argument("--steps", type=cli.positive, help="DDIM steps (default: the config's, 50)")
    parser.add_argument("--eta", type=float, help="DDIM eta (default: the config's, 0: deterministic)")
    parser.add_argument("--variance", choices=("beta", "posterior"), help="DDPM sigma_t^2 (default: the config's, beta)")
    parser.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    cli.add_sampling_runtime_args(parser)
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--seed", type=cli.seed, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    with cli.user_errors("sample.py", sigterm_cleans_up=True):
        if not args.out.strip():
            raise UserError("--out needs a directory name, e.g. --out samples")
        device = resolve_device(args.device)
        net, cfg, step = load_model(args.ckpt, device, use_ema=not args.raw_weights, cuda_graph=args.cuda_graph)
        cfg = cli.with_sample_overrides(cfg, sampler=args.sampler, steps=args.steps, eta=args.eta,
                                        variance=args.variance, clip_x0=False if args.no_clip else None,
                                        precision=args.precision, compile=args.compile, cuda_graph=args.cuda_graph,
                                        streams=args.streams)
        cli.check_sampler_options(cfg.sample.sampler, steps=args.steps, eta=args.eta, variance=args.variance)
        n = args.n or cfg.sample.num_images
        if n > MAX_GRID_IMAGES:
            given = f"--n {n}" if args.n else f"the checkpoint's sample.num_images={n}"
            raise UserError(f"{given} is more than one grid holds ({MAX_GRID_IMAGES}); pass a smaller --n, "
                            "or score (and keep: --samples OUT.npz) many samples with evaluate.py --n")
        with torch.inference_mode():
            paths = write_samples(net, cfg, args.out, device, n, args.seed, progress=not args.no_progress)
        print(f"{cfg.sample.sampler} samples from step {step}: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
