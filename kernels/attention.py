"""Fused multi-head self-attention core on the 1x1-conv layout, in Triton, as a torch custom op.

qkv is [B, 3C, N] (channels q | k | v, head j owning channels [j*d, (j+1)*d) of each) and the
output is [B, C, N]: the kernels address q, k, v, out and the gradients through their strides, so
nothing is transposed or copied. The output and dqkv take qkv's layout: channels innermost when a
channels-last convolution made qkv (inductor's layout for inference graphs on CUDA, and for every
graph on the CPU), else contiguous; the ops are tagged flexible_layout, so inductor passes such a
qkv as it is instead of copying it to contiguous and the output back. With N <= 256 a program holds a block of rows against *all* N
columns of the score matrix, so the softmax is exact in one pass (no online rescaling, no
[rows, d] accumulator); d is walked in BLOCK_D chunks, both when forming scores and when applying
them, which bounds the operands tl.dot holds in shared memory or registers.

Forward: one program per (query block, batch * head); saves the log-sum-exp per query (fp32).
Backward (FlashAttention-style recompute, P = exp(S - lse), dS = P * (dP - delta)) in two
launches that write disjoint parts of dqkv, so it is deterministic without atomics:
  - per query block: delta = rowsum(dO * O) (stored) and dq;
  - per key block, against all queries: dk and dv.
"""
import re

import torch
import triton
import triton.language as tl

from kernels import FLEXIBLE_LAYOUT, attention_beyond_limits, next_power_of_2

# Score tile [rows, cols] elements: the dq backward keeps about four such fp32 tiles live
# (S, P, dP, dS), 4 * 4096 / 256 threads = 64 registers per thread at 8 warps.
_MAX_TILE = 4096
# Bytes of the two operands of one tensor-core tl.dot staged in shared memory: half of the
# 64 KB a T4 allows per block, leaving room for layout conversions and the reductions' scratch.
_DOT_SMEM_BUDGET = 32 * 1024
# triton before 3.3 (torch 2.6 brings 3.2) allocates registers differently: see _launch_config
_TRITON_BEFORE_3_3 = tuple(map(int, re.match(r"(\d+)\.(\d+)", triton.__version__).groups())) < (3, 3)


@triton.jit
def _scores(a_ptr, a_sc, a_sn, b_ptr, b_sc, b_sn, rows, row_mask, cols, col_mask, D,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc[r, c] = sum_i a[i, rows[r]] * b[i, cols[c]] in fp32; a, b are [d, N] channel slices."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        a = tl.load(a_ptr + offs_d[None, :] * a_sc + rows[:, None] * a_sn,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_d[:, None] * b_sc + cols[None, :] * b_sn,
                    mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        # "ieee": fp32 inputs stay full precision like torch's default matmul (no tf32);
        # 16-bit inputs use tensor cores whatever this says.
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _apply(p, m_ptr, m_sc, m_sn, cols, col_mask, dst_ptr, dst_sc, dst_sn, rows, row_mask, D,
           BLOCK_D: tl.constexpr):
    """dst[i, rows[r]] = sum_c p[r, c] * m[i, cols[c]] for every i < D, one d chunk at a time."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        m = tl.load(m_ptr + offs_d[None, :] * m_sc + cols[:, None] * m_sn,
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        o = tl.dot(p, m, input_precision="ieee")
        tl.store(dst_ptr + offs_d[None, :] * dst_sc + rows[:, None] * dst_sn,
                 o.to(dst_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _fwd_kernel(qkv_ptr, out_ptr, lse_ptr,
                s_b, s_c, s_n, so_b, so_c, so_n,
                H, N, D, C, sm_scale,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_ptr = qkv_ptr + b.to(tl.int64) * s_b + (h * D) * s_c
    k_ptr = q_ptr + C * s_c
    v_ptr = k_ptr + C * s_c
    o_ptr = out_ptr + b.to(tl.int64) * so_b + (h * D) * so_c

    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < N

    s = _scores(q_ptr, s_c, s_n, k_ptr, s_c, s_n, rows, row_mask, cols, col_mask, D,
                BLOCK_R, BLOCK_C, BLOCK_D) * sm_scale
    s = tl.where(col_mask[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    denom = tl.sum(p, axis=1)
    tl.store(lse_ptr + pid_bh * N + rows, m + tl.log(denom), mask=row_mask)
    # Normalised before the cast to the input dtype, as the reference's softmax(...).to(dtype).
    p = (p / denom[:, None]).to(qkv_ptr.dtype.element_ty)
    _apply(p, v_ptr, s_c, s_n, cols, col_mask, o_ptr, so_c, so_n, rows, row_mask, D, BLOCK_D)


@triton.jit
def _bwd_dq_kernel(qkv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
                   s_b, s_c, s_n, so_b, so_c, so_n, sdo_b, sdo_c, sdo_n, sd_b, sd_c, sd_n,
                   H, N, D, C, sm_scale,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_ptr = qkv_ptr + b.to(tl.int64) * s_b + (h * D) * s_c
    k_ptr = q_ptr + C * s_c
    v_ptr = k_ptr + C * s_c
    o_ptr = out_ptr + b.to(tl.int64) * so_b + (h * D) * so_c
    do_ptr = dout_ptr + b.to(tl.int64) * sdo_b + (h * D) * sdo_c
    dq_ptr = dqkv_ptr + b.to(tl.int64) * sd_b + (h * D) * sd_c

    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # queries
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_C)  # keys
    col_mask = cols < N

    delta = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (offs_d < D)[None, :]
        o = tl.load(o_ptr + offs_d[None, :] * so_c + rows[:, None] * so_n, mask=mask, other=0.0)
        do = tl.load(do_ptr + offs_d[None, :] * sdo_c + rows[:, None] * sdo_n, mask=mask, other=0.0)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_bh * N + rows, delta, mask=row_mask)

    lse = tl.load(lse_ptr + pid_bh * N + rows, mask=row_mask, other=0.0)
    s = _scores(q_ptr, s_c, s_n, k_ptr, s_c, s_n, rows, row_mask, cols, col_mask, D,
                BLOCK_R, BLOCK_C, BLOCK_D)
    p = tl.where(col_mask[None, :], tl.exp(s * sm_scale - lse[:, None]), 0.0)
    dp = _scores(do_ptr, sdo_c, sdo_n, v_ptr, s_c, s_n, rows, row_mask, cols, col_mask, D,
                 BLOCK_R, BLOCK_C, BLOCK_D)
    dsc = (p * (dp - delta[:, None]) * sm_scale).to(qkv_ptr.dtype.element_ty)
    _apply(dsc, k_ptr, s_c, s_n, cols, col_mask, dq_ptr, sd_c, sd_n, rows, row_mask, D, BLOCK_D)


@triton.jit
def _bwd_dkdv_kernel(qkv_ptr, dout_ptr, lse_ptr, delta_ptr, dqkv_ptr,
                     s_b, s_c, s_n, sdo_b, sdo_c, sdo_n, sd_b, sd_c, sd_n,
                     H, N, D, C, sm_scale,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_ptr = qkv_ptr + b.to(tl.int64) * s_b + (h * D) * s_c
    k_ptr = q_ptr + C * s_c
    v_ptr = k_ptr + C * s_c
    do_ptr = dout_ptr + b.to(tl.int64) * sdo_b + (h * D) * sdo_c
    dk_ptr = dqkv_ptr + b.to(tl.int64) * sd_b + (C + h * D) * sd_c
    dv_ptr = dk_ptr + C * sd_c

    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # keys
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_C)  # queries
    col_mask = cols < N

    # Transposed scores; an lse of +inf zeroes the padded queries' probabilities.
    lse = tl.load(lse_ptr + pid_bh * N + cols, mask=col_mask, other=float("inf"))
    delta = tl.load(delta_ptr + pid_bh * N + cols, mask=col_mask, other=0.0)
    st = _scores(k_ptr, s_c, s_n, q_ptr, s_c, s_n, rows, row_mask, cols, col_mask, D,
                 BLOCK_R, BLOCK_C, BLOCK_D)
    pt = tl.exp(st * sm_scale - lse[None, :])
    dpt = _scores(v_ptr, s_c, s_n, do_ptr, sdo_c, sdo_n, rows, row_mask, cols, col_mask, D,
                  BLOCK_R, BLOCK_C, BLOCK_D)
    dst = (pt * (dpt - delta[None, :]) * sm_scale).to(qkv_ptr.dtype.element_ty)
    pt = pt.to(qkv_ptr.dtype.element_ty)
    _apply(pt, do_ptr, sdo_c, sdo_n, cols, col_mask, dv_ptr, sd_c, sd_n, rows, row_mask, D, BLOCK_D)
    _apply(dst, q_ptr, s_c, s_n, cols, col_mask, dk_ptr, sd_c, sd_n, rows, row_mask, D, BLOCK_D)


def _launch_config(batch_heads: int, seq: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    """Tiles for a kernel whose programs each take BLOCK_R rows against all BLOCK_C columns.

    The same choice serves all three kernels: their dots are [R, D] x [D, C] and [R, C] x [C, D].
    """
    block_c = max(16, next_power_of_2(seq))  # tl.dot wants every dimension >= 16
    block_r = max(16, min(64, _MAX_TILE // block_c, block_c))
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    # tl.dot uses tensor cores only for 16-bit inputs from sm_80 on; fp32 (input_precision="ieee")
    # and everything on a T4 (sm_75, since triton 3.3) run on FMA units, each thread holding its
    # rows' and columns' d chunk in registers: there a 64-wide chunk spilled 0.3 to 2.4 KB per
    # thread, 16 spills nothing (tests/test_kernels_compile_for_gpus.py). The CPU interpreter
    # takes the FMA choice too.
    on_fma = props is None or props.major < 8 or dtype == torch.float32
    block_d = 16 if on_fma else max(16, min(64, next_power_of_2(head_dim)))
    elem = torch.finfo(dtype).bits // 8
    while block_d > 16 and max(block_r * block_d + block_d * block_c,
                               block_r * block_c + block_c * block_d) * elem > _DOT_SMEM_BUDGET:
        block_d //= 2
    num_stages = 2
    if props is not None:
        # Hopper's tensor cores (wgmma) on 64-row blocks: triton 3.2 (torch 2.6) fails to compile
        # them at 8 warps and at 4 the backward spills; 32-row blocks do neither (checked by
        # tests/test_kernels_compile_for_gpus.py with triton 3.8; by hand with 3.2 and 3.6).
        if props.major == 9 and not on_fma:
            block_r = min(block_r, 32)
        # Smaller row blocks until the grid covers the SMs: at the model's shape (B=64, one head,
        # N=64) 64-row blocks would leave half of an H100 idle; the extra K/V reads hit L2.
        while block_r > 16 and batch_heads * triton.cdiv(seq, block_r) < props.multi_processor_count:
            block_r //= 2
        # Ampere's 64x64 tiles at 8 warps: triton 3.2 holds the dK/dV backward to 128 registers and
        # spills 88 bytes with a 64-wide d chunk, none with 32 (3.3 to 3.8 spill none with 64).
        if props.major == 8 and not on_fma and block_r * block_c >= 4096 and _TRITON_BEFORE_3_3:
            block_d = min(block_d, 32)
        # Below sm_80 there is no cp.async to pipeline the d loop with: no extra smem buffers.
        if props.major < 8:
            num_stages = 1
    num_warps = 8 if block_r * block_c >= 4096 else 4
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d,
                num_warps=num_warps, num_stages=num_stages)


def _check(qkv: torch.Tensor, num_heads: int):
    """One-line errors for bad shapes: plain comparisons, not torch._check, on the launch path."""
    if qkv.dim() != 3:
        raise RuntimeError(f"attention expects qkv [B, 3C, N], got shape {tuple(qkv.shape)}")
    batch, three_c, seq = qkv.shape
    if three_c % (3 * num_heads):
        raise RuntimeError(f"{three_c} channels do not split into q, k, v of {num_heads} heads")
    reason = attention_beyond_limits(batch, three_c // 3, seq, num_heads)
    if reason:
        raise RuntimeError(reason)


def _empty_in_layout_of(qkv: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, channels, N] in qkv's layout: channels innermost if qkv's are (a channels-last
    convolution's output viewed as [B, 3C, N]), else contiguous."""
    batch, _, seq = qkv.shape
    if seq > 1 and qkv.stride(1) == 1:
        return qkv.new_empty((batch, seq, channels)).transpose(1, 2)
    return qkv.new_empty((batch, channels, seq))


@torch.library.custom_op("ddpm_kernels::attention", mutates_args=(), **FLEXIBLE_LAYOUT)
def _attention_fwd(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out [B, C, N] (qkv's layout and dtype) and lse [B, heads, N] (fp32)."""
    _check(qkv, num_heads)
    batch, three_c, seq = qkv.shape
    c = three_c // 3
    head_dim = c // num_heads
    out = _empty_in_layout_of(qkv, c)
    lse = qkv.new_empty((batch, num_heads, seq), dtype=torch.float32)
    cfg = _launch_config(batch * num_heads, seq, head_dim, qkv.dtype, qkv.device)
    grid = (triton.cdiv(seq, cfg["BLOCK_R"]), batch * num_heads)
    _fwd_kernel[grid](qkv, out, lse, *qkv.stride(), *out.stride(),
                      num_heads, seq, head_dim, c, head_dim**-0.5, **cfg)
    return out, lse


@_attention_fwd.register_fake
def _(qkv, num_heads):
    _check(qkv, num_heads)
    batch, three_c, seq = qkv.shape
    return (_empty_in_layout_of(qkv, three_c // 3),
            qkv.new_empty((batch, num_heads, seq), dtype=torch.float32))


@torch.library.custom_op("ddpm_kernels::attention_backward", mutates_args=(), **FLEXIBLE_LAYOUT)
def _attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   num_heads: int) -> torch.Tensor:
    """dqkv [B, 3C, N] (qkv's layout) from dout [B, C, N] (any strides) and the forward's qkv, out, lse."""
    batch, three_c, seq = qkv.shape
    c = three_c // 3
    head_dim = c // num_heads
    dqkv = _empty_in_layout_of(qkv, three_c)
    delta = torch.empty_like(lse)
    cfg = _launch_config(batch * num_heads, seq, head_dim, qkv.dtype, qkv.device)
    grid = (triton.cdiv(seq, cfg["BLOCK_R"]), batch * num_heads)
    _bwd_dq_kernel[grid](qkv, out, dout, lse, delta, dqkv,
                         *qkv.stride(), *out.stride(), *dout.stride(), *dqkv.stride(),
                         num_heads, seq, head_dim, c, head_dim**-0.5, **cfg)
    _bwd_dkdv_kernel[grid](qkv, dout, lse, delta, dqkv,
                           *qkv.stride(), *dout.stride(), *dqkv.stride(),
                           num_heads, seq, head_dim, c, head_dim**-0.5, **cfg)
    return dqkv


@_attention_bwd.register_fake
def _(dout, qkv, out, lse, num_heads):
    return _empty_in_layout_of(qkv, qkv.shape[1])


def _setup_context(ctx, inputs, output):
    qkv, num_heads = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads = num_heads
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_bwd(dout, qkv, out, lse, ctx.num_heads), None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q^T k / sqrt(d)) applied to v per head: qkv [B, 3C, N] -> [B, C, N] in qkv's dtype."""
    return _attention_fwd(qkv, num_heads)[0]
