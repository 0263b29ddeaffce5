"""The project's fused ops. Each takes `backend`: "torch" (kernels/reference.py) or "triton"
(attention_core also "sdpa": PyTorch's scaled_dot_product_attention).

Nothing here imports ddpm/: the model chooses a backend and calls these functions. Their names
differ from the op modules' (group_norm_silu.py, attention.py) on purpose: importing a submodule
binds its name on the package and would shadow a function of the same name.
"""
import inspect

import torch

from kernels import reference

# custom_op's keyword for the flexible_layout tag, which lets inductor hand an op its inputs in any
# strides (channels-last graphs: no copies around the op). custom_op takes tags in torch 2.11 and
# 2.14; 2.6's does not, and inductor keeps the traced strides, copying.
FLEXIBLE_LAYOUT = ({"tags": (torch.Tag.flexible_layout,)}
                   if "tags" in inspect.signature(torch.library.custom_op).parameters else {})


# The attention kernels' limits (kernels/attention.py), here so that the model can choose by them
# without importing Triton.
ATTENTION_MAX_SEQ = 256  # a program holds a block of rows against all N columns
ATTENTION_MAX_HEAD_DIM = 256
ATTENTION_MAX_BATCH_HEADS = 65535  # the grid's second axis, one program per (sample, head): CUDA's limit there


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 without its ~4 us of constexpr handling per call on the launch path."""
    return 1 << (n - 1).bit_length()


def attention_beyond_limits(batch: int, channels: int, seq: int, num_heads: int) -> str | None:
    """Why the Triton attention cannot take `seq` tokens of `channels` channels in `num_heads`
    heads for `batch` samples, or None when it can."""
    if channels // num_heads > ATTENTION_MAX_HEAD_DIM:
        return f"head dim {channels // num_heads} > {ATTENTION_MAX_HEAD_DIM}"
    if seq > ATTENTION_MAX_SEQ:
        return f"sequence length {seq} > {ATTENTION_MAX_SEQ}"
    if batch * num_heads > ATTENTION_MAX_BATCH_HEADS:
        return f"batch x heads {batch * num_heads} > {ATTENTION_MAX_BATCH_HEADS}; split the batch"
    return None


def fused_group_norm(x, weight, bias, num_groups: int, eps: float = 1e-5, time_bias=None,
                     activation: bool = True, backend: str = "torch"):
    if backend == "triton":
        from kernels.group_norm_silu import group_norm_silu as triton_group_norm_silu
        return triton_group_norm_silu(x, weight, bias, num_groups, eps, time_bias, activation)
    return reference.group_norm_silu(x, weight, bias, num_groups, eps, time_bias, activation)


def attention_core(qkv, num_heads: int, backend: str = "torch"):
    if backend == "sdpa":
        return reference.attention_sdpa(qkv, num_heads)
    if backend == "triton":
        from kernels.attention import attention as triton_attention
        return triton_attention(qkv, num_heads)
    return reference.attention(qkv, num_heads)
