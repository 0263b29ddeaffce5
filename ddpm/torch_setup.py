"""Which torch `make setup` puts into .venv, chosen for this machine, and the packages that must match it.

`python3 -m ddpm.torch_setup VENV DEFAULT_PIN` (run by the system python before .venv has torch, so
standard library only) creates VENV and installs torch and torchvision, the first of:
  1. TORCH_PIN from the environment or make's command line: pip's arguments, or `system`. The venv
     keeps it (VENV/.torch-pin), so that a rebuild of .venv (after a change to pyproject.toml or the
     Makefile) installs it again without being told; delete it and VENV/.installed to forget it;
  2. the pin a previous build kept there;
  3. this python's own torch (>= 2.6, with torchvision) when it sees a GPU, as a Kaggle image's
     preinstalled one does: the venv then reads the system's packages instead of downloading a
     second torch of several GB that may not fit the driver;
  4. PyTorch's CUDA 12.6 wheels when the NVIDIA driver's CUDA is 12.x: PyPI's torch is built for
     CUDA 13 and sees no GPU under a CUDA 12 driver;
  5. DEFAULT_PIN, the pair this project is tested with.
A venv whose torch came from another choice starts again empty: pip keeps an installed torch that
satisfies the new requirement whatever its CUDA build, and the system's torch would come after the
venv's own. VENV/torch-constraints.txt then holds the torch and torchvision installed, for the
Makefile's later pip commands, so that no other requirement replaces them.
`VENV/bin/python -m ddpm.torch_setup --extras FILE` writes what must match the torch installed: the NVIDIA
DALI build for its CUDA, and numpy < 2.4 beside a Triton older than 3.8, whose interpreter (the
tests' Triton) fails on numpy 2.4 (3.2 and 3.6 do; 3.8 does not).
"""
from __future__ import annotations  # so that an older python3 reaches main()'s version check

import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

MIN_TORCH = (2, 6)
CUDA12_PIN = "torch torchvision --index-url https://download.pytorch.org/whl/cu126"
PIN_RECORD = ".torch-pin"         # a TORCH_PIN given once
INSTALLED_RECORD = ".torch-from"  # the choice the venv's torch came from
CONSTRAINTS = "torch-constraints.txt"
# a marked line, whatever else importing torch prints; the distributions' versions, which pip
# matches (PyPI's torch 2.14.1 calls itself 2.14.1+cu130 once imported)
_PROBE = ("import importlib.metadata as m, torch, torchvision; print('torch-setup-probe', m.version('torch'), "
          "m.version('torchvision'), int(torch.cuda.is_available()))")


class SetupError(Exception):
    pass


def version_tuple(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def probe_torch(python: str = sys.executable) -> tuple[str, str, bool] | None:
    """(torch's version, torchvision's, sees a GPU) for what this python imports, or None."""
    try:
        result = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("torch-setup-probe ")]
    if result.returncode != 0 or not lines or len(lines[-1]) != 4:
        return None
    _, torch_version, vision_version, gpu = lines[-1]
    return torch_version, vision_version, gpu == "1"


def driver_cuda() -> tuple[int, int] | None:
    """The newest CUDA the NVIDIA driver runs, from nvidia-smi's header; None without one."""
    try:
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", header)
    return (int(found.group(1)), int(found.group(2))) if found else None


def normalized(pin: str) -> str:
    """`system` however it came quoted (a notebook's %env keeps the quotes)."""
    try:
        return "system" if shlex.split(pin) == ["system"] else pin.strip()
    except ValueError:
        raise SetupError(f"TORCH_PIN={pin} has unbalanced quotes; give pip's arguments, or system") from None


def choose(pin: str, recorded: str, found_torch: tuple[str, str, bool] | None, cuda: tuple[int, int] | None,
           default_pin: str) -> tuple[str, str]:
    """(`system` or pip's arguments for torch and torchvision, why) in the order of this module's doc."""
    usable = found_torch is not None and version_tuple(found_torch[0]) >= MIN_TORCH
    if (pin or recorded) == "system" and not usable:
        have = f"torch {found_torch[0]}" if found_torch else "no torch with torchvision"
        raise SetupError(f"TORCH_PIN=system, but {sys.executable} has {have}; install torch >= 2.6 and "
                         f"torchvision for it, or set TORCH_PIN to pip's arguments for them")
    if pin:
        return pin, "TORCH_PIN"
    if recorded:
        return recorded, f"the TORCH_PIN this venv was built with, kept in its {PIN_RECORD} (delete it and .installed to forget it)"
    if usable and found_torch[2]:
        return "system", f"{sys.executable}'s torch {found_torch[0]} sees the GPU"
    if cuda is not None and cuda[0] == 12:
        return CUDA12_PIN, f"the NVIDIA driver runs CUDA {cuda[0]}.{cuda[1]}, and PyPI's torch is built for CUDA 13"
    return default_pin, "the pair this project is tested with"


def constraints(installed: tuple[str, str, bool]) -> str:
    return f"torch=={installed[0]}\ntorchvision=={installed[1]}\n"


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def _has_own_torch(venv: Path) -> bool:
    return bool(glob.glob(str(venv / "lib" / "python*" / "site-packages" / "torch")))


def create(venv: Path, default_pin: str) -> None:
    pin = normalized(os.environ.get("TORCH_PIN", ""))
    recorded = _read(venv / PIN_RECORD)
    choice, why = choose(pin, recorded, probe_torch(), driver_cuda(), default_pin)
    print(f"make setup: torch: {choice}; {why}", flush=True)
    # a venv from before these records holds the default pair, or nothing
    installed_from = _read(venv / INSTALLED_RECORD) or (default_pin if _has_own_torch(venv) else "")
    flags = ["--system-site-packages"] if choice == "system" else []
    if installed_from and installed_from != choice:
        flags.append("--clear")
    subprocess.run([sys.executable, "-m", "venv", *flags, str(venv)], check=True)
    # recorded before pip runs: a rerun after a failed or interrupted install knows what is there
    (venv / INSTALLED_RECORD).write_text(choice + "\n")
    if pin or recorded:  # --clear removed it
        (venv / PIN_RECORD).write_text((pin or recorded) + "\n")
    if choice != "system":
        subprocess.run([str(venv / "bin" / "pip"), "--quiet", "install", *shlex.split(choice)], check=True)
    installed = probe_torch(str(venv / "bin" / "python"))
    if installed is None:
        raise SetupError(f"{venv}/bin/python cannot import torch and torchvision after installing them from "
                         f"'{choice}'; see pip's output above")
    (venv / CONSTRAINTS).write_text(constraints(installed))


def extras() -> list[str]:
    """Run by the venv's python once torch is there (a torch without Triton, e.g. a CPU wheel of
    PyTorch's index, has no interpreter to keep working)."""
    import numpy
    import torch
    cuda = torch.version.cuda
    packages = [f"nvidia-dali-cuda{version_tuple(cuda)[0] if cuda else 13}0"]
    try:
        import triton
    except ImportError:
        return packages
    if version_tuple(triton.__version__) < (3, 8) and version_tuple(numpy.__version__) >= (2, 4):
        packages.append("numpy<2.4")
    return packages


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):
        print(f"make setup: error: {sys.executable} is Python {sys.version.split()[0]}; this project needs 3.10 or "
              f"newer: give make one, e.g. make PY=python3.11 ...", file=sys.stderr)
        return 2
    if len(argv) == 2 and argv[0] == "--extras":  # into a file: importing torch may print
        Path(argv[1]).write_text("".join(f"{package}\n" for package in extras()))
        return 0
    if len(argv) != 2:
        print("usage: python3 -m ddpm.torch_setup VENV DEFAULT_PIN | --extras FILE", file=sys.stderr)
        return 2
    if sys.prefix != sys.base_prefix:
        # Inside a venv (.venv itself, activated): its torch is not the system's, and a venv made from
        # it would read the base python's packages. Run as the base python.
        base = getattr(sys, "_base_executable", sys.executable)
        if base == sys.executable:
            print(f"make setup: error: {sys.executable} runs in a virtual environment ({sys.prefix}); "
                  f"deactivate it or give make another python: make PY=...", file=sys.stderr)
            return 2
        os.execv(base, [base, "-m", "ddpm.torch_setup", *argv])
    try:
        create(Path(argv[0]), argv[1])
    except SetupError as e:
        print(f"make setup: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"make setup: error: {shlex.join(e.cmd)} failed (exit status {e.returncode}); see its output above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
