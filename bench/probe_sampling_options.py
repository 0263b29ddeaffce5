"""What inductor's options and the step's own choices buy the CUDA-graph sampling step: each row
compiles the default sampling step (1000-step DDPM, 64 images, seed UNet) afresh with one set of
options and times its replays. For the 10x aim (bench/README.md, "Sampling: where the 10x aim
stands"); an option that wins here becomes the default, and the suite then measures it.

  python -m bench.probe_sampling_options --out DIR [--rows NAME,NAME,...]

Rows, in one process, in ROWS' order (the eager fp32 loop first, for the ratio; max-autotune last:
its compile takes minutes): ms per step by the wall clock over 3 rounds of 300 replays (the eager
row: 20 steps) after the capture, each round ending in a device sync (median). Each row prints as it is measured and is
appended to DIR/sampling-options.md, so a time limit leaves what was measured. On a CPU it runs
the quick config, without graphs, to test itself."""
import argparse
import contextlib
import time
import types
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor import config as inductor_config

from bench import variants
from bench.common import load_config, sync
import ddpm.sample
from ddpm import cli, model
from ddpm.diffusion import Diffusion
from ddpm.runtime import compile_model
from ddpm.sample import FastStep


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu"
DEFAULT = ["sample.compile=default"] if QUICK else []  # on a CPU `auto` would not compile

# name: (config overrides, inductor options, FastStep's keyword arguments, freezing). The rows that
# could move the step most come first: what device time is left after the GPU check may cut the rest.
ROWS = {
    "eager-fp32": (variants.SAMPLE["eager-fp32"], {}, {}, False),
    "default": (DEFAULT, {}, {}, True),
    # the convolutions with one input or output channel as the products and sums they are, and the
    # stride-2 ones as stride-1 ones (NET_CHANGES; cuDNN runs the transposed ones as dgrad kernels,
    # 35 us of the H200's step): together here, one at a time below
    "every conv rewrite": (DEFAULT, {}, {}, True),
    # the batch as parallel branches of the graph (32 or 16 images each)
    "2 streams": ([*DEFAULT, "sample.streams=2"], {}, {}, True),
    "4 streams": ([*DEFAULT, "sample.streams=4"], {}, {}, True),
    # cuDNN's and inductor's fp16 kernels in place of bf16 ones (a T4's default precision)
    "fp16": ([*DEFAULT, "sample.precision=fp16"], {}, {}, True),
    # channels-last for every convolution (inductor's heuristic decides by default)
    "force_layout_optimization": (DEFAULT, {"force_layout_optimization": True}, {}, True),
    "pointwise thin convs": (DEFAULT, {}, {}, True),
    "sub-pixel upsampling": (DEFAULT, {}, {}, True),
    "space-to-depth downsampling": (DEFAULT, {}, {}, True),
    # 1x1 convolutions (skips, qkv, proj, out: 9 a step) as matmuls, whose bias and residual adds
    # inductor can fuse
    "conv_1x1_as_mm": (DEFAULT, {"conv_1x1_as_mm": True}, {}, True),
    # what the default's choices bought: the time-bias table, freezing, one-element weights kept as
    # tensors (inlined, each is rebuilt by a kernel every step)
    "no time table": (DEFAULT, {}, {"time_table": False}, True),
    "no freezing": (DEFAULT, {}, {}, False),
    "inlined constants": (DEFAULT, {"always_keep_tensor_constants": False}, {}, True),
    "no layout_optimization": (DEFAULT, {"layout_optimization": False}, {}, True),  # no channels-last
    # several small independent kernels launched as one
    "combo_kernels": (DEFAULT, {"combo_kernels": True}, {}, True),
    # launch configs of the fused elementwise kernels tuned by benchmarking
    "coordinate_descent_tuning": (DEFAULT, {"coordinate_descent_tuning": True}, {}, True),
    "default again": (DEFAULT, {}, {}, True),  # drift: the default row, repeated
    "max-autotune": ([*DEFAULT, "sample.compile=max-autotune"], {}, {}, True),
}


def _pointwise_conv_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a convolution with one input channel (any square kernel, stride 1) or one
    output channel (1x1), as sums of broadcast products: in autocast's dtype, as the convolution
    computes; inductor fuses them, accumulating in fp32 like the convolution."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    x, weight, bias = x.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype).view(1, -1, 1, 1)
    if conv.out_channels == 1:
        return (x * weight.view(1, -1, 1, 1)).sum(1, keepdim=True) + bias
    k, pad = conv.kernel_size[0], conv.padding[0]
    height, width = x.shape[-2:]
    padded = F.pad(x, (pad,) * 4) if pad else x
    out = bias
    for dy in range(k):
        for dx in range(k):
            out = out + weight[:, 0, dy, dx].view(1, -1, 1, 1) * padded[:, :, dy:dy + height, dx:dx + width]
    return out


def pointwise_thin_convs(net: nn.Module) -> int:
    """Swap the UNet's convolutions with one input or output channel (from the 1-channel image: the
    first ResBlock's 3x3 and its 1x1 skip; the 1x1 output) for _pointwise_conv_forward. An H200's
    profile of the sampling step shows cuDNN running two of them off the tensor cores
    (implicit_convolve_sgemm, 17 us a step; a cutlass sm75 kernel, 9 us), where inductor could fuse
    them with their neighbours. Returns how many it swapped."""
    thin = [m for m in net.modules() if isinstance(m, nn.Conv2d) and 1 in (m.in_channels, m.out_channels)]
    for conv in thin:
        square, same = conv.kernel_size[0] == conv.kernel_size[1], conv.padding[0] == conv.padding[1]
        assert conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and square and same, conv
        assert conv.in_channels == 1 or conv.kernel_size == (1, 1), conv
        conv.forward = types.MethodType(_pointwise_conv_forward, conv)
    return len(thin)


def _sub_pixel_forward(up: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """up(x) (kernel 4, stride 2, padding 1) as a 3x3 convolution to four phases of each output
    channel, then pixel_shuffle: output row 2m + a reads input rows m - 1, m (a = 0: taps 3, 1) or
    m, m + 1 (a = 1: taps 2, 0), and likewise for columns; the row and column of each phase's 3x3
    kernel that it does not read (the last for a = 0, the first for a = 1) are zero (tap 4 of the
    zero-padded 4x4 kernel). 2.25x the products, all in one forward convolution."""
    taps = torch.tensor([[3, 1, 4], [4, 2, 0]], device=x.device)  # [phase, row of the 3x3 kernel]
    w = F.pad(up.weight, (0, 1, 0, 1))  # [in, out, 5, 5]
    kernel = w[:, :, taps[:, None, :, None], taps[None, :, None, :]]  # [in, out, a, b, 3, 3]
    kernel = kernel.permute(1, 2, 3, 0, 4, 5).flatten(0, 2)  # output channel (out, a, b)
    bias = up.bias.repeat_interleave(4)
    return F.pixel_shuffle(F.conv2d(x, kernel, bias, padding=1), 2)


def _space_to_depth_forward(down: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """down(x) (kernel 4, stride 2, padding 1) as pixel_unshuffle of the padded input, then a 2x2
    convolution of stride 1: tap (2u + p, 2v + q) of the 4x4 kernel reads channel (c, p, q) of the
    unshuffled input at offset (u, v). The same products."""
    w = down.weight  # [out, in, 4, 4] -> [out, in, u, p, v, q] -> [out, (in, p, q), u, v]
    kernel = w.view(w.shape[0], w.shape[1], 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).flatten(1, 3)
    return F.conv2d(F.pixel_unshuffle(F.pad(x, (1, 1, 1, 1)), 2), kernel, down.bias)


def _swap_stride_two(kind: type, forward):
    def swap(net: nn.Module) -> int:
        convs = [m for m in net.modules() if type(m) is kind and m.stride == (2, 2)]
        for conv in convs:
            assert conv.kernel_size == (4, 4) and conv.padding == (1, 1) and conv.groups == 1, conv
            assert conv.dilation == (1, 1) and getattr(conv, "output_padding", (0, 0)) == (0, 0), conv
            conv.forward = types.MethodType(forward, conv)
        return len(convs)
    return swap


sub_pixel_upsampling = _swap_stride_two(nn.ConvTranspose2d, _sub_pixel_forward)
space_to_depth_downsampling = _swap_stride_two(nn.Conv2d, _space_to_depth_forward)


def every_conv_rewrite(net: nn.Module) -> int:
    return pointwise_thin_convs(net) + sub_pixel_upsampling(net) + space_to_depth_downsampling(net)


NET_CHANGES = {"pointwise thin convs": pointwise_thin_convs, "sub-pixel upsampling": sub_pixel_upsampling,
               "space-to-depth downsampling": space_to_depth_downsampling, "every conv rewrite": every_conv_rewrite}


def per_step_ms(fn, steps: int, rounds: int = 3) -> float:
    """The median over rounds of a round's time per step; a round ends in a device sync."""
    times = []
    for _ in range(rounds):
        sync(DEVICE)
        started = time.perf_counter()
        for i in range(steps):
            fn(i)
        sync(DEVICE)
        times.append((time.perf_counter() - started) * 1e3 / steps)
    return sorted(times)[len(times) // 2]


def sampling_row(name: str) -> str:
    overrides, options, step_options, freezing = ROWS[name]
    torch._dynamo.reset()  # each row compiles afresh; the last row's graphs and constants go
    cfg = load_config(QUICK, overrides, DEVICE)
    torch.manual_seed(0)
    net = model.build(cfg, DEVICE).eval()
    NET_CHANGES.get(name, lambda net: None)(net)
    plan = Diffusion.from_config(cfg.diffusion, DEVICE).plan(cfg.sample)
    s = cfg.sample
    shape = (8 if QUICK else 64, 1, cfg.data.image_size, cfg.data.image_size)
    x, noise = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    started = time.perf_counter()
    # the rows without freezing: plain compile_model for ddpm.sample.compile_with_frozen_weights
    unfrozen = mock.patch.object(ddpm.sample, "compile_with_frozen_weights", compile_model)
    with contextlib.nullcontext() if freezing else unfrozen, torch.inference_mode():
        step = FastStep.from_config(net, plan, s, DEVICE, **step_options)
        # the step compiles (and captures its graph) at its first call, under FROZEN_STEP_OPTIONS
        # where it freezes
        with inductor_config.patch(options), mock.patch.dict(ddpm.sample.FROZEN_STEP_OPTIONS, options):
            step(0, x, noise)
        sync(DEVICE)
        setup = time.perf_counter() - started
        eager = s.compile == "none"
        ms = per_step_ms(lambda i: step(i % len(plan.timesteps), x, noise), (20 if eager else 300) // (10 if QUICK else 1))
    return f"| {name} | {', '.join(overrides) or '-'} | {options or '-'} | {step_options or '-'} | {freezing} | {ms:.4f} | {setup:.1f} |"


def main():
    parser = cli.ArgumentParser(prog="bench.probe_sampling_options", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "sampling-options.md"
    card = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (quick config, no CUDA graph)"
    table.write_text(f"# The sampling step's options on {card} (torch {torch.__version__})\n\n"
                     f"1000-step DDPM step, {8 if QUICK else 64} images; ms per step: median of 3 rounds; "
                     f"setup: compile and capture.\n\n"
                     "| row | overrides | inductor options | FastStep | freezing | ms per step | setup s |\n"
                     "|---|---|---|---|---|---|---|\n")
    for name in rows:
        try:
            line = sampling_row(name)
        except Exception as e:  # one failing option set must not hide the others
            line = f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} | | | | | |"
        print(line, flush=True)
        with table.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
