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
