"""The seed's UNet, generalised by config: width, depth, time-embedding size, heads, attention placement.

Each "(+ time bias) -> GroupNorm -> SiLU" is one call to kernels.fused_group_norm and the attention
core one call to kernels.attention_core, so a backend switch swaps fused Triton ops in without touching
the parameters: checkpoints are interchangeable between backends.
"""
import math
import os

import torch
from torch import nn

import kernels
from ddpm.config import UserError


def num_groups(channels: int) -> int:
    """The seed's rule: the first of 8, 4, 2, 1 that divides the channel count."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm with the optional time bias added before it and SiLU after it, as one op."""

    def __init__(self, channels: int, activation: bool = True, backend: str = "torch"):
        super().__init__(num_groups(channels), channels)
        self.activation = activation
        self.backend = backend

    def forward(self, x, time_bias=None):
        return kernels.fused_group_norm(x, self.weight, self.bias, self.num_groups, self.eps,
                                        time_bias, self.activation, self.backend)


class SinusoidalTimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, t):
        angles = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, backend: str):
        super().__init__()
        self.norm1 = GroupNormAct(in_ch, backend=backend)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.norm2 = GroupNormAct(out_ch, backend=backend)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, time_bias):
        """time_bias: time_proj of the activated time embedding, [N, C] or [1, C] (UNet.time_biases)."""
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h, time_bias))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Over a resolution x resolution feature map. Beyond the Triton kernel's limits
    (kernels/attention.py) `auto` (TRITON_FOR_16BIT) runs torch's, and an explicit `triton` is
    refused when the UNet is built."""

    def __init__(self, channels: int, num_heads: int, resolution: int, norm_backend: str, attention_backend: str):
        super().__init__()
        self.norm = GroupNormAct(channels, activation=False, backend=norm_backend)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.num_heads = num_heads
        if attention_backend in ("triton", TRITON_FOR_16BIT):
            reason = kernels.attention_beyond_limits(1, channels, resolution ** 2, num_heads)
            if reason and attention_backend == "triton":
                raise UserError(f"model.attention=triton cannot run the attention at {resolution}x{resolution} "
                                f"({channels} channels, {num_heads} heads): {reason}; use model.attention=auto or torch")
            attention_backend = "torch" if reason else attention_backend
            self.max_triton_batch = kernels.ATTENTION_MAX_BATCH_HEADS // num_heads
        self.backend = attention_backend

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).view(b, 3 * c, h * w)
        backend = self.backend
        if backend == TRITON_FOR_16BIT:  # dtype and batch are fixed when compiled: no branch is left at run time
            fits = qkv.dtype in (torch.float16, torch.bfloat16) and b <= self.max_triton_batch
            backend = "triton" if fits else "torch"
        out = kernels.attention_core(qkv, self.num_heads, backend)
        return x + self.proj(out.view(b, c, h, w))


class UNet(nn.Module):
    """Encoder ResBlocks with stride-2 4x4 downsampling convs, a bottleneck ResBlock -> attention ->
    ResBlock, ConvTranspose upsampling with concatenated skips, and a 1x1 output conv.

    channels[i] = base_channels * channel_mults[i]; the last entry is the bottleneck's width.
    Attention follows the bottleneck and every encoder/decoder ResBlock whose resolution is in
    attention_resolutions (the seed: the 8x8 bottleneck only).
    """

    def __init__(self, in_channels=1, image_size=32, base_channels=64, channel_mults=(1, 2, 4),
                 time_embed_dim=256, time_hidden_mult=4, num_heads=1, attention_resolutions=(8,),
                 norm_backend="torch", attention_backend="torch"):
        super().__init__()
        self.backends = norm_backend, attention_backend
        widths = [base_channels * m for m in channel_mults]
        levels = len(widths) - 1
        self.time_embed = nn.Sequential(
            SinusoidalTimeEmbedding(time_embed_dim),
            nn.Linear(time_embed_dim, time_hidden_mult * time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_hidden_mult * time_embed_dim, time_embed_dim),
        )
        self.time_act = nn.SiLU()

        def attention(channels, resolution):
            if resolution in attention_resolutions:
                return SelfAttention(channels, num_heads, resolution, norm_backend, attention_backend)
            return nn.Identity()

        self.encoder, self.encoder_attn, self.down = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        ch = in_channels
        for i in range(levels):
            res = image_size >> i
            self.encoder.append(ResBlock(ch, widths[i], time_embed_dim, norm_backend))
            self.encoder_attn.append(attention(widths[i], res))
            self.down.append(nn.Conv2d(widths[i], widths[i], 4, stride=2, padding=1))
            ch = widths[i]
        self.mid1 = ResBlock(widths[-2], widths[-1], time_embed_dim, norm_backend)
        self.mid_attn = attention(widths[-1], image_size >> levels)
        self.mid2 = ResBlock(widths[-1], widths[-2], time_embed_dim, norm_backend)

        self.up, self.decoder, self.decoder_attn = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(levels)):
            res = image_size >> i
            self.up.append(nn.ConvTranspose2d(widths[i], widths[i], 4, stride=2, padding=1))
            self.decoder.append(ResBlock(2 * widths[i], widths[max(i - 1, 0)], time_embed_dim, norm_backend))
            self.decoder_attn.append(attention(widths[max(i - 1, 0)], res))
        self.out = nn.Conv2d(widths[0], in_channels, 1)
        layers = [m for m in self.modules() if isinstance(m, SelfAttention)]
        beyond = sum(m.backend != attention_backend for m in layers)  # auto's fallbacks (SelfAttention)
        if beyond:
            self.backends = norm_backend, f"{attention_backend} (torch in {beyond} of {len(layers)} layers, beyond its limits)"

    def res_blocks(self) -> tuple[ResBlock, ...]:
        """The ResBlocks in the order forward runs them."""
        return (*self.encoder, self.mid1, self.mid2, *self.decoder)

    def time_biases(self, t) -> list[torch.Tensor]:
        """What t adds to each ResBlock (in res_blocks' order): the time embedding through the shared
        MLP and the block's projection. Depends on t alone, so a sampler can compute it once for all
        its timesteps instead of at every step."""
        temb = self.time_act(self.time_embed(t))
        return [block.time_proj(temb) for block in self.res_blocks()]

    def forward(self, x, t=None, time_biases=None):
        """The predicted noise of x at timesteps t ([N]), or with time_biases (t's, or rows of a
        table of them) in place of t."""
        if time_biases is None:
            if t is None:
                raise TypeError("UNet.forward needs t or time_biases")
            time_biases = self.time_biases(t)
        elif len(time_biases) != len(self.res_blocks()):
            raise ValueError(f"UNet.forward got {len(time_biases)} time biases for {len(self.res_blocks())} ResBlocks")
        biases = iter(time_biases)
        skips = []
        for block, attn, down in zip(self.encoder, self.encoder_attn, self.down):
            x = attn(block(x, next(biases)))
            skips.append(x)
            x = down(x)
        x = self.mid2(self.mid_attn(self.mid1(x, next(biases))), next(biases))
        for up, block, attn in zip(self.up, self.decoder, self.decoder_attn):
            x = attn(block(torch.cat([up(x), skips.pop()], dim=1), next(biases)))
        return self.out(x)


# model.attention=auto on compute capability 8.0+: the Triton op for fp16/bf16 inputs, where it was
# 1.6-2.0x torch's and 2.2-5.5x SDPA's on an H200, and plain torch for fp32, where it was 0.26-0.48x
# (tl.dot in full fp32 precision); bench/README.md has the rows.
TRITON_FOR_16BIT = "triton-for-16bit"


def resolve_backends(model_cfg, device, graphed: bool = True) -> tuple[str, str]:
    """auto, as measured per device class (bench/README.md); plain PyTorch on a CPU.
    - GroupNorm: the fused Triton op on CUDA, except on compute capability 8.0+ when the step is not
      captured in a CUDA graph (`graphed`): a card that fast waits on kernel launches at the seed's
      batch, and there each custom op's launch cost more than its kernel saved (H200).
    - Attention: from 8.0 on, Triton for 16-bit inputs when graphed, else torch; below 8.0 (a T4,
      where tl.dot has no tensor cores, and SDPA lost to plain torch at these shapes even on Hopper)
      plain torch."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    fast_gpu = on_cuda and torch.cuda.get_device_capability(device)[0] >= 8
    norm = model_cfg.kernels
    if norm == "auto":
        norm = "triton" if on_cuda and (graphed or not fast_gpu) else "torch"
    attention = model_cfg.attention
    if attention == "auto":
        attention = TRITON_FOR_16BIT if fast_gpu and graphed else "torch"
    return norm, attention


def triton_runs_on(device) -> bool:
    """A CUDA device, or the CPU under Triton's interpreter (the tests)."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def check_runs_on(net: UNet, device) -> None:
    """A UNet built with the Triton ops where they cannot run fails here in one line, not at its first
    kernel launch. (build() itself allows it: the sm_75 compile test launches them with stubs.)"""
    for key, backend in zip(("kernels", "attention"), net.backends):
        if backend == "triton" and not triton_runs_on(device):
            raise UserError(f"model.{key}=triton needs a CUDA GPU (on a CPU Triton runs only in its test "
                            f"interpreter, TRITON_INTERPRET=1); use model.{key}=auto or torch")


def build(cfg, device="cpu", graphed: bool = True) -> UNet:
    """The UNet that a Config describes, on `device`; `graphed`: whether its calls will be replayed
    from CUDA graphs (the sampler's are by default), which the `auto` backends depend on."""
    m = cfg.model
    norm, attention = resolve_backends(m, device, graphed)
    return UNet(in_channels=1, image_size=cfg.data.image_size, base_channels=m.base_channels,
                channel_mults=tuple(m.channel_mults), time_embed_dim=m.time_embed_dim,
                time_hidden_mult=m.time_hidden_mult, num_heads=m.num_heads,
                attention_resolutions=tuple(m.attention_resolutions),
                norm_backend=norm, attention_backend=attention).to(device)
