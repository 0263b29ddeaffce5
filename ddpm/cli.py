"""What the top-level scripts share: bad input becomes one line on stderr and exit status 2."""
import argparse
import signal
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NoReturn

from ddpm.config import CHOICES, UserError, from_dict


# A quiet process's wait before it exits, for torchrun to stop it (within 0.1 s of the reporting
# process's exit) first; where nothing stops it, it exits after this many seconds.
QUIET_EXIT_WAIT_S = 30


def exit_after_reporter(status: int) -> NoReturn:
    """Exit with `status` without a word, in a process whose error another reports (rank 0, or local
    rank 0 of its node): after it. torchrun stops every worker as soon as one has failed, and a
    quiet process that left first could have the reporter stopped before it printed."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # torchrun's stop ends it at once, whatever handled them
        signal.signal(sig, signal.SIG_DFL)
    time.sleep(QUIET_EXIT_WAIT_S)
    sys.exit(status)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that the same clean-up runs."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextmanager
def user_errors(program: str, quiet: bool = False, sigterm_cleans_up: bool = False):
    """quiet: exit with status 2 without printing, after the process that prints the same error
    (exit_after_reporter). sigterm_cleans_up: SIGTERM (`kill`, a scheduler's stop) stops the body as
    Ctrl-C does, with exit status 143, instead of ending the process where it is; not for a process
    that may wait in a collective, which a Python handler would keep alive until torchrun kills it."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if sigterm_cleans_up else None
    try:
        yield
    except UserError as e:
        if quiet:
            exit_after_reporter(2)
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (argparse's own print the usage block first);
    quiet: neither errors nor --help printed, as user_errors."""

    def __init__(self, *args, quiet: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.quiet = quiet

    def print_help(self, file=None):
        if not self.quiet:
            super().print_help(file)

    def error(self, message):
        if self.quiet:
            exit_after_reporter(2)
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


@contextmanager
def leaves_no_new_dirs(path: Path):
    """The directories among `path` and its parents that do not exist yet, and that the body makes,
    go again if it fails or is interrupted, as long as they are empty."""
    missing, folder = [], Path(path)
    while not folder.exists():
        missing.append(folder)  # deepest first
        folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in missing:
            with suppress(OSError):  # not empty, or never made
                folder.rmdir()
        raise


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
    _check_can_write_in(path.parent, f"{flag} {path}")


def check_writable_dir(folder: Path, flag: str) -> None:
    """As check_writable, for a directory to be written in, made if need be: it, or the nearest of
    its parents that exists, can be written in."""
    nearest = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())
    if not nearest.is_dir():
        raise UserError(f"{flag} {folder}: {nearest} is a file; pass a directory")
    _check_can_write_in(nearest, f"{flag} {folder}")


def _check_can_write_in(folder: Path, what: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{what}: cannot write in {folder} ({e.strerror}); choose another place") from None


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def positive(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def device(text: str):
    """auto | cpu | cuda | cuda:N, as runtime.resolve_device has it; its refusals as argparse's."""
    from ddpm.runtime import resolve_device
    try:
        return resolve_device(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
