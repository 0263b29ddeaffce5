"""ddpm/runtime.py: how "auto" and device names resolve. CUDA is faked: these are decisions, not kernels."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from ddpm import runtime
from ddpm.config import UserError


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices of the given compute capability; records set_device calls."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))

    def with_capability(major):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 5 if major == 7 else 0))
        return current
    return with_capability


def test_an_explicit_gpu_becomes_the_current_device(two_gpus, monkeypatch):
    """Triton launches and CUDA-graph capture go to the current device, whatever their tensors' device."""
    current = two_gpus(8)
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    assert runtime.resolve_device("cuda") == torch.device("cuda") and current == [torch.device("cuda", 1)]
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun each process takes its local rank's GPU later
    assert runtime.resolve_device("cuda:0") == torch.device("cuda", 0) and current == [torch.device("cuda", 1)]
    with pytest.raises(UserError, match="has 2 CUDA device"):
        runtime.resolve_device("cuda:2")


@pytest.mark.parametrize("major,bf16,auto", [(7, False, "fp16"), (8, True, "bf16"), (9, True, "bf16")])
def test_bf16_only_where_the_card_has_it(two_gpus, monkeypatch, major, bf16, auto):
    """A T4 (7.5) emulates bf16 (torch.cuda.is_bf16_supported() says True there): auto picks fp16."""
    two_gpus(major)
    cuda = torch.device("cuda")
    assert runtime.has_bf16(cuda) is bf16
    assert runtime.resolve_precision("auto", cuda) == auto
    assert runtime.precision_dtype("fp16", cuda) == torch.float16
    if bf16:
        assert runtime.precision_dtype("bf16", cuda) == torch.bfloat16
    else:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
        with pytest.raises(UserError, match="Tesla T4 has no bf16"):
            runtime.precision_dtype("bf16", cuda)


def test_cpu_resolves_to_eager_fp32():
    cpu = torch.device("cpu")
    assert not runtime.has_bf16(cpu)
    assert runtime.resolve_precision("auto", cpu) == "fp32" and runtime.precision_dtype("auto", cpu) is None
    assert runtime.resolve_compile("auto", cpu) == "none"
    assert runtime.resolve_train_compile("auto", cpu, 1) == runtime.resolve_train_compile("auto", cpu, 2) == "none"


def test_training_compiles_with_cuda_graphs_on_one_gpu_and_without_under_ddp():
    """The measured choice (bench/README.md): the launch-bound step needs CUDA graphs on one GPU; DDP
    keeps the default mode until graphs around its hooks are measured. The sampler captures its own."""
    cuda = torch.device("cuda")
    assert runtime.resolve_train_compile("auto", cuda, 1) == "reduce-overhead"
    assert runtime.resolve_train_compile("auto", cuda, 2) == "default"
    assert runtime.resolve_train_compile("none", cuda, 1) == "none"
    assert runtime.resolve_train_compile("default", cuda, 1) == "default"
    assert runtime.resolve_compile("auto", cuda) == "default"


@pytest.mark.parametrize("major,graphed,ungraphed", [
    (7, ("triton", "torch"), ("triton", "torch")),  # a T4
    (8, ("triton", "triton-for-16bit"), ("torch", "torch")),
    (9, ("triton", "triton-for-16bit"), ("torch", "torch")),
])
def test_auto_picks_the_fast_path_on_cuda_and_eager_on_a_cpu(two_gpus, major, graphed, ungraphed):
    """From compute capability 8.0 the custom ops pay only when CUDA graphs hide their launches."""
    from ddpm import config, model
    from ddpm.sample import step_compile_mode, uses_cuda_graph
    two_gpus(major)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    defaults = config.load(None).model
    assert model.resolve_backends(defaults, cuda) == model.resolve_backends(defaults, cuda, graphed=True) == graphed
    assert model.resolve_backends(defaults, cuda, graphed=False) == ungraphed
    assert model.resolve_backends(defaults, cpu) == model.resolve_backends(defaults, cpu, False) == ("torch", "torch")
    chosen = config.load(None, ["model.kernels=torch", "model.attention=triton"]).model
    assert model.resolve_backends(chosen, cuda) == model.resolve_backends(chosen, cpu) == ("torch", "triton")
    assert model.resolve_backends(chosen, cuda, graphed=False) == ("torch", "triton")
    assert uses_cuda_graph("auto", cuda) and uses_cuda_graph("enabled", cuda)
    assert not uses_cuda_graph("auto", cpu) and not uses_cuda_graph("disabled", cuda)
    with pytest.raises(UserError, match="needs a CUDA device"):
        uses_cuda_graph("enabled", cpu)
    # inductor's own CUDA graphs: nested inside the sampler's, or overwriting each step's input
    assert step_compile_mode("max-autotune") == "max-autotune-no-cudagraphs"
    assert step_compile_mode("default") == "default"


DRIVER_FILE = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  (dvs-builder@U16)\n"
               "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")


def test_a_gpu_this_torch_cannot_use_is_named_not_skipped_silently(monkeypatch, tmp_path, capsys):
    """A CUDA 13 torch on a CUDA 12 driver (Kaggle) sees no GPU: auto says so before training on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER", tmp_path / "absent")
    assert runtime.unusable_gpu_note() is None
    assert runtime.resolve_device("auto") == torch.device("cpu") and capsys.readouterr().err == ""

    (tmp_path / "version").write_text(DRIVER_FILE)
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER", tmp_path / "version")
    assert runtime.resolve_device("auto") == torch.device("cpu")
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "driver 550.54.15" in warning and "Kaggle" in warning
    with pytest.raises(UserError, match=r"driver 550\.54\.15.*install the torch wheels"):
        runtime.resolve_device("cuda")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose
    assert runtime.unusable_gpu_note() is None
    with pytest.raises(UserError, match="has no CUDA device"):
        runtime.resolve_device("cuda")


def test_compiled_artifacts_are_cached_per_version_of_the_kernels(monkeypatch, tmp_path):
    """Inductor's caches do not see a change to a custom op's code: a backward compiled before an op's
    outputs changed failed after it. Each version of kernels/ gets its own cache folder."""
    kernels = tmp_path / "kernels"
    shutil.copytree(Path(runtime.__file__).resolve().parents[1] / "kernels", kernels,
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = runtime.kernels_fingerprint(kernels)
    assert runtime.kernels_fingerprint(kernels) == before == runtime.kernels_fingerprint()  # the default: kernels/
    (kernels / "attention.py").write_text((kernels / "attention.py").read_text() + "\n# changed\n")
    assert runtime.kernels_fingerprint(kernels) != before

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # so that the value compile_model sets is undone after
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    runtime.compile_model(lambda x: x, "default", torch.device("cpu"))  # compiles lazily: nothing runs
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor" / runtime.kernels_fingerprint())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # a user's own stays
    runtime.compile_model(lambda x: x, "default", torch.device("cpu"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_compile_model_is_one_graph_with_static_shapes(monkeypatch, tmp_path):
    """A graph break is an error, not a silent split; a second batch size gets its own static graph."""
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()

    def breaks(x):
        torch._dynamo.graph_break()
        return x + 1
    with pytest.raises(torch._dynamo.exc.Unsupported):
        runtime.compile_model(breaks, "default", torch.device("cpu"))(torch.ones(2))
    from torch._dynamo.utils import counters
    counters.clear()
    double = runtime.compile_model(lambda x: x * 2, "default", torch.device("cpu"))
    for n in (2, 3):
        double(torch.ones(n))
    # static: a graph per size (dynamic=True compiles one symbolic graph for both)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_compiling_for_a_cpu_without_a_cpp_compiler_is_a_one_line_error():
    """Inductor writes C++ for a CPU: without a compiler, one line before the run starts instead of
    its ~100-line InvalidCxxCompiler traceback at the first step."""
    from torch._inductor import config as inductor_config
    from ddpm.runtime import compile_model
    net = torch.nn.Linear(2, 2)
    with inductor_config.patch({"cpp.cxx": ("no-such-compiler",)}):
        with pytest.raises(UserError, match=r"compiling for a CPU needs a C\+\+ compiler \(no-such-compiler or "
                                            r"another .*apt install g\+\+.*to none$"):
            compile_model(net, "default", torch.device("cpu"))
    assert compile_model(net, "default", torch.device("cpu")) is not net
    assert compile_model(net, "none", torch.device("cpu")) is net
