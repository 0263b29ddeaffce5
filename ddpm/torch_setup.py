"""Which torch `make setup` puts into .venv, chosen for this machine, and the packages that must match it.

`python3 -m ddpm.torch_setup VENV DEFAULT_PIN` (run by the system python before .venv has torch, so
standard library only) creates VENV and installs torch and torchvision, the first of:
  1. TORCH_PIN from the environment or make's command line: pip's arguments, or `system`. It is kept
     in VENV/.torch-pin, so that a rebuild of .venv (after a change to pyproject.toml or the
     Makefile) installs it again without being told;
  2. the pin a previous build kept there;
  3. this python's own torch (>= 2.6, with torchvision) when it sees a GPU, as a Kaggle image's
     preinstalled one does: the venv then reads the system's packages instead of downloading a
     second torch of several GB that may not fit the driver;
  4. PyTorch's CUDA 12.6 wheels when the NVIDIA driver's CUDA is 12.x: PyPI's torch is built for
     CUDA 13 and sees no GPU under a CUDA 12 driver;
  5. DEFAULT_PIN, the pair this project is tested with.
`VENV/bin/python -m ddpm.torch_setup --extras` prints what must match the torch installed: the NVIDIA
DALI build for its CUDA, and numpy < 2.4 beside a Triton older than 3.8, whose interpreter (the
tests' Triton) fails on numpy 2.4 (3.2 and 3.6 do; 3.8 does not).
"""
import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

MIN_TORCH = (2, 6)
CUDA12_PIN = "torch torchvision --index-url https://download.pytorch.org/whl/cu126"
RECORD = ".torch-pin"
# what this python's torch is: "<version> <sees a GPU: 0|1>", or a failure when torch or torchvision is missing
_PROBE = "import torch, torchvision; print(torch.__version__, int(torch.cuda.is_available()))"


class SetupError(Exception):
    pass


def version_tuple(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def system_torch(python: str = sys.executable) -> tuple[str, bool] | None:
    """(version, sees a GPU) of the torch this python imports with torchvision, or None."""
    try:
        result = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = result.stdout.split()
    if result.returncode != 0 or len(fields) != 2:
        return None
    return fields[0], fields[1] == "1"


def driver_cuda() -> tuple[int, int] | None:
    """The newest CUDA the NVIDIA driver runs, from nvidia-smi's header; None without one."""
    try:
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", header)
    return (int(found.group(1)), int(found.group(2))) if found else None


def choose(pin: str, recorded: str, found_torch: tuple[str, bool] | None, cuda: tuple[int, int] | None,
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
        return recorded, f"the TORCH_PIN this venv was built with, kept in its {RECORD} (TORCH_PIN=... replaces it)"
    if usable and found_torch[1]:
        return "system", f"{sys.executable}'s torch {found_torch[0]} sees the GPU"
    if cuda is not None and cuda[0] == 12:
        return CUDA12_PIN, f"the NVIDIA driver runs CUDA {cuda[0]}.{cuda[1]}, and PyPI's torch is built for CUDA 13"
    return default_pin, "the pair this project is tested with"


def _has_own_torch(venv: Path) -> bool:
    return bool(glob.glob(str(venv / "lib" / "python*" / "site-packages" / "torch")))


def create(venv: Path, default_pin: str) -> None:
    pin = os.environ.get("TORCH_PIN", "").strip()
    record = venv / RECORD
    recorded = record.read_text().strip() if record.exists() else ""
    choice, why = choose(pin, recorded, system_torch(), driver_cuda(), default_pin)
    print(f"make setup: torch: {choice}; {why}", flush=True)
    if choice == "system":
        # An earlier build's torch in the venv would come before the system's on the path, and so
        # would its CUDA libraries (nvidia-*), which torch's import loads from the first folder that
        # has them: that venv starts again empty.
        flags = ["--system-site-packages", *(["--clear"] if _has_own_torch(venv) else [])]
        subprocess.run([sys.executable, "-m", "venv", *flags, str(venv)], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "--quiet", "install", *shlex.split(choice)], check=True)
    if pin:
        record.write_text(pin + "\n")


def extras() -> list[str]:
    """Run by the venv's python once torch is there."""
    import numpy
    import torch
    import triton
    cuda = torch.version.cuda
    packages = [f"nvidia-dali-cuda{version_tuple(cuda)[0] if cuda else 13}0"]
    if version_tuple(triton.__version__) < (3, 8) and version_tuple(numpy.__version__) >= (2, 4):
        packages.append("numpy<2.4")
    return packages


def main(argv: list[str]) -> int:
    if argv == ["--extras"]:
        print(" ".join(extras()))
        return 0
    if len(argv) != 2:
        print("usage: python3 -m ddpm.torch_setup VENV DEFAULT_PIN | --extras", file=sys.stderr)
        return 2
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
