"""What the top-level scripts share: bad input becomes one line on stderr and exit status 2."""
import argparse
import sys
from contextlib import contextmanager

from ddpm.config import CHOICES, UserError, from_dict


@contextmanager
def user_errors(program: str):
    try:
        yield
    except UserError as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_sampling_runtime_args(parser: argparse.ArgumentParser) -> None:
    """--precision, --compile, --cuda-graph, --streams: how the denoising step runs (default: the checkpoint config's)."""
    parser.add_argument("--precision", choices=CHOICES["sample.precision"],
                        help="sampling precision (default: the config's; auto = bf16/fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--compile", choices=CHOICES["sample.compile"],
                        help="compile the denoising step (default: the config's; auto = on CUDA)")
    parser.add_argument("--cuda-graph", choices=CHOICES["sample.cuda_graph"],
                        help="replay the step as a CUDA graph (default: the config's; auto = on CUDA)")
    parser.add_argument("--streams", type=positive,
                        help="split the batch into this many parts (1-16), replayed as parallel branches of the "
                             "CUDA graph; without a graph one after another (default: the config's, 1)")


def with_sample_overrides(cfg, **values):
    """cfg with the sample.* values that a CLI set (None: keep the config's)."""
    sample = {**cfg.to_dict()["sample"], **{k: v for k, v in values.items() if v is not None}}
    return from_dict({**cfg.to_dict(), "sample": sample})
