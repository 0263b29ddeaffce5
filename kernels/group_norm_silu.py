"""Fused y = SiLU(GroupNorm(x + t[:, :, None, None])) in Triton, registered as a torch custom op.

One program per (sample, group). The group is a [C/G channels, H*W positions] block, so
per-channel sums (dgamma, dbeta, dt) are row sums. A group small enough (its channels and positions
each padded to a power of two, 8192 elements forward and 4096 backward: most of the seed UNet's
GroupNorms) is loaded once as one tile and held in registers, so the kernel reads its inputs once.
Larger groups are walked as [BLOCK_C, BLOCK_HW] tiles, twice (statistics, then output; sums, then
dx). Statistics are fp32 whatever the input dtype. The backward writes per-(sample, channel)
partial sums of dgamma and dbeta that one torch reduction sums over the batch: deterministic, no
atomics.

Both memory formats run as they are: NCHW (a group is one contiguous run) and channels-last
(inductor's layout for convolutions in inference graphs; a group is C/G contiguous channels at
each position). The output keeps the input's format, and the op is tagged flexible_layout, so
inductor passes a channels-last graph's activations straight in instead of copying them to NCHW
and back around every call.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import FLEXIBLE_LAYOUT, next_power_of_2

# Elements per tile when a group is walked in tiles: at 8 warps that is 8 fp32 values per thread
# for each live tile, which keeps the backward (x, dy, xhat, two accumulators) well inside a T4's
# register file.
_MAX_TILE = 2048
# Largest group held whole in registers, forward and backward, at 16 elements per thread. The
# forward needs ~5 registers per element: 8192 at 16 warps, ~80 registers. The backward needs ~9
# (x, dy, xhat, g, offsets): at 16 warps, whose cap is 128, 8192 spilled 40-120 bytes per thread
# with triton 3.2 and 3.6 (none with 3.8), so it stops at 4096, 8 warps, ~150 of 255. ptxas's
# counts: tests/test_kernels_compile_for_gpus.py.
_MAX_ONE_TILE_FWD = 8192
_MAX_ONE_TILE_BWD = 4096
_ONE_TILE_PER_THREAD = 16


@triton.jit
def _group_layout(n, c_first, C, HW, CHANNELS_LAST: tl.constexpr):
    """Offset of the group's first element, and the steps to the next channel and the next position.
    x, y, dy and dx share one layout; offsets from the group's first element stay inside one sample,
    which _check keeps under 2**31 elements (int32)."""
    base = n.to(tl.int64) * C * HW
    if CHANNELS_LAST:
        return base + c_first, 1, C
    return base + c_first * HW, HW, 1


@triton.jit
def _load_tile(x_ptr, t_row, cs, c_mask, hw0, HW, stride_c, stride_hw,
               HAS_T: tl.constexpr, BLOCK_HW: tl.constexpr):
    """x_ptr points at the group's first element."""
    hws = hw0 + tl.arange(0, BLOCK_HW)
    mask = c_mask[:, None] & (hws < HW)[None, :]
    offs = cs[:, None] * stride_c + hws[None, :] * stride_hw
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_T:
        v += t_row[:, None]  # masked lanes now hold t, not 0: reductions must re-mask
    return v, offs, mask


@triton.jit
def _channel_params(t_ptr, w_ptr, b_ptr, t_first, c_first, cs, c_mask, HAS_T: tl.constexpr):
    """This sample's time bias (0 without one: compiled code cannot return None), gamma and beta for
    channels cs of the group, in fp32. t_first: the offset of the group's first time bias."""
    t_row = tl.load(t_ptr + t_first + cs, mask=c_mask, other=0.0).to(tl.float32) if HAS_T else 0.0
    w = tl.load(w_ptr + c_first + cs, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c_first + cs, mask=c_mask, other=0.0).to(tl.float32)
    return t_row, w, b


@triton.jit
def _normalize_store(y_ptr, v, offs, mask, w, b, mean, rstd, ACTIVATION: tl.constexpr):
    scale = w * rstd
    y = v * scale[:, None] + (b - mean * scale)[:, None]
    if ACTIVATION:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(x_ptr, t_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                G, CPG, HW, t_stride_n, eps,
                HAS_T: tl.constexpr, ACTIVATION: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                ONE_TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // G
    c_first = (pid % G) * CPG
    base, stride_c, stride_hw = _group_layout(n, c_first, G * CPG, HW, CHANNELS_LAST)
    x_ptr += base
    y_ptr += base
    t_first = n * t_stride_n + c_first  # t_stride_n = 0: one time bias for the whole batch
    group_size = CPG * HW

    if ONE_TILE:  # the whole group in registers: one read of x, an exact two-pass variance
        cs = tl.arange(0, BLOCK_C)
        c_mask = cs < CPG
        t_row, w, b = _channel_params(t_ptr, w_ptr, b_ptr, t_first, c_first, cs, c_mask, HAS_T)
        v, offs, mask = _load_tile(x_ptr, t_row, cs, c_mask, 0, HW, stride_c, stride_hw, HAS_T, BLOCK_HW)
        mean = tl.sum(tl.where(mask, v, 0.0)) / group_size
        d = tl.where(mask, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d) / group_size + eps)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
        _normalize_store(y_ptr, v, offs, mask, w, b, mean, rstd, ACTIVATION)
    else:
        # Mean and M2 exact (two-pass, in registers) per tile, merged across tiles with Chan's
        # formula: no sum-of-squares cancellation when |mean| >> std. A second walk writes y.
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for c0 in range(0, CPG, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_mask = cs < CPG
            t_row = tl.load(t_ptr + t_first + cs, mask=c_mask, other=0.0).to(tl.float32) if HAS_T else 0.0
            for hw0 in range(0, HW, BLOCK_HW):
                v, offs, mask = _load_tile(x_ptr, t_row, cs, c_mask, hw0, HW, stride_c, stride_hw, HAS_T, BLOCK_HW)
                tile_count = (tl.minimum(CPG - c0, BLOCK_C) * tl.minimum(HW - hw0, BLOCK_HW)).to(tl.float32)
                tile_mean = tl.sum(tl.where(mask, v, 0.0)) / tile_count
                d = tl.where(mask, v - tile_mean, 0.0)
                tile_m2 = tl.sum(d * d)
                new_count = count + tile_count
                delta = tile_mean - mean
                mean += delta * (tile_count / new_count)
                m2 += tile_m2 + delta * delta * (count * tile_count / new_count)
                count = new_count
        rstd = 1.0 / tl.sqrt(m2 / group_size + eps)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
        for c0 in range(0, CPG, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_mask = cs < CPG
            t_row, w, b = _channel_params(t_ptr, w_ptr, b_ptr, t_first, c_first, cs, c_mask, HAS_T)
            for hw0 in range(0, HW, BLOCK_HW):
                v, offs, mask = _load_tile(x_ptr, t_row, cs, c_mask, hw0, HW, stride_c, stride_hw, HAS_T, BLOCK_HW)
                _normalize_store(y_ptr, v, offs, mask, w, b, mean, rstd, ACTIVATION)


@triton.jit
def _bwd_tile(x_ptr, dy_ptr, t_row, cs, c_mask, hw0, HW, stride_c, stride_hw, mean, rstd, w, b,
              HAS_T: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_HW: tl.constexpr):
    """xhat and g = dL/d(pre-activation) of one tile; g is 0 where masked (dy loads as 0)."""
    v, offs, mask = _load_tile(x_ptr, t_row, cs, c_mask, hw0, HW, stride_c, stride_hw, HAS_T, BLOCK_HW)
    xhat = (v - mean) * rstd
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION:
        pre = xhat * w[:, None] + b[:, None]
        s = tl.sigmoid(pre)
        g = g * s * (1.0 + pre * (1.0 - s))
    return xhat, g, offs, mask


@triton.jit
def _store_channel_sums(dw_partial_ptr, db_partial_ptr, nc_row, cs, c_mask, g, gx, w):
    """dbeta and dgamma partials of these channels for this sample; returns their parts of the
    group's sums sum(g*gamma*xhat) and sum(g*gamma) that dx needs."""
    db_c = tl.sum(g, axis=1)
    dw_c = tl.sum(gx, axis=1)
    tl.store(db_partial_ptr + nc_row + cs, db_c, mask=c_mask)
    tl.store(dw_partial_ptr + nc_row + cs, dw_c, mask=c_mask)
    return tl.sum(dw_c * w), tl.sum(db_c * w)


@triton.jit
def _dx_store(dx_ptr, xhat, g, offs, mask, w, rstd, c1, c2):
    """dx = rstd * (g*gamma - xhat*c1 - c2); returns dx with masked lanes 0 (for dt's sums)."""
    dx = rstd * (g * w[:, None] - xhat * c1 - c2)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return tl.where(mask, dx, 0.0)


@triton.jit
def _bwd_kernel(x_ptr, t_ptr, w_ptr, b_ptr, dy_ptr, mean_ptr, rstd_ptr,
                dx_ptr, dt_ptr, dw_partial_ptr, db_partial_ptr,
                G, CPG, HW, t_stride_n,
                HAS_T: tl.constexpr, ACTIVATION: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                ONE_TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // G
    c_first = (pid % G) * CPG
    base, stride_c, stride_hw = _group_layout(n, c_first, G * CPG, HW, CHANNELS_LAST)
    x_ptr += base
    dy_ptr += base
    dx_ptr += base
    group_size = CPG * HW
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    nc_row = n * G * CPG + c_first  # offset of this group's first channel in [N, C] buffers
    t_first = n * t_stride_n + c_first

    if ONE_TILE:  # x and dy read once, xhat and g kept in registers for dx
        cs = tl.arange(0, BLOCK_C)
        c_mask = cs < CPG
        t_row, w, b = _channel_params(t_ptr, w_ptr, b_ptr, t_first, c_first, cs, c_mask, HAS_T)
        xhat, g, offs, mask = _bwd_tile(x_ptr, dy_ptr, t_row, cs, c_mask, 0, HW, stride_c, stride_hw,
                                        mean, rstd, w, b, HAS_T, ACTIVATION, BLOCK_HW)
        c1, c2 = _store_channel_sums(dw_partial_ptr, db_partial_ptr, nc_row, cs, c_mask, g, g * xhat, w)
        dx = _dx_store(dx_ptr, xhat, g, offs, mask, w, rstd, c1 / group_size, c2 / group_size)
        if HAS_T:  # dt[n, c]: dx summed over the channel's H*W
            tl.store(dt_ptr + nc_row + cs, tl.sum(dx, axis=1).to(dt_ptr.dtype.element_ty), mask=c_mask)
    else:
        # Pass 1: per-channel sums of g and g*xhat, and the group's sums for dx.
        c1 = 0.0
        c2 = 0.0
        for c0 in range(0, CPG, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_mask = cs < CPG
            t_row, w, b = _channel_params(t_ptr, w_ptr, b_ptr, t_first, c_first, cs, c_mask, HAS_T)
            acc_g = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
            acc_gx = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
            for hw0 in range(0, HW, BLOCK_HW):
                xhat, g, offs, mask = _bwd_tile(x_ptr, dy_ptr, t_row, cs, c_mask, hw0, HW, stride_c, stride_hw,
                                                mean, rstd, w, b, HAS_T, ACTIVATION, BLOCK_HW)
                acc_g += g
                acc_gx += g * xhat
            part1, part2 = _store_channel_sums(dw_partial_ptr, db_partial_ptr, nc_row, cs, c_mask, acc_g, acc_gx, w)
            c1 += part1
            c2 += part2
        c1 = c1 / group_size
        c2 = c2 / group_size
        # Pass 2: dx, and dt summed over the tiles.
        for c0 in range(0, CPG, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_mask = cs < CPG
            t_row, w, b = _channel_params(t_ptr, w_ptr, b_ptr, t_first, c_first, cs, c_mask, HAS_T)
            acc_dx = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
            for hw0 in range(0, HW, BLOCK_HW):
                xhat, g, offs, mask = _bwd_tile(x_ptr, dy_ptr, t_row, cs, c_mask, hw0, HW, stride_c, stride_hw,
                                                mean, rstd, w, b, HAS_T, ACTIVATION, BLOCK_HW)
                dx = _dx_store(dx_ptr, xhat, g, offs, mask, w, rstd, c1, c2)
                if HAS_T:
                    acc_dx += dx
            if HAS_T:
                tl.store(dt_ptr + nc_row + cs, tl.sum(acc_dx, axis=1).to(dt_ptr.dtype.element_ty), mask=c_mask)


def _launch_config(channels_per_group: int, hw: int, channels_last: bool, backward: bool):
    """The whole group as one tile when it fits (_MAX_ONE_TILE_FWD/BWD); otherwise tiles as long as
    possible along the contiguous axis: H*W in NCHW, the group's channels in channels-last (where
    each position holds only C/G of them)."""
    c_pow2, hw_pow2 = next_power_of_2(channels_per_group), next_power_of_2(hw)
    if c_pow2 * hw_pow2 <= (_MAX_ONE_TILE_BWD if backward else _MAX_ONE_TILE_FWD):
        num_warps = max(4, c_pow2 * hw_pow2 // (32 * _ONE_TILE_PER_THREAD))
        return dict(ONE_TILE=True, BLOCK_C=c_pow2, BLOCK_HW=hw_pow2, num_warps=num_warps)
    if channels_last:
        block_c = min(c_pow2, _MAX_TILE)
        block_hw = min(hw_pow2, _MAX_TILE // block_c)
    else:
        block_hw = min(hw_pow2, _MAX_TILE)
        block_c = min(c_pow2, _MAX_TILE // block_hw)
    num_warps = max(1, min(8, block_c * block_hw // 256))
    return dict(ONE_TILE=False, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps)


def _time_bias_stride(time_bias) -> int:
    """Elements from one sample's time bias to the next: 0 where one [1, C] row serves the batch."""
    return 0 if time_bias is None or time_bias.shape[0] == 1 else time_bias.shape[1]


def _dt_dtype(time_bias, n: int) -> torch.dtype:
    """The backward's per-sample dt: the time bias's dtype, or fp32 where the samples' are summed."""
    return time_bias.dtype if time_bias.shape[0] == n else torch.float32


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels run x in: channels-last as it comes, anything else as NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check(x, weight, bias, time_bias, num_groups):
    """One-line errors for bad shapes, on every call: plain comparisons, not torch._check, which cost
    ~2 us each on the launch path (under torch.compile they become guards on the static shapes)."""
    if x.dim() != 4:
        raise RuntimeError(f"group_norm_silu expects NCHW, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c * h * w >= 2**31:
        raise RuntimeError(f"one sample of {c * h * w} elements overflows int32 offsets")
    if c % num_groups:
        raise RuntimeError(f"{c} channels do not split into {num_groups} groups")
    if weight.shape != (c,) or bias.shape != (c,):
        raise RuntimeError("weight and bias must have one value per channel")
    if time_bias is not None and time_bias.shape not in ((n, c), (1, c)):
        raise RuntimeError(f"time bias must be [N, C] = {[n, c]} or [1, C] (one for the whole batch), "
                           f"got {list(time_bias.shape)}")


@torch.library.custom_op("ddpm_kernels::group_norm_silu", mutates_args=(), **FLEXIBLE_LAYOUT)
def _group_norm_silu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         time_bias: Optional[torch.Tensor], num_groups: int, eps: float,
                         activation: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, weight, bias, time_bias, num_groups)
    layout = _memory_format(x)
    channels_last = layout == torch.channels_last
    x = x.contiguous(memory_format=layout)
    n, c, h, w = x.shape
    y = torch.empty_like(x, memory_format=layout)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    has_t = time_bias is not None
    # Without a time bias x stands in for t_ptr: HAS_T=False compiles every read of it away.
    _fwd_kernel[(n * num_groups,)](
        x, time_bias.contiguous() if has_t else x, weight.contiguous(), bias.contiguous(),
        y, mean, rstd, num_groups, c // num_groups, h * w, _time_bias_stride(time_bias), eps,
        HAS_T=has_t, ACTIVATION=activation, CHANNELS_LAST=channels_last,
        **_launch_config(c // num_groups, h * w, channels_last, backward=False))
    return y, mean, rstd


@_group_norm_silu_fwd.register_fake
def _(x, weight, bias, time_bias, num_groups, eps, activation):
    _check(x, weight, bias, time_bias, num_groups)
    mean = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x, memory_format=_memory_format(x)), mean, torch.empty_like(mean)


@torch.library.custom_op("ddpm_kernels::group_norm_silu_backward", mutates_args=(), **FLEXIBLE_LAYOUT)
def _group_norm_silu_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         time_bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                         activation: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx, dt ([N, C] in the time bias's dtype; per sample in fp32 for a [1, C] time bias, to
    be summed; empty without one), and dweight and dbias
    stacked ([2, C], fp32: one reduction, and a custom op's outputs may not be views of one tensor)."""
    layout = _memory_format(x)
    channels_last = layout == torch.channels_last
    x, dy = x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout)
    n, c, h, w = x.shape
    num_groups = mean.shape[1]
    has_t = time_bias is not None
    dx = torch.empty_like(x, memory_format=layout)
    # dgamma and dbeta per (sample, channel), summed over the batch below
    partials = torch.empty((2, n, c), device=x.device, dtype=torch.float32)
    dt = torch.empty((n, c), device=x.device, dtype=_dt_dtype(time_bias, n)) if has_t else partials.new_empty(0)
    _bwd_kernel[(n * num_groups,)](
        x, time_bias.contiguous() if has_t else x, weight.contiguous(), bias.contiguous(), dy,
        mean, rstd, dx, dt, partials[0], partials[1], num_groups, c // num_groups, h * w,
        _time_bias_stride(time_bias),
        HAS_T=has_t, ACTIVATION=activation, CHANNELS_LAST=channels_last,
        **_launch_config(c // num_groups, h * w, channels_last, backward=True))
    return dx, dt, partials.sum(1)


@_group_norm_silu_bwd.register_fake
def _(dy, x, weight, bias, time_bias, mean, rstd, activation):
    n = x.shape[0]
    dt = time_bias.new_empty((n, x.shape[1]), dtype=_dt_dtype(time_bias, n)) if time_bias is not None \
        else x.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(x, memory_format=_memory_format(x)), dt,
            x.new_empty((2, x.shape[1]), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, time_bias, _, _, activation = inputs
    _, mean, rstd = output
    # x and t are saved apart (t is tiny); the kernel re-adds t instead of storing x + t.
    ctx.save_for_backward(x, weight, bias, time_bias, mean, rstd)
    ctx.activation = activation
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, time_bias, mean, rstd = ctx.saved_tensors
    dx, dt, dparams = _group_norm_silu_bwd(dy, x, weight, bias, time_bias, mean, rstd, ctx.activation)
    if time_bias is None:
        dt = None
    elif time_bias.shape[0] != dt.shape[0]:  # one time bias for the batch: its gradient sums the samples'
        dt = dt.sum(0, keepdim=True).to(time_bias.dtype)
    return dx, dparams[0].to(weight.dtype), dparams[1].to(bias.dtype), dt, None, None, None


_group_norm_silu_fwd.register_autograd(_backward, setup_context=_setup_context)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                    eps: float = 1e-5, time_bias: Optional[torch.Tensor] = None,
                    activation: bool = True) -> torch.Tensor:
    """y = SiLU(GroupNorm(x + time_bias[:, :, None, None])) (no SiLU if not activation); y in x's dtype.
    time_bias: [N, C], or [1, C] for one shared by the batch (a sampling step's)."""
    return _group_norm_silu_fwd(x, weight, bias, time_bias, num_groups, float(eps), activation)[0]
