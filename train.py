"""Train a DDPM: python train.py --config configs/mnist.yaml [key=value ...] [--resume | --overwrite | --resume-if-present]"""
import os

from ddpm import cli, config
from ddpm.train import train


def main():
    # Under torchrun the processes of a node share the command line, the config, the files and
    # (on a node of like GPUs) the GPUs' properties, so their errors are the same: local rank 0
    # alone prints them. (Rank 0's alone, such as a run dir that holds a run or a checkpoint that
    # cannot be written, it sends to the others: ddpm.train.on_main.)
    twin = os.environ.get("LOCAL_RANK", "0") != "0"
    parser = cli.ArgumentParser(description=__doc__, quiet=twin)
    parser.add_argument("--config", default="configs/mnist.yaml", help="YAML run config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=1000")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its checkpoint")
    group.add_argument("--overwrite", action="store_true", help="replace the run in train.out_dir")
    group.add_argument("--resume-if-present", action="store_true",
                       help="continue the run in train.out_dir if it holds a checkpoint, else start one (make train)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args()  # overrides before, between and after the flags
    with cli.user_errors("train.py", quiet=twin):
        cfg = config.load(args.config, args.overrides)
        resume = "if-present" if args.resume_if_present else args.resume
        ckpt = train(cfg, resume=resume, overwrite=args.overwrite, progress=not args.no_progress)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, once
            print(f"done: {ckpt}")


if __name__ == "__main__":
    main()
