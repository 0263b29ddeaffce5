"""The Triton GroupNorm(+time bias)+SiLU op against the float64 reference, forward and backward."""
import pytest
import torch

from ddpm.runtime import has_bf16
from kernels import reference
from kernels.group_norm_silu import _launch_config, group_norm_silu

# Largest error allowed, relative to the largest reference magnitude of the same tensor: the
# inputs are rounded to the dtype first and the reference sees those same values, so what is
# left is the fp32 arithmetic plus one rounding of each output to its dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (shape, groups, with time bias, with SiLU). Groups held whole in registers (elements padded to
# powers of two, up to _MAX_ONE_TILE_FWD/BWD): H*W of 1, 49, 64 and 1024; 3 channels per group (not
# a power of two); 8 channels per group at H*W 1024 (the largest group the forward holds, at 16
# warps; the backward walks it in tiles). Groups walked in tiles: 4 x 2304 positions (several H*W
# tiles per channel, the last one partial), and 24 channels per group at 30x30 (several channel
# tiles, positions masked in each), with and without time bias and SiLU.
SHAPES = [
    ((2, 24, 7, 7), 8, True, True),
    ((2, 32, 1, 1), 8, True, True),
    ((2, 16, 8, 8), 8, False, False),
    ((2, 1, 32, 32), 1, True, True),
    ((1, 4, 48, 48), 1, True, False),
    ((1, 16, 32, 32), 2, False, True),
    ((2, 48, 30, 30), 2, True, True),
    ((2, 48, 30, 30), 2, False, True),
    ((2, 48, 30, 30), 2, True, False),
]


def _dtypes(device):
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if device.type == "cuda" and not has_bf16(device):
        dtypes.remove(torch.bfloat16)  # T4 (sm 7.5): no bf16
    return dtypes


def _inputs(shape, has_t, device, dtype, param_dtype=None, offset=0.0, seed=0, t_rows=None):
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    param_dtype = param_dtype or dtype

    def make(size, dt, scale=1.0, shift=0.0):
        return (torch.randn(size, generator=gen) * scale + shift).to(device, dt).requires_grad_()

    x = make(shape, dtype, shift=offset)
    weight = make((c,), param_dtype, scale=0.5, shift=1.0)
    bias = make((c,), param_dtype, scale=0.5)
    t = make((t_rows or n, c), dtype) if has_t else None
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    return x, weight, bias, t, dy


def _run(fn, x, weight, bias, t, dy, groups, activation, eps=1e-5):
    y = fn(x, weight, bias, groups, eps, t, activation)
    leaves = [x, weight, bias] + ([t] if t is not None else [])
    return [y] + list(torch.autograd.grad(y, leaves, dy))


def _reference(x, weight, bias, t, dy, groups, activation, eps):
    as64 = [v.detach().double().requires_grad_() if v is not None else None for v in (x, weight, bias, t)]
    return _run(reference.group_norm_silu, *as64, dy.double(), groups, activation, eps)


def _assert_close(got, want, tol, names, sum_tol):
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        err = (g.double() - w).abs().max().item()
        scale = w.abs().max().item()
        allowed = tol * max(scale, 1e-3)
        if name == "dt":
            # dt sums dx over H*W (and over the batch, for a shared time bias) in fp32, and is exactly 0
            # for one channel per group: beside its own dtype's rounding, the sum's rounding, which goes
            # with the summed magnitudes (sum_tol: fp32's)
            summed = want[1].abs().sum((2, 3))
            if g.shape[0] == 1 < summed.shape[0]:
                summed = summed.sum(0, keepdim=True)
            allowed += sum_tol * summed.max().item()
        assert err <= allowed, f"{name}: max error {err:.3g} vs magnitude {scale:.3g} (allowed {allowed:.3g})"


def _check(shape, groups, has_t, activation, device, dtype, param_dtype=None, offset=0.0, tol=None,
           memory_format=torch.contiguous_format, dy_format=None, t_rows=None, eps=1e-5):
    x, weight, bias, t, dy = _inputs(shape, has_t, device, dtype, param_dtype, offset, t_rows=t_rows)
    x = x.detach().contiguous(memory_format=memory_format).requires_grad_()
    dy = dy.contiguous(memory_format=dy_format or memory_format)
    got = _run(group_norm_silu, x, weight, bias, t, dy, groups, activation, eps)
    # the output and dx keep the input's layout: inductor plans the next op's reads on it
    assert got[0].stride() == got[1].stride() == x.stride()
    want = _reference(x, weight, bias, t, dy, groups, activation, eps)
    assert got[0].dtype == dtype
    for g, leaf in zip(got[1:], (x, weight, bias, t)):
        assert g.dtype == leaf.dtype
    names = ["y", "dx", "dweight", "dbias", "dt"]
    tol = tol or TOLERANCE[dtype]
    _assert_close(got, want, tol, names, sum_tol=tol if dtype == torch.float32 else TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,groups,has_t,activation", SHAPES, ids=lambda v: str(v))
def test_matches_reference(shape, groups, has_t, activation, dtype, device):
    if dtype not in _dtypes(device):
        pytest.skip("this GPU has no bf16")
    _check(shape, groups, has_t, activation, device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,groups,has_t,activation", SHAPES[:3] + SHAPES[5:], ids=lambda v: str(v))
def test_channels_last_runs_as_it_comes(shape, groups, has_t, activation, dtype, device):
    """The layout inductor gives convolutions in inference graphs: read and written in place, no copies."""
    _check(shape, groups, has_t, activation, device, dtype, memory_format=torch.channels_last)


def test_a_gradient_in_the_other_layout(device):
    """dy need not come in x's layout (the op is flexible_layout): the backward brings it to x's."""
    _check((2, 16, 4, 4), 8, True, True, device, torch.float32, memory_format=torch.channels_last,
           dy_format=torch.contiguous_format)
    _check((2, 16, 4, 4), 8, True, True, device, torch.float32, dy_format=torch.channels_last)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,groups", [((3, 16, 8, 8), 8), ((3, 48, 30, 30), 2)], ids=["one tile", "tiles"])
def test_one_time_bias_for_the_whole_batch(shape, groups, dtype, memory_format, device):
    """A [1, C] time bias (a sampling step's: every image at the same t) is read by every sample
    without being expanded, and its gradient sums the samples'."""
    _check(shape, groups, True, True, device, dtype, memory_format=memory_format, t_rows=1)


@pytest.mark.parametrize("has_t", [True, False])
@pytest.mark.parametrize("activation", [True, False])
def test_time_bias_and_activation_switches(has_t, activation, device):
    _check((2, 16, 4, 4), 8, has_t, activation, device, torch.float32)


@pytest.mark.parametrize("shape,groups", [((2, 16, 8, 8), 8), ((2, 48, 30, 30), 2)], ids=["one tile", "tiles"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_activations_fp32_params(dtype, shape, groups, device):
    """Autocast's layout: activations and time bias in half precision, GroupNorm's affine in fp32."""
    if dtype not in _dtypes(device):
        pytest.skip("this GPU has no bf16")
    _check(shape, groups, True, True, device, dtype, param_dtype=torch.float32)


@pytest.mark.parametrize("shape,groups", [((2, 16, 32, 32), 2), ((1, 32, 32, 32), 1)], ids=["one tile", "tiles"])
def test_large_mean_is_stable(shape, groups, device):
    """Mean 10,000x the spread. fp32 holds x + t near 1e4 only to ~6e-4, hence 1e-3; a one-pass
    sum/sum-of-squares variance (1e8 + 1 - 1e8 in fp32), even per tile of the tiled walk, fails it
    (at 1,000x a per-tile one-pass variance still passed)."""
    _check(shape, groups, True, True, device, torch.float32, offset=10000.0, tol=1e-3)


@pytest.mark.parametrize("shape,groups", [((2, 24, 7, 7), 8), ((1, 4, 48, 48), 1), ((2, 48, 30, 30), 2)],
                         ids=["one tile", "tiles over H*W", "tiles over channels"])
def test_eps_is_added_to_the_variance(shape, groups, device):
    """At eps 1e-5 and a variance near 1, eps moves the output by ~5e-6, inside fp32's tolerance:
    0.5 tells 1/sqrt(var + eps) from any other place for it, on both paths, forward and backward."""
    _check(shape, groups, True, True, device, torch.float32, eps=0.5)


def test_shapes_take_both_paths():
    """SHAPES holds groups of both kinds, forward and backward: whole in registers, and walked in tiles."""
    def one_tile(backward):
        return [_launch_config(shape[1] // groups, shape[2] * shape[3], False, backward)["ONE_TILE"]
                for shape, groups, *_ in SHAPES]
    assert one_tile(backward=False) == [True, True, True, True, False, True, False, False, False]
    assert one_tile(backward=True) == [True, True, True, True, False, False, False, False, False]


def test_backward_is_deterministic(device):
    if device.type != "cuda":
        pytest.skip("the interpreter runs programs one after another: only a GPU can reorder them")
    x, weight, bias, t, dy = _inputs((4, 16, 8, 8), True, device, torch.float32)
    first = _run(group_norm_silu, x, weight, bias, t, dy, 8, True)
    second = _run(group_norm_silu, x, weight, bias, t, dy, 8, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_rejects_bad_shapes(device):
    x, weight, bias, t, _ = _inputs((2, 8, 3, 3), True, device, torch.float32)
    with pytest.raises(RuntimeError, match="groups"):
        group_norm_silu(x, weight, bias, 3, 1e-5, t)
    with pytest.raises(RuntimeError, match="one value per channel"):
        group_norm_silu(x, weight[:4], bias, 2, 1e-5, t)
    with pytest.raises(RuntimeError, match="time bias"):
        group_norm_silu(x, weight, bias, 2, 1e-5, t[:, :, None, None])


def test_opcheck(device):
    x, weight, bias, t, dy = _inputs((2, 8, 3, 3), True, device, torch.float32)
    op = torch.ops.ddpm_kernels.group_norm_silu.default
    torch.library.opcheck(op, (x, weight, bias, t, 2, 1e-5, True))
    torch.library.opcheck(op, (x, weight, bias, None, 2, 1e-5, False))
    torch.library.opcheck(op, (x, weight, bias, t[:1].detach().requires_grad_(), 2, 1e-5, True))  # one for the batch
    y, mean, rstd = op(x, weight, bias, t, 2, 1e-5, True)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.ddpm_kernels.group_norm_silu_backward.default,
                              (dy, x, weight, bias, t[:1], mean, rstd, True))
    with torch.no_grad():
        torch.library.opcheck(torch.ops.ddpm_kernels.group_norm_silu_backward.default,
                              (dy, x, weight, bias, t, mean, rstd, True))
    # channels-last: the fake implementation must give the real output's strides
    x_cl, dy_cl = (v.detach().contiguous(memory_format=torch.channels_last) for v in (x, dy))
    torch.library.opcheck(op, (x_cl.requires_grad_(), weight, bias, t, 2, 1e-5, True))
    with torch.no_grad():
        torch.library.opcheck(torch.ops.ddpm_kernels.group_norm_silu_backward.default,
                              (dy_cl, x_cl, weight, bias, t, mean, rstd, True))


class _TinyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.time = torch.nn.Linear(4, 8)
        self.norm = torch.nn.GroupNorm(2, 8)

    def forward(self, x, emb):
        h = self.conv(x)
        h = group_norm_silu(h, self.norm.weight, self.norm.bias, 2, self.norm.eps, self.time(emb), True)
        return group_norm_silu(h, self.norm.weight, self.norm.bias, 2, self.norm.eps, None, False)


def test_torch_compile_fullgraph(device):
    torch.manual_seed(0)
    block = _TinyBlock().to(device)
    x = torch.randn(2, 1, 6, 6, device=device)
    emb = torch.randn(2, 4, device=device)

    def step(fn):
        block.zero_grad()
        out = fn(x, emb)
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in block.parameters()]

    eager = step(block)
    compiled = step(torch.compile(block, fullgraph=True))
    for a, b in zip(eager, compiled):
        # Same Triton kernels in both; inductor only reorders the conv/linear/loss arithmetic.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
