"""ddpm/runtime.py: how "auto" and device names resolve. CUDA is faked: these are decisions, not kernels."""
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
    assert runtime.resolve_compile("auto", torch.device("cuda")) == "default"
