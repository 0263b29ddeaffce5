"""What the top-level scripts share: bad input becomes one line on stderr and exit status 2."""
import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ddpm.config import CHOICES, UserError, from_dict


@contextmanager
def user_errors(program: str, quiet: bool = False):
    """quiet: exit with status 2 without printing (in a process whose twin prints the same error)."""
    try:
        yield
    except UserError as e:
        if not quiet:
            print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (argparse's own print the usage block first);
    quiet: exit with status 2 without printing them, as user_errors."""

    def __init__(self, *args, quiet: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.quiet = quiet

    def error(self, message):
        self.exit(2, None if self.quiet else f"{self.prog}: error: {message} (--help for usage)\n")


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must lie in [0, 2**63), got {value}")
    return value


def check_writable(path: Path, flag: str) -> None:
    """Before minutes of sampling: `path` (a file to be written) can be written, so that its write at
    the end cannot fail for a reason known now."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; pass a file name")
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise UserError(f"{flag} {path}: {path.parent} {what}")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {path.parent} ({e.strerror}); choose another place") from None


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
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


def check_sampler_options(sampler: str, **given) -> None:
    """Options of the other sampler are an error, not silently ignored: steps and eta are DDIM's,
    variance is DDPM's."""
    theirs = {"ddpm": ("steps", "eta"), "ddim": ("variance",)}[sampler]
    ignored = [f"--{name}" for name in theirs if given.get(name) is not None]
    if ignored:
        other = "ddim" if sampler == "ddpm" else "ddpm"
        one = len(ignored) == 1
        raise UserError(f"{' and '.join(ignored)} {'is an option' if one else 'are options'} of the {other.upper()} "
                        f"sampler, not of {sampler.upper()}: add --sampler {other} or drop {'it' if one else 'them'}")


def with_sample_overrides(cfg, **values):
    """cfg with the sample.* values that a CLI set (None: keep the config's)."""
    sample = {**cfg.to_dict()["sample"], **{k: v for k, v in values.items() if v is not None}}
    return from_dict({**cfg.to_dict(), "sample": sample})
