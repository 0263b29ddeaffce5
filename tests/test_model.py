import math

import pytest
import torch

from ddpm import config, model


def test_seed_config_has_the_seed_parameter_count():
    cfg = config.load("configs/mnist.yaml")
    assert sum(p.numel() for p in model.build(cfg).parameters()) == 3_610_179


def test_seed_structure():
    net = model.build(config.load("configs/mnist.yaml"))
    assert [type(m).__name__ for m in (net.mid_attn, *net.encoder_attn, *net.decoder_attn)] == \
        ["SelfAttention", "Identity", "Identity", "Identity", "Identity"]
    assert [(b.conv1.in_channels, b.conv2.out_channels) for b in net.encoder] == [(1, 64), (64, 128)]
    assert [(b.conv1.in_channels, b.conv2.out_channels) for b in net.decoder] == [(256, 64), (128, 64)]
    assert net.encoder[0].norm1.num_groups == 1 and net.mid1.norm2.num_groups == 8
    assert [(d.kernel_size, d.stride) for d in net.down] == [((4, 4), (2, 2))] * 2
    # a checkpoint holds the parameters alone: the embedding's frequencies are made, not loaded
    assert set(net.state_dict()) == {name for name, _ in net.named_parameters()}


@pytest.mark.parametrize("overrides, image_size", [
    ([], 32),
    (["model.channel_mults=[1,2,2,2]", "model.attention_resolutions=[16,4]", "model.num_heads=4"], 32),
    # attention after every decoder level (each its own width)
    (["model.channel_mults=[1,2,2,2]", "model.attention_resolutions=[32,16,8]"], 32),
    (["model.base_channels=16", "model.time_embed_dim=32", "data.image_size=28", "model.attention_resolutions=[7]"], 28),
])
def test_output_shape_matches_input(overrides, image_size):
    cfg = config.load(None, ["model.base_channels=8", "model.time_embed_dim=16", *overrides])
    net = model.build(cfg)
    x = torch.randn(3, 1, image_size, image_size)
    assert net(x, torch.tensor([0, 10, 999])).shape == x.shape


def test_attention_placement_from_config():
    cfg = config.load(None, ["model.base_channels=8", "model.channel_mults=[1,2,2,2]", "model.attention_resolutions=[16,4]"])
    net = model.build(cfg)
    kinds = [type(m).__name__ for m in net.encoder_attn]
    assert kinds == ["Identity", "SelfAttention", "Identity"]  # resolutions 32, 16, 8
    assert type(net.mid_attn).__name__ == "SelfAttention"    # 4x4 bottleneck
    assert [type(m).__name__ for m in net.decoder_attn] == ["Identity", "SelfAttention", "Identity"]


def test_sinusoidal_embedding_is_the_seeds_formula():
    emb = model.SinusoidalTimeEmbedding(256)
    t = torch.tensor([0, 1, 500, 999])
    i = torch.arange(128, dtype=torch.float64)
    angles = t[:, None].double() * torch.exp(-math.log(10000) * i / 128)[None]
    torch.testing.assert_close(emb(t).double(), torch.cat([angles.sin(), angles.cos()], 1), atol=1e-4, rtol=0)


def test_group_count_rule():
    assert [model.num_groups(c) for c in (1, 2, 6, 12, 64, 256)] == [1, 2, 2, 4, 8, 8]


def test_attention_backends_compute_the_same():
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 16, 10)
    from kernels import reference
    for heads in (1, 4):
        torch.testing.assert_close(reference.attention_sdpa(qkv, heads), reference.attention(qkv, heads))


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU tensors needs the interpreter")
@pytest.mark.parametrize("kernels, attention, expected", [
    ("torch", "torch", {"aten.native_group_norm.default", "aten.bmm.default"}),
    ("torch", "sdpa", {"aten.native_group_norm.default", "aten._scaled_dot_product_flash_attention_for_cpu.default"}),
    ("triton", "triton", {"ddpm_kernels.group_norm_silu.default", "ddpm_kernels.attention.default"}),
])
def test_each_backend_runs_its_own_kernels(dispatched_ops, kernels, attention, expected):
    """A backend switch that silently fell back to another would pass every equality test."""
    cfg = config.load("configs/ci.yaml", [f"model.kernels={kernels}", f"model.attention={attention}"])
    net = model.build(cfg)
    with torch.no_grad():
        ops = dispatched_ops(lambda: net(torch.randn(2, 1, 32, 32), torch.tensor([1, 50])))
    others = {"aten.native_group_norm.default", "aten._scaled_dot_product_flash_attention_for_cpu.default",
              "ddpm_kernels.group_norm_silu.default", "ddpm_kernels.attention.default"} - expected
    assert expected <= ops and not others & ops, ops


def seed_unet_forward(net, x, t):
    """The seed's UNet as ../shared/seed/FACTS.md states it, written out with torch.nn.functional
    on net's own parameters: an independent statement of the forward pass to hold model.py to.
    (Where the facts are silent, the skip is concatenated after the upsampled map, as in model.py.)"""
    import torch.nn.functional as F
    p = dict(net.named_parameters())
    conv = lambda h, name, **kw: F.conv2d(h, p[f"{name}.weight"], p[f"{name}.bias"], **kw)  # noqa: E731
    norm = lambda h, name: F.group_norm(h, model.num_groups(h.shape[1]), p[f"{name}.weight"], p[f"{name}.bias"])  # noqa: E731
    linear = lambda h, name: F.linear(h, p[f"{name}.weight"], p[f"{name}.bias"])  # noqa: E731

    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=x.dtype) / 128)
    angles = t.to(x.dtype)[:, None] * freqs[None]
    temb = linear(F.silu(linear(torch.cat([angles.sin(), angles.cos()], 1), "time_embed.1")), "time_embed.3")

    def resblock(h, name):
        a = conv(F.silu(norm(h, f"{name}.norm1")), f"{name}.conv1", padding=1)
        a = a + linear(F.silu(temb), f"{name}.time_proj")[:, :, None, None]
        a = conv(F.silu(norm(a, f"{name}.norm2")), f"{name}.conv2", padding=1)
        return a + (conv(h, f"{name}.skip") if f"{name}.skip.weight" in p else h)

    def attention(h, name):
        b, c, hh, ww = h.shape
        q, k, v = conv(norm(h, f"{name}.norm"), f"{name}.qkv").reshape(b, 3, c, hh * ww).unbind(1)
        weights = (q.transpose(1, 2) @ k * c**-0.5).softmax(-1)  # [b, query, key]
        out = (v @ weights.transpose(1, 2)).reshape(b, c, hh, ww)
        return h + conv(out, f"{name}.proj")

    def up(h, name):
        return F.conv_transpose2d(h, p[f"{name}.weight"], p[f"{name}.bias"], stride=2, padding=1)

    e1 = resblock(x, "encoder.0")                                           # 1 -> 64 @ 32
    e2 = resblock(conv(e1, "down.0", stride=2, padding=1), "encoder.1")     # 64 -> 128 @ 16
    m = resblock(conv(e2, "down.1", stride=2, padding=1), "mid1")           # 128 -> 256 @ 8
    m = resblock(attention(m, "mid_attn"), "mid2")                          # 256 -> 128
    d2 = resblock(torch.cat([up(m, "up.0"), e2], 1), "decoder.0")           # 256 -> 64 @ 16
    d1 = resblock(torch.cat([up(d2, "up.1"), e1], 1), "decoder.1")          # 128 -> 64 @ 32
    return conv(d1, "out")


def test_forward_is_the_seeds_unet():
    torch.manual_seed(0)
    net = model.build(config.load("configs/mnist.yaml")).double()
    x, t = torch.randn(2, 1, 32, 32, dtype=torch.float64), torch.tensor([0, 731])
    with torch.no_grad():
        # model.py keeps the sinusoid's frequencies in float32: ~1e-6 of the output at t = 731
        torch.testing.assert_close(net(x, t), seed_unet_forward(net, x, t), rtol=1e-5, atol=1e-5)


def test_a_row_of_time_biases_stands_for_its_timestep():
    """What a sampler's table gives the UNet (UNet.time_biases of all its timesteps, one [1, C] row
    per block for the whole batch) is what t gives it."""
    torch.manual_seed(0)
    net = model.build(config.load("configs/ci.yaml")).double()
    x, steps = torch.randn(3, 1, 32, 32, dtype=torch.float64), torch.tensor([999, 731, 5, 0])
    with torch.no_grad():
        table = net.time_biases(steps)
        for row, t in enumerate(steps):
            expected = net(x, t.expand(3))
            torch.testing.assert_close(net(x, time_biases=[b[row:row + 1] for b in table]), expected)
            assert not torch.allclose(net(x, time_biases=[b[row - 1:row] if row else b[1:2] for b in table]), expected)
        with pytest.raises(ValueError, match="got 5 time biases for 6 ResBlocks"):
            net(x, time_biases=table[:5])
        with pytest.raises(TypeError, match="needs t or time_biases"):
            net(x)


def test_flop_count_is_the_seeds():
    """FACTS.md: 0.892 GFLOP forward and 2.68 GFLOP forward+backward per image (the benchmarks' FLOP/s use this)."""
    from bench.common import flops_per_image
    flops = flops_per_image(config.load("configs/mnist.yaml"))
    assert flops["forward"] / 1e9 == pytest.approx(0.892, abs=5e-4)
    assert flops["forward_backward"] / 1e9 == pytest.approx(2.68, abs=5e-3)


@pytest.mark.parametrize("dtype, expected", [(torch.float32, "torch"), (torch.float16, "triton"),
                                             (torch.bfloat16, "triton")])
def test_attention_auto_on_ampere_and_later_picks_by_input_dtype(monkeypatch, dtype, expected):
    """model.attention=auto from compute capability 8.0: the Triton op for 16-bit inputs, torch for fp32."""
    calls = []
    monkeypatch.setattr(model.kernels, "attention_core", lambda qkv, heads, backend: (
        calls.append((qkv.dtype, backend)), qkv[:, : qkv.shape[1] // 3])[1])
    attn = model.SelfAttention(8, 1, 4, "torch", model.TRITON_FOR_16BIT).to(dtype)
    attn(torch.randn(2, 8, 4, 4, dtype=dtype))
    assert calls == [(dtype, expected)]


def test_attention_beyond_the_triton_kernels_limits(monkeypatch):
    """auto (TRITON_FOR_16BIT) runs torch's attention where the kernel refuses the shape (more than
    256 tokens, a head dim over 256, or more than 65535 samples x heads); an explicit triton is a
    one-line error when the UNet is built, not a kernel's RuntimeError mid-run."""
    beyond_limits = model.kernels.attention_beyond_limits
    assert beyond_limits(2, 512, 64, 2) is None and beyond_limits(65535, 8, 256, 1) is None
    assert "head dim 512 > 256" in beyond_limits(2, 512, 64, 1)
    assert "sequence length 1024 > 256" in beyond_limits(2, 8, 1024, 1)
    assert "batch x heads 65536 > 65535" in beyond_limits(32768, 8, 64, 2)
    calls = []
    monkeypatch.setattr(model.kernels, "attention_core", lambda qkv, heads, backend: (
        calls.append(backend), qkv[:, : qkv.shape[1] // 3])[1])
    x = torch.randn(2, 8, 32, 32, dtype=torch.bfloat16)
    model.SelfAttention(8, 1, 32, "torch", model.TRITON_FOR_16BIT).to(torch.bfloat16)(x)
    model.SelfAttention(8, 1, 16, "torch", model.TRITON_FOR_16BIT).to(torch.bfloat16)(x[:, :, :16, :16])
    assert calls == ["torch", "triton"]
    wide = model.SelfAttention(512, 2, 8, "torch", model.TRITON_FOR_16BIT)
    assert wide.backend == model.TRITON_FOR_16BIT and wide.max_triton_batch == 32767
    assert model.SelfAttention(512, 1, 8, "torch", model.TRITON_FOR_16BIT).backend == "torch"
    calls.clear()
    monkeypatch.setattr(wide, "max_triton_batch", 1)  # as 65536 samples of 1 head would be
    wide.to(torch.bfloat16)(torch.randn(2, 512, 2, 2, dtype=torch.bfloat16))
    assert calls == ["torch"]
    net = model.UNet(base_channels=8, channel_mults=(1, 2), time_embed_dim=16, attention_resolutions=(32, 16),
                     norm_backend="triton", attention_backend=model.TRITON_FOR_16BIT)  # what train.py's first line says
    assert net.backends == ("triton", "triton-for-16bit (torch in 2 of 3 layers, beyond its limits)")
    for change, reason in (("model.attention_resolutions=[32]", "sequence length 1024 > 256"),
                           ("model.base_channels=128", "head dim 512 > 256")):
        cfg = config.load("configs/mnist.yaml", ["model.attention=triton", change])
        with pytest.raises(config.UserError, match=f"model.attention=triton cannot run the attention .*{reason}"):
            model.build(cfg)
