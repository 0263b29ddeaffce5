"""Plain-PyTorch math of every op in kernels/: the tests' oracle and the `torch` backend."""
import torch
import torch.nn.functional as F


def group_norm_silu(x, weight, bias, num_groups: int, eps: float = 1e-5, time_bias=None, activation: bool = True):
    """y = SiLU(GroupNorm(x + time_bias[:, :, None, None])), x: [N, C, H, W], time_bias: [N, C], [1, C] (one for the batch) or None."""
    if time_bias is not None:
        x = x + time_bias[:, :, None, None]
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if activation else y


def attention(qkv, num_heads: int):
    """Multi-head self-attention core on the 1x1-conv layout.

    qkv: [B, 3C, N], channels ordered q | k | v, head j owning channels [j*d, (j+1)*d) of each.
    Returns [B, C, N]: softmax(q^T k / sqrt(d)) applied to v, per head.
    """
    batch, three_c, seq = qkv.shape
    head_dim = three_c // (3 * num_heads)
    q, k, v = qkv.view(batch, 3, num_heads, head_dim, seq).unbind(1)  # each [B, h, d, N]
    scores = torch.einsum("bhdi,bhdj->bhij", q, k) * head_dim**-0.5
    probs = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1).to(qkv.dtype)
    out = torch.einsum("bhij,bhdj->bhdi", probs, v)
    return out.reshape(batch, three_c // 3, seq)


def attention_sdpa(qkv, num_heads: int):
    """The same math through torch's scaled_dot_product_attention (tensor-core kernels on CUDA)."""
    batch, three_c, seq = qkv.shape
    head_dim = three_c // (3 * num_heads)
    # SDPA's fused kernels need the head dim contiguous; without the copy it falls back to its math path
    q, k, v = qkv.view(batch, 3, num_heads, head_dim, seq).transpose(-1, -2).contiguous().unbind(1)  # [B, h, N, d]
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(batch, three_c // 3, seq)
