"""How the model runs on this machine: device, autocast precision, torch.compile, cache dir.
Shared by training, sampling and evaluation; "auto" settings resolve here."""
import hashlib
import os
import re
import sys
from pathlib import Path

import torch

from ddpm.config import UserError


NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")  # there when the NVIDIA kernel driver is loaded


def unusable_gpu_note() -> str | None:
    """What to do when the machine has an NVIDIA GPU that this torch cannot use (a CUDA 13 wheel on a
    CUDA 12 driver, or a CPU-only wheel), else None: without it, `auto` would quietly train on the CPU."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")  # hidden on purpose
    if torch.cuda.is_available() or hidden or not NVIDIA_DRIVER.exists():
        return None
    try:  # "NVRM version: NVIDIA UNIX [Open ]Kernel Module [for x86_64]  550.54.15  ..."
        driver = re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", NVIDIA_DRIVER.read_text()).group(1)
    except (OSError, AttributeError):
        driver = "version unknown"
    return (f"this machine has an NVIDIA GPU (driver {driver}) that torch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none: a CPU build'}) cannot use; install the torch wheels for the "
            f"driver's CUDA version (make setup TORCH_PIN=...; README: 'Kaggle-style 2xT4 machines')")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        note = unusable_gpu_note()
        if note:
            print(f"warning: {note}; running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(unusable_gpu_note() or f"device {name} requested but this machine has no CUDA device; use cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Triton launches and CUDA-graph capture use the current device, not their tensors' device.
        # (Under torchrun, distributed.init gives each process its local rank's GPU.)
        torch.cuda.set_device(device)
    return device


def has_bf16(device: torch.device) -> bool:
    """bf16 in hardware (compute capability 8.0+). torch.cuda.is_bf16_supported() says True on a T4,
    which only emulates it, unless including_emulation=False."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that have it, fp16 on older ones (a T4), fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if has_bf16(device) else "fp16"


def precision_dtype(precision: str, device: torch.device):
    """The autocast dtype for a precision setting, or None for fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return None
    if precision == "bf16" and device.type == "cuda" and not has_bf16(device):
        raise UserError(f"bf16 requested but {torch.cuda.get_device_name(device)} has no bf16 (compute capability "
                        f"< 8.0, e.g. a T4): use fp16")
    return torch.float16 if precision == "fp16" else torch.bfloat16


def resolve_compile(mode: str, device: torch.device) -> str:
    """auto: inductor's default mode on CUDA, eager on CPU (compiling costs more than it saves there).
    The sampler's setting: it captures its own CUDA graph around the compiled step."""
    if mode != "auto":
        return mode
    return "default" if device.type == "cuda" else "none"


def resolve_train_compile(mode: str, device: torch.device, world_size: int) -> str:
    """train.compile=auto: on one CUDA device, inductor with CUDA graphs (reduce-overhead). At the
    seed's batch of 64 the step is bound by kernel launches: on an H200 the compiled step without
    graphs was 1.00x eager fp32, with them 3.80x (the second GPU check's suite; README.md). Under
    DDP the default mode, as graphs around DDP's hooks have not been measured on GPUs yet."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "none"
    return "reduce-overhead" if world_size == 1 else "default"


def compile_model(fn, mode: str, device: torch.device):
    """fn itself, or torch.compile(fn) as one graph (a graph break is a bug: fullgraph=True).
    Static shapes (dynamic=False): a run has one batch size, and a second compile of the same code
    at a new size gets its own static graph rather than dynamic-shape kernels.
    Inductor's artifacts are cached as use_inductor_cache says."""
    mode = resolve_compile(mode, device)
    if mode == "none":
        return fn
    if torch.device(device).type == "cpu":
        check_cpu_compiler()
    use_inductor_cache()
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)


def check_cpu_compiler() -> None:
    """Inductor's CPU code is C++: without a compiler its first call fails with ~100 lines of
    traceback, after the run has started. This says so before, in one line."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # another torch's layout: the compile says it itself
        return
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        from torch._inductor import config as inductor_config
        raise UserError(f"compiling for a CPU needs a C++ compiler ({inductor_config.cpp.cxx[-1]} or another that "
                        f"torch finds), and there is none: install one (apt install g++), or set train.compile / "
                        f"sample.compile (sample.py, evaluate.py: --compile) to none") from None


def use_inductor_cache() -> None:
    """Inductor's artifacts go to cache_dir()/inductor/kernels-<hash of kernels/> unless
    TORCHINDUCTOR_CACHE_DIR is set. Called by compile_model, and by the test and benchmark runners
    for their plain torch.compile calls."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor" / kernels_fingerprint()))


def kernels_fingerprint(kernels_dir: Path = Path(__file__).resolve().parents[1] / "kernels") -> str:
    """A hash of kernels/'s source. Inductor's caches key a graph on the custom ops' names, not on
    their code, so a compiled backward cached before an op's autograd formula or outputs changed
    would be reused after it and fail ("wrong number of dimensions"): each version of the ops gets
    its own cache folder."""
    digest = hashlib.sha256()
    for source in sorted(kernels_dir.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return f"kernels-{digest.hexdigest()[:12]}"


def cache_dir() -> Path:
    """$DDPM_CACHE_DIR, else $XDG_CACHE_HOME/ddpm-mnist, else ~/.cache/ddpm-mnist."""
    if os.environ.get("DDPM_CACHE_DIR"):
        return Path(os.environ["DDPM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-mnist"
