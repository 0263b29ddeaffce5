"""The Triton attention op (kernels/attention.py) against reference.attention in float64.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), about
3 ms per program instance, so the shapes stay small.
"""
import pytest
import torch
from torch import nn

import kernels
from ddpm.runtime import has_bf16
from kernels import reference
from kernels.attention import attention

# (batch, heads, head_dim, seq): seq 1 and 7 and 100 exercise the masks (100 -> 128-wide tiles,
# 32-row blocks), 256 the longest sequence (256-wide tiles, 16-row blocks), d = 256 the d-chunk
# loops, heads 4 and 8 the per-head channel offsets.
SHAPES = [
    (2, 1, 16, 1),
    (2, 2, 16, 7),
    (1, 1, 256, 64),
    (1, 4, 64, 16),
    (1, 8, 16, 100),
    (1, 1, 16, 256),
]

# Forward and input-gradient tolerances against float64 (values and gradients are O(1)).
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=5e-2),
}


def _dtypes():
    bf16_skip = []
    if not torch.cuda.is_available():
        bf16_skip = [pytest.mark.skip(reason="bf16 tl.dot gives wrong results in the Triton interpreter")]
    elif not has_bf16(torch.device("cuda")):
        bf16_skip = [pytest.mark.skip(reason="this GPU has no bf16")]
    return [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
            pytest.param(torch.bfloat16, id="bf16", marks=bf16_skip)]


def _qkv(batch, heads, head_dim, seq, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3 * heads * head_dim, seq, generator=gen).to(device=device, dtype=dtype)


def _reference_grad(qkv, heads, dout):
    q64 = qkv.detach().double().requires_grad_()
    out = reference.attention(q64, heads)
    out.backward(dout.double())
    return out, q64.grad


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}h{}d{}N{}".format(*s))
def test_forward_backward_match_float64_reference(shape, dtype, device):
    batch, heads, head_dim, seq = shape
    qkv = _qkv(*shape, dtype, device).requires_grad_()
    out = attention(qkv, heads)
    assert out.shape == (batch, heads * head_dim, seq) and out.dtype == dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    out.backward(dout)
    ref_out, ref_grad = _reference_grad(qkv, heads, dout)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref_out, **tol)
    assert qkv.grad.shape == qkv.shape and qkv.grad.dtype == dtype
    torch.testing.assert_close(qkv.grad.double(), ref_grad, **tol)


@pytest.mark.parametrize("shape", [(2, 2, 16, 7), (1, 1, 256, 64)], ids=["N7", "d256"])
def test_lse_is_logsumexp_of_scaled_scores(shape, device):
    batch, heads, head_dim, seq = shape
    qkv = _qkv(*shape, torch.float32, device)
    _, lse = torch.ops.ddpm_kernels.attention(qkv, heads)
    q, k, _ = qkv.double().view(batch, 3, heads, head_dim, seq).unbind(1)
    scores = torch.einsum("bhdi,bhdj->bhij", q, k) * head_dim**-0.5
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, seq)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels-last"])
def test_reads_conv_view_and_answers_in_its_layout(memory_format, device):
    """qkv as the model makes it, a 1x1 convolution's output viewed as [B, 3C, N]: read in place, and
    the output and dqkv in its layout (channels-last: channels innermost), so a channels-last graph
    needs no copies around the op."""
    batch, channels, heads, side = 2, 32, 2, 4
    conv_out = torch.randn(batch, 3 * channels, side, side, device=device).contiguous(memory_format=memory_format)
    qkv = conv_out.view(batch, 3 * channels, side * side).requires_grad_()  # shares conv_out's storage
    assert qkv.data_ptr() == conv_out.data_ptr()
    out = attention(qkv, heads)
    assert out.shape == (batch, channels, side * side)
    assert out.view(batch, channels, side, side).is_contiguous(memory_format=memory_format)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    out.backward(dout)
    assert qkv.grad.stride() == qkv.stride()
    ref_out, ref_grad = _reference_grad(qkv, heads, dout)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(qkv.grad.double(), ref_grad, atol=2e-5, rtol=1e-4)


def test_strided_input_and_expanded_grad(device):
    """Token-major storage (stride 1 along channels) and out.sum()'s stride-0 gradient."""
    batch, heads, head_dim, seq = 2, 2, 16, 7
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, device=device).transpose(1, 2).requires_grad_()
    assert not qkv.is_contiguous()
    out = attention(qkv, heads)
    out.sum().backward()
    ref_out, ref_grad = _reference_grad(qkv, heads, torch.ones_like(out))
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(qkv.grad.double(), ref_grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("card,major,sms,dtype,head_dim,expected", [
    # T4: FMA dots on 16-wide d chunks (no spills), no cp.async pipelining
    ("T4", 7, 40, torch.float16, 256, dict(BLOCK_R=64, BLOCK_C=64, BLOCK_D=16, num_warps=8, num_stages=1)),
    # H100, 16-bit: tensor cores on 64-wide d chunks, 32-row blocks halved to cover 132 SMs
    ("H100", 9, 132, torch.float16, 256, dict(BLOCK_R=16, BLOCK_C=64, BLOCK_D=64, num_warps=4, num_stages=2)),
    # a head narrower than 64: its own width
    ("H100", 9, 132, torch.float16, 16, dict(BLOCK_R=16, BLOCK_C=64, BLOCK_D=16, num_warps=4, num_stages=2)),
    # fp32 runs on FMA units on every card
    ("H100", 9, 132, torch.float32, 256, dict(BLOCK_R=16, BLOCK_C=64, BLOCK_D=16, num_warps=4, num_stages=2)),
    # A100: 64-row blocks halved once, which covers its 108 SMs
    ("A100", 8, 108, torch.bfloat16, 256, dict(BLOCK_R=32, BLOCK_C=64, BLOCK_D=64, num_warps=4, num_stages=2)),
], ids=lambda v: v if isinstance(v, str) else None)
def test_launch_config_on_each_card(card, major, sms, dtype, head_dim, expected, monkeypatch):
    """The seed UNet's attention (batch 64, one head, 8x8 positions) on the cards the CPU tests
    cannot run: tests/test_kernels_compile_for_gpus.py compiles the T4 and H100 choices."""
    from types import SimpleNamespace

    from kernels.attention import _launch_config
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(major=major, multi_processor_count=sms))
    assert _launch_config(64, 64, head_dim, dtype, torch.device("cuda")) == expected


@pytest.mark.parametrize("before_3_3,block_d", [(True, 32), (False, 64)])
def test_ampere_full_tiles_narrow_the_d_chunk_under_triton_3_2(before_3_3, block_d, monkeypatch):
    """Batch 512 keeps an A100's 64x64 tiles at 8 warps, where triton 3.2's dK/dV backward spilled
    88 bytes with a 64-wide d chunk (tests/test_kernels_compile_for_gpus.py, run with triton 3.2)."""
    from types import SimpleNamespace

    from kernels import attention
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(major=8, multi_processor_count=108))
    monkeypatch.setattr(attention, "_TRITON_BEFORE_3_3", before_3_3)
    assert attention._launch_config(512, 64, 256, torch.bfloat16, torch.device("cuda")) == dict(
        BLOCK_R=64, BLOCK_C=64, BLOCK_D=block_d, num_warps=8, num_stages=2)


def test_backward_is_deterministic(device):
    if device.type != "cuda":
        pytest.skip("the interpreter runs programs one after another: only a GPU can reorder them")
    qkv = _qkv(1, 2, 16, 7, torch.float16, device).requires_grad_()
    dout = torch.randn(1, 32, 7, device=device, dtype=torch.float16)
    grads = [torch.autograd.grad(attention(qkv, 2), qkv, dout)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_rejects_bad_shapes(device):
    with pytest.raises(RuntimeError, match="heads"):
        attention(torch.randn(1, 3 * 10, 4, device=device), 4)
    with pytest.raises(RuntimeError, match="sequence length"):
        attention(torch.randn(1, 3 * 16, 257, device=device), 1)
    with pytest.raises(RuntimeError, match="head dim"):
        attention(torch.randn(1, 3 * 512, 4, device=device), 1)
    with pytest.raises(RuntimeError, match="batch x heads 65536 > 65535"):  # a launch error on CUDA
        attention(torch.zeros(32768, 3 * 16, 1, device=device), 2)


@pytest.mark.parametrize("channels_innermost", [False, True], ids=["contiguous", "channels-innermost"])
def test_opcheck(channels_innermost, device):
    """Includes that the fake implementations give the real outputs' strides in both layouts."""
    qkv = _qkv(1, 2, 16, 7, torch.float32, device)
    if channels_innermost:
        qkv = qkv.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.ddpm_kernels.attention.default, (qkv.requires_grad_(), 2))
    out, lse = torch.ops.ddpm_kernels.attention(qkv.detach(), 2)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.ddpm_kernels.attention_backward.default, (dout, qkv.detach(), out, lse, 2))


class _TinyAttentionBlock(nn.Module):
    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        out = attention(self.qkv(x).view(b, 3 * c, h * w), self.heads)
        return x + self.proj(out.view(b, c, h, w))


def test_torch_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = _TinyAttentionBlock(channels=32, heads=2).to(device)
    x = torch.randn(2, 32, 3, 3, device=device, requires_grad=True)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True)(x)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_compiled_inference_passes_channels_last_qkv_without_copies(monkeypatch, device):
    """Inductor runs an inference graph's convolutions channels-last (on CUDA: the sampling step;
    on CPU: every graph). The op is flexible_layout, so it gets the qkv convolution's output as it
    is (channel stride 1) and its output goes to the projection as it is: no copies around it.
    (Training graphs keep their saved activations' traced strides, so there qkv is copied.)"""
    from kernels import attention as attention_module
    if not kernels.FLEXIBLE_LAYOUT:
        pytest.skip("this torch's custom_op takes no tags: inductor copies qkv to the traced layout")
    launches = []
    kernel = attention_module._fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(dict(zip(kernel.arg_names, args)))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(attention_module, "_fwd_kernel", Spy())
    torch.manual_seed(0)
    model = _TinyAttentionBlock(channels=32, heads=2).to(device)
    x = torch.randn(2, 32, 3, 3, device=device)
    with torch.no_grad():
        eager = model(x)
        launches.clear()
        # compiled afresh: inductor's caches do not see a change of an op's layout tag
        with torch._inductor.config.patch(fx_graph_cache=False):
            compiled = torch.compile(model, fullgraph=True)(x)
    channels_last = x.device.type == "cpu"  # on CUDA inductor's heuristic decides; on CPU always
    if channels_last:
        assert [launch["s_c"] for launch in launches] == [1], launches
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
