"""Sample quality of a trained DDPM: python evaluate.py --ckpt RUN/checkpoint.pt [options]

Draws --n samples (EMA weights) and scores them in the feature space of a small classifier that
the project trains on the dataset's training split and caches ($DDPM_CACHE_DIR, else
$XDG_CACHE_HOME/ddpm-mnist, else ~/.cache/ddpm-mnist): Fréchet distance, KID, recognizability
(share of samples whose top class probability exceeds 0.9) and the class histogram's total
variation distance from uniform. Each score is printed beside its real-vs-real floor (the test
split against the training split, same count; for the offline subset, its held-out half against
the other)."""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ddpm import checkpoint, cli
from ddpm.config import UserError
from ddpm.diffusion import usual_ddim_steps
from ddpm.eval import Scorer, check_sampling, evaluate
from ddpm.runtime import resolve_compile, resolve_device, resolve_precision
from ddpm.sample import load_model, step_compile_mode, uses_cuda_graph

ROWS = [("fid", "Fréchet distance (lower is better)", "{:.3f}"),
        ("kid", "KID (lower is better)", "{:.3f}"),
        ("recognizable", "recognizable (top prob > 0.9)", "{:.1%}"),
        ("class_tv", "class histogram TV from uniform", "{:.3f}")]


def table(scores: dict) -> str:
    n, floor_n = f"{scores['num_samples']:,} samples", f"real-vs-real floor ({scores['floor_num_samples']:,})"
    lines = [f"| metric | {n} | {floor_n} |", "|---|---|---|"]
    for key, name, fmt in ROWS:
        value, floor = (fmt.format(scores[k]) for k in (key, f"floor_{key}"))
        if key == "kid":  # mean ± std over torchmetrics' random subsets
            value += f" ± {scores['kid_std']:.3f}"
            floor += f" ± {scores['floor_kid_std']:.3f}"
        lines.append(f"| {name} | {value} | {floor} |")
    return "\n".join(lines)


def main():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint.pt written by train.py")
    parser.add_argument("--n", type=cli.positive, default=10_000, help="number of samples (default: %(default)s)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim",
                        help="ddim (default, fast) or ddpm (ancestral, all diffusion.timesteps steps)")
    parser.add_argument("--steps", type=cli.positive, help="DDIM steps (default: 50, or diffusion.timesteps if fewer)")
    parser.add_argument("--batch-size", type=cli.positive, default=500, help="samples per batch (default: %(default)s)")
    parser.add_argument("--seed", type=cli.seed, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    cli.add_sampling_runtime_args(parser)
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--json", metavar="OUT.json", help="also write the scores and their settings as JSON")
    parser.add_argument("--samples", metavar="OUT.npz",
                        help="also write the scored samples: uint8 [N, H, W, 1] as arr_0, for other FID tools")
    parser.add_argument("--inception", action="store_true",
                        help="Fréchet distance and KID on torchmetrics' InceptionV3 features (needs torch-fidelity "
                             "and the network once for its weights); recognizability still uses the classifier")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    with cli.user_errors("evaluate.py", sigterm_cleans_up=True):
        device = resolve_device(args.device)
        cli.check_sampler_options(args.sampler, steps=args.steps)
        for flag, name, example in (("--json", args.json, "scores.json"), ("--samples", args.samples, "samples.npz")):
            if name is not None:
                if not name.strip():
                    raise UserError(f"{flag} needs a file name, e.g. {flag} {example}")
                if Path(name).resolve() == Path(args.ckpt).resolve():
                    raise UserError(f"{flag} {name} is the checkpoint being evaluated; pass another file name")
                cli.check_writable(Path(name), flag)
        if args.json is not None and args.samples is not None and Path(args.json).resolve() == Path(args.samples).resolve():
            raise UserError(f"--json and --samples name one file, {args.json}; pass two names")
        net, cfg, step = load_model(args.ckpt, device, use_ema=not args.raw_weights, cuda_graph=args.cuda_graph)
        args.steps = args.steps or usual_ddim_steps(cfg.diffusion.timesteps)
        cfg = cli.with_sample_overrides(cfg, precision=args.precision, compile=args.compile, cuda_graph=args.cuda_graph,
                                        streams=args.streams)
        check_sampling(cfg, args.n, args.sampler, args.steps, args.batch_size)
        cuda_graph = uses_cuda_graph(cfg.sample.cuda_graph, device)
        scorer = Scorer(cfg.data, device, args.n, inception=args.inception, progress=not args.no_progress)
        kept = [] if args.samples else None
        scores = evaluate(net, cfg, device, args.n, args.sampler, args.steps, args.batch_size, args.seed,
                          progress=not args.no_progress, scorer=scorer, kept=kept)
        steps = args.steps if args.sampler == "ddim" else cfg.diffusion.timesteps
        precision = resolve_precision(cfg.sample.precision, device)
        compiled = step_compile_mode(resolve_compile(cfg.sample.compile, device))
        print(f"{args.ckpt} (step {step}, {'raw' if args.raw_weights else 'EMA'} weights), "
              f"{args.sampler.upper()}-{steps} in {precision}, compile {compiled}, seed {args.seed}, "
              f"on {device}: {scores['seconds']:.0f} s")
        print(table(scores))
        print(f"features: {scorer.feature_extractor}; not comparable with published Inception FIDs"
              if not args.inception else f"features: {scorer.feature_extractor}")
        print(f"real images: {scorer.description}; reference {scores['num_reference']:,}")
        if scores["floor_num_samples"] < scores["num_samples"]:
            print(f"note: the floor uses all {scores['floor_num_samples']:,} held-out images, fewer than the samples; "
                  f"Fréchet distances grow as sets shrink, so the floor is a little pessimistic")
        if args.json:
            record = {"checkpoint": str(args.ckpt), "step": step, "sampler": args.sampler, "steps": steps,
                      "precision": precision, "compile": compiled,
                      "cuda_graph": cuda_graph, "streams": cfg.sample.streams,
                      "device": str(device), "seed": args.seed, "weights": "raw" if args.raw_weights else "ema",
                      "features": scorer.feature_extractor, "real": scorer.description, "scores": scores}
            text = (json.dumps(record, indent=2) + "\n").encode()
            checkpoint.write_atomically(Path(args.json), lambda f: f.write(text))  # whole or not at all
        if args.samples:
            images = torch.cat(kept).numpy()
            checkpoint.write_atomically(Path(args.samples), lambda f: np.savez(f, arr_0=images))
            print(f"samples: {args.samples} ({len(images):,} x {images.shape[1]}x{images.shape[2]}, uint8, arr_0)")


if __name__ == "__main__":
    main()
