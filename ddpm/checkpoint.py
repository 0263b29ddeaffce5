"""Checkpoints: atomic writes, validated loads, the state a resumed run needs."""
import glob
import os
import pickle
import socket
import warnings
from contextlib import suppress
from pathlib import Path

import torch

from ddpm import config as config_lib
from ddpm.config import UserError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "step", "model", "ema", "ema_n_averaged", "optimizer",
                 "lr_scheduler", "rng")


class CheckpointError(UserError):
    pass


class WriteError(UserError):
    pass


def _os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError behind an error: torch.save reports a full disk as a RuntimeError of its zip
    writer, raised while handling the OSError."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def write_atomically(path: Path, write) -> None:
    """write(f) into a temporary file in the same directory, fsync, then rename it over `path` (and
    fsync the directory, so that the rename survives a crash too): a crash mid-write leaves the
    previous file intact. A write the system refuses (a full disk, no permission) is a WriteError."""
    write_all_atomically({path: write})


def write_all_atomically(writes: dict) -> None:
    """write_atomically for several files ({path: write}, one directory or several): none is renamed
    over its old version until all are written, so a refused write leaves every old file as it was.
    (A crash between the renames can still leave some of them new.)"""
    temporaries = {Path(path): Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}@{socket.gethostname()}")
                   for path in writes}
    current = None
    try:
        for (path, write), tmp in zip(writes.items(), temporaries.values()):
            current = Path(path)
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in temporaries.items():
            current = path
            os.replace(tmp, path)
        for folder in {path.parent for path in temporaries}:
            with suppress(OSError):  # a file system that cannot sync a directory has written the file
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    except (OSError, RuntimeError) as e:
        refused = _os_error_in(e)
        if refused is None:
            raise
        raise WriteError(f"cannot write {current} ({refused.strerror or refused})") from None
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> None:
    """The temporary files of write_atomically in `folder` whose process has gone (killed with
    SIGKILL mid-write: its finally never ran); a checkpoint's is as large as the checkpoint. Only
    this host's: a process of another host sharing the folder cannot be asked."""
    for tmp in Path(folder).glob(f".*.tmp[0-9]*@{glob.escape(socket.gethostname())}"):
        pid = tmp.name.rpartition(".tmp")[2].partition("@")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (OSError, OverflowError):  # alive (another user's), or no process number at all
            pass


def save(state: dict, path: Path) -> None:
    write_atomically(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))


def load(path: Path) -> dict:
    if not str(path).strip():  # Path("") would be the current directory
        raise CheckpointError("the checkpoint's name is empty; pass the checkpoint.pt inside a run's out dir")
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}; pass the checkpoint.pt inside a run's out dir")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would precede the one-line error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):  # the unpickler met a class
            raise CheckpointError(f"{path} holds Python objects besides tensors, so it is not a checkpoint of this "
                                  f"toolkit (which loads only tensors and plain values); use a checkpoint.pt written "
                                  f"by train.py") from None
        # the first line of torch's weights-only refusal is about its default, not about the file
        reason = "torch's weights-only unpickler refused it" if "Weights only load failed" in str(e) else config_lib.describe(e)
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); "
                              f"it is truncated or not a checkpoint of this toolkit: use another one") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of this toolkit (missing keys); use a checkpoint.pt written by train.py")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {state['format_version']}, this toolkit reads {FORMAT_VERSION}")
    if type(state["step"]) is not int or state["step"] < 0:
        raise CheckpointError(f"{path} holds a step count of {state['step']!r}, not a whole number >= 0: "
                              f"it is damaged; use another checkpoint")
    return state


def config_of(state: dict, path) -> config_lib.Config:
    saved = state["config"]
    if isinstance(saved, dict) and isinstance(saved.get("train"), dict) and "ema_warmup" not in saved["train"]:
        saved = {**saved, "train": {**saved["train"], "ema_warmup": False}}  # a run from before the warm-up
    try:
        return config_lib.from_dict(saved)
    except config_lib.ConfigError as e:
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot run ({e})") from None


def load_weights(module: torch.nn.Module, weights: dict, path) -> None:
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong tensors; not a state dict at all
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(f"checkpoint {path} does not match the model its config describes ({config_lib.clip(first, 160)})") from None
