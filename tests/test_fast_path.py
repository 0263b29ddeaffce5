"""Every fast path computes what the eager fp32 path computes."""
import contextlib

import pytest
import torch

import kernels
from ddpm import config, data, distributed, model
from ddpm.diffusion import Diffusion
from ddpm.train import Trainer

STEPS = 200


@pytest.fixture(scope="module")
def images():
    return data.load_offline_subset().images[:512]


def mean_loss(overrides, images, steps=STEPS):
    trainer = Trainer(config.load("configs/ci.yaml", overrides), "cpu", images)
    losses = torch.stack([trainer.step(i) for i in range(steps)])
    return losses, trainer


@pytest.fixture(scope="module")
def eager(images):
    return mean_loss([], images)


@pytest.mark.parametrize("overrides, rtol", [
    (["train.precision=bf16"], 0.05),
    (["train.precision=fp16"], 0.02),
    (["train.compile=default"], 1e-3),
    (["model.attention=sdpa"], 1e-3),
    (["data.loader=dataloader"], 1e-5),
    (["data.loader=dali"], 1e-3),
])
def test_variant_reaches_the_eager_fp32_loss(overrides, rtol, images, eager):
    if overrides == ["data.loader=dali"]:
        pytest.importorskip("nvidia.dali")
    torch._dynamo.reset()  # an earlier test's compile of the same UNet would otherwise serve this one
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    losses, trainer = mean_loss(overrides, images)
    # the switch reached the step: compiled once, or the loader it names
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    assert compiled == (1 if overrides == ["train.compile=default"] else 0)
    assert type(trainer.loader) is data.LOADERS[trainer.cfg.data.loader]
    eager_losses, _ = eager
    assert eager_losses[-50:].mean() < eager_losses[:10].mean() / 2  # the run learns
    torch.testing.assert_close(losses[-50:].mean(), eager_losses[-50:].mean(), rtol=rtol, atol=0)


def one_step_grads(cfg, net, x, t, noise):
    net.zero_grad()
    loss = Diffusion.from_config(cfg.diffusion).loss(net, x, t, noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


# The Triton ops run in the CPU interpreter here, which conftest.py enables only without CUDA; on a
# GPU machine the op tests (and bench/gpu_check.sh) run them for real.
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU tensors needs the interpreter")

# 16 channels: every GroupNorm has at least 2 channels per group. With one per group the time bias,
# constant over the group, cancels in the normalization and its gradient is rounding noise.
SMALL_UNET = ["model.base_channels=16", "model.time_embed_dim=8"]
FUSED = ["model.kernels=triton", "model.attention=triton"]
TRITON_OPS = {f"ddpm_kernels.{op}.default" for op in
              ("group_norm_silu", "group_norm_silu_backward", "attention", "attention_backward")}


@interpreted
def test_triton_unet_has_the_torch_unets_loss_and_gradients(dispatched_ops):
    cfg = config.load("configs/ci.yaml", SMALL_UNET)
    torch.manual_seed(0)
    reference = model.build(cfg)
    fused = model.build(config.load("configs/ci.yaml", SMALL_UNET + FUSED))
    fused.load_state_dict(reference.state_dict())  # checkpoints are interchangeable
    x, noise = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    t = torch.tensor([3, 77])
    loss_ref, grads_ref = one_step_grads(cfg, reference, x, t, noise)
    result = []
    ops = dispatched_ops(lambda: result.extend(one_step_grads(cfg, fused, x, t, noise)))
    assert TRITON_OPS <= ops, ops & TRITON_OPS  # the fused ops ran, forward and backward
    loss_fused, grads_fused = result
    assert grads_ref["encoder.0.time_proj.weight"].abs().max() > 1e-3  # the time bias matters here
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-5, atol=0)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_fused[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-8, msg=name)


class LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's arguments by name, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(zip(self.kernel.arg_names, args), **kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@interpreted
def test_compiled_triton_unet_is_one_graph_and_matches_eager(monkeypatch):
    from kernels import group_norm_silu
    spies = {name: LaunchSpy(getattr(group_norm_silu, name)) for name in ("_fwd_kernel", "_bwd_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(group_norm_silu, name, spy)
    cfg = config.load("configs/ci.yaml", SMALL_UNET + FUSED)
    torch.manual_seed(0)
    net = model.build(cfg)
    graph_ops = set()

    def inductor_recording_ops(gm, example_inputs):
        graph_ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(net, fullgraph=True, backend=inductor_recording_ops)  # a graph break would raise here
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 60])
    # compiled afresh: inductor's caches do not see a change of an op's layout tag
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        out = compiled(x, t)
        out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    # Inductor runs this graph's convolutions channels-last (always on CPU; in inference graphs on
    # CUDA), and hands the GroupNorm op their outputs as they are: no copy to NCHW and back. (The
    # first GroupNorm's input, the 1-channel image, is both layouts at once.)
    if kernels.FLEXIBLE_LAYOUT:
        layouts = {name: [(launch["CPG"] * launch["G"], launch["CHANNELS_LAST"]) for launch in spy.launches
                          if launch["CPG"] * launch["G"] > 1] for name, spy in spies.items()}
        assert len(layouts["_fwd_kernel"]) == len(layouts["_bwd_kernel"]) > 0, layouts
        assert all(channels_last for launches in layouts.values() for _, channels_last in launches), layouts
    net.zero_grad()
    expected = net(x, t)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for n, p in net.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)
    assert {"ddpm_kernels.group_norm_silu.default", "ddpm_kernels.attention.default"} <= graph_ops, graph_ops


@interpreted
@pytest.mark.parametrize("stack", [
    # compute capability 8.0+ runs bf16; fp16 here, since the interpreter cannot run a bf16 tl.dot
    ["model.kernels=triton", "model.attention=triton", "train.precision=fp16"],
    ["model.kernels=triton", "model.attention=torch", "train.precision=fp16"],  # a T4
], ids=["sm80+", "t4"])
def test_the_cuda_default_stacks_compute_the_eager_fp32_step(images, stack):
    """What `auto` picks on a GPU, short of the GPU: the fused Triton GroupNorm (interpreted), the
    attention of the device class, 16-bit autocast with loss scaling, the UNet compiled as one graph
    (reduce-overhead: without a GPU, no graphs). One training step: the same loss and gradients as
    eager fp32, within 16-bit rounding."""
    def first_step(overrides):
        # batch 4: the interpreter takes ~3 ms per program, 30 s a step at the config's 16
        trainer = Trainer(config.load("configs/ci.yaml", SMALL_UNET + ["train.batch_size=4"] + overrides), "cpu", images)
        loss = trainer.step(0)
        return loss, torch.cat([p.grad.flatten() for p in trainer.net.parameters()])

    loss_ref, grad_ref = first_step([])
    loss, grad = first_step([*stack, "train.compile=reduce-overhead"])
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=0)
    assert (grad - grad_ref).norm() < 0.02 * grad_ref.norm()


@pytest.mark.parametrize("sampler,kernels", [("ddpm", "torch"), ("ddim", "torch"), ("ddim", "triton")])
def test_compiled_sampling_step_matches_the_eager_loop(sampler, kernels):
    """With the Triton GroupNorm too: the compiled step's [1, C] time biases go through it, as on CUDA."""
    from ddpm.sample import FastStep
    cfg = config.load("configs/ci.yaml", [f"sample.sampler={sampler}", "diffusion.timesteps=20", "sample.steps=5",
                                          f"model.kernels={kernels}"])
    torch.manual_seed(0)
    net = model.build(cfg).eval()
    d = Diffusion.from_config(cfg.diffusion)
    plan = d.plan(cfg.sample)
    expected, _ = d.sample(net, (2, 1, 32, 32), plan, True, torch.Generator().manual_seed(1))
    fast = FastStep(net, plan, True, "cpu", precision="fp32", compile="default", cuda_graph="auto")
    out, _ = d.sample(net, (2, 1, 32, 32), plan, True, torch.Generator().manual_seed(1), step=fast)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compile", ["default", "none"])
def test_a_sampling_step_in_parts_computes_what_the_whole_batch_does(compile):
    """sample.streams splits the batch (on CUDA, into parallel branches of the graph; here one part
    after another): every image gets the step it gets in the whole batch, unequal parts and more
    parts than images included, each with its own images' noise (DDIM at eta 1 adds it). Compiled,
    one split into equal parts: each part size is a compile (static shapes, ~12 s on a 2-core CPU)."""
    from ddpm.sample import FastStep
    cfg = config.load("configs/ci.yaml", ["sample.sampler=ddim", "sample.eta=1", "diffusion.timesteps=20",
                                          "sample.steps=3", "sample.streams=2"])
    torch.manual_seed(0)
    net = model.build(cfg).eval()
    plan = Diffusion.from_config(cfg.diffusion).plan(cfg.sample)
    batch, splits = (4, ((2, [2, 2]),)) if compile == "default" else (5, ((2, [3, 2]), (7, [1] * 5)))
    x, noise = torch.randn(batch, 1, 32, 32), torch.randn(batch, 1, 32, 32)
    with torch.no_grad():
        whole = FastStep(net, plan, True, "cpu", precision="fp32", compile=compile, cuda_graph="auto")(1, x, noise)
        for streams, parts in splits:
            step = FastStep(net, plan, True, "cpu", precision="fp32", compile=compile, cuda_graph="auto", streams=streams)
            body, steps_run = step.body, []
            step.body = lambda i, x, noise: steps_run.append(len(x)) or body(i, x, noise)
            torch.testing.assert_close(step(1, x, noise), whole, rtol=1e-5, atol=1e-6)
            assert steps_run == parts
    assert FastStep.from_config(net, plan, cfg.sample, "cpu").streams == 2


def test_the_sampling_step_clips_as_asked():
    """clip_x0 reaches the step: at the first step of an untrained UNet the predicted x0 lies far
    outside [-1, 1], so clipping changes the result."""
    from ddpm.sample import FastStep
    cfg = config.load("configs/ci.yaml", ["sample.sampler=ddim", "diffusion.timesteps=20", "sample.steps=3"])
    torch.manual_seed(0)
    net = model.build(cfg).eval()
    d = Diffusion.from_config(cfg.diffusion)
    plan = d.plan(cfg.sample)
    results = {}
    for clip in (True, False):
        step = FastStep(net, plan, clip, "cpu", precision="fp32", compile="none", cuda_graph="auto")
        results[clip] = d.sample(net, (2, 1, 32, 32), plan, clip, torch.Generator().manual_seed(1), step=step)[0]
        expected, _ = d.sample(net, (2, 1, 32, 32), plan, clip, torch.Generator().manual_seed(1))
        torch.testing.assert_close(results[clip], expected, rtol=1e-5, atol=1e-6)
    assert (results[True] - results[False]).abs().max() > 0.1


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_sampling_step_runs_the_unet_in_its_precision(precision, dtype):
    from ddpm.sample import FastStep
    cfg = config.load("configs/ci.yaml", ["sample.sampler=ddim", "diffusion.timesteps=20", "sample.steps=3"])
    net = model.build(cfg).eval()
    plan = Diffusion.from_config(cfg.diffusion).plan(cfg.sample)
    seen = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    step = FastStep(net, plan, True, "cpu", precision=precision, compile="none", cuda_graph="auto")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = step(0, x, torch.randn_like(x))
    assert seen == [dtype] and out.dtype == torch.float32
    # the compiled step's time-bias table (built at once; the compile waits for the first call)
    tables = set()

    def time_biases(t):
        biases = model.UNet.time_biases(net, t)
        tables.update(b.dtype for b in biases)
        return biases
    net.time_biases = time_biases
    FastStep(net, plan, True, "cpu", precision=precision, compile="default", cuda_graph="auto")
    assert tables == {dtype}


def test_the_sampling_step_never_compiles_with_inductors_cuda_graphs(monkeypatch):
    """max-autotune turns inductor's CUDA graphs on. Without the sampler's own graph each step's
    output, the next step's input, would then be an output of inductor's graph that its next replay
    overwrites, an error at the second step on CUDA (pytorch#152887); so the step compiles without
    them, with or without the sampler's graph."""
    import ddpm.sample
    cfg = config.load("configs/ci.yaml", ["sample.sampler=ddim", "diffusion.timesteps=20", "sample.steps=3"])
    net = model.build(cfg).eval()
    plan = Diffusion.from_config(cfg.diffusion).plan(cfg.sample)
    modes = []
    monkeypatch.setattr(ddpm.sample, "compile_with_frozen_weights", lambda fn, mode, device: modes.append(mode) or fn)
    ddpm.sample.FastStep(net, plan, True, "cpu", precision="fp32", compile="max-autotune", cuda_graph="disabled")
    assert modes == ["max-autotune-no-cudagraphs"]


@pytest.mark.parametrize("compile,computes_time_biases", [("default", False), ("none", True)])
def test_only_the_eager_sampling_step_computes_time_biases(compile, computes_time_biases):
    """The compiled step reads its time biases from the table FastStep computes once; the eager
    baseline runs the time MLP at every step, as the seed did."""
    from ddpm.sample import FastStep
    cfg = config.load("configs/ci.yaml", ["sample.sampler=ddim", "diffusion.timesteps=20", "sample.steps=3"])
    net = model.build(cfg).eval()
    plan = Diffusion.from_config(cfg.diffusion).plan(cfg.sample)
    step = FastStep(net, plan, True, "cpu", precision="fp32", compile=compile, cuda_graph="auto")
    calls = []
    net.time_biases = lambda t: calls.append(t) or model.UNet.time_biases(net, t)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        step(1, x, torch.randn_like(x))
        step(2, x, torch.randn_like(x))
    assert bool(calls) == computes_time_biases


def test_compiled_sampling_step_freezes_its_weights_and_a_new_step_sees_changed_ones():
    """Inductor's freezing folds the weights into the compiled step. A FastStep built after they
    change must see the change (its own dynamo cache: the weights' identity is unchanged)."""
    from ddpm.sample import FastStep
    cfg = config.load("configs/ci.yaml", ["sample.sampler=ddim", "diffusion.timesteps=20", "sample.steps=3"])
    torch.manual_seed(0)
    net = model.build(cfg).eval()
    d = Diffusion.from_config(cfg.diffusion)
    plan = d.plan(cfg.sample)

    def sample(step=None):
        return d.sample(net, (2, 1, 32, 32), plan, True, torch.Generator().manual_seed(1), step=step)[0]

    built_first = FastStep(net, plan, True, "cpu", precision="fp32", compile="default", cuda_graph="auto")
    before = sample(built_first)
    torch.testing.assert_close(before, sample(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    expected = sample()
    assert (expected - before).abs().max() > 0.1  # the change shows in the samples
    assert (sample(built_first) - expected).abs().max() > 0.01  # frozen: the first step kept (some of) the old weights
    built_after = FastStep(net, plan, True, "cpu", precision="fp32", compile="default", cuda_graph="auto")
    torch.testing.assert_close(sample(built_after), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_torchs_averaged_model(warmup):
    """Without warm-up, torch's AveragedModel with its EMA rule; with it, the same rule at each
    update's own decay, min(decay, (1 + k) / (10 + k)) (here 0.1 is the smaller until k = 0)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from ddpm.train import EMA
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    ours, torchs = EMA(net, 0.9, warmup), AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    expected = [p.detach().clone() for p in net.parameters()]
    for k in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(net)
        torchs.update_parameters(net)
        decay = min(0.9, (1 + k) / (10 + k)) if warmup else 0.9
        expected = [p.detach().clone() if k == 0 else decay * e + (1 - decay) * p.detach()
                    for e, p in zip(expected, net.parameters())]
    for a, b, c in zip(ours.module.parameters(), torchs.module.parameters(), expected):
        torch.testing.assert_close(a, c)
        if warmup:
            assert (a - b).abs().max() > 0.1  # the warm-up weighs the last updates more
        else:
            torch.testing.assert_close(a, b)
    assert ours.n_averaged == torchs.n_averaged == 4


def test_ema_warmup_forgets_the_first_weights():
    """The seed config's decay, 0.9999, over 2,000 updates: without warm-up 82% of the average is
    still the first update's weights; with it, under 0.6%. After 200,000 updates both are the plain rule."""
    from ddpm.train import EMA
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    share = {}
    for warmup in (False, True):
        ema = EMA(net, 0.9999, warmup)
        ema.update_parameters(net)  # copies the first weights, 1
        with torch.no_grad():
            net.weight.zero_()  # every later one is 0: the average is the first weights' share
        for _ in range(1999):
            ema.update_parameters(net)
        net.weight.data.fill_(1.0)
        share[warmup] = ema.module.weight.item()
        assert ema.decay_of_update(200_000) == 0.9999
    assert share[False] == pytest.approx(0.9999 ** 1999, rel=1e-3) and share[False] > 0.8
    assert share[True] < 0.006


def test_ema_copies_buffers_instead_of_averaging_them():
    from ddpm.train import EMA
    net = torch.nn.BatchNorm1d(3)
    ema = EMA(net, 0.9)
    for _ in range(2):
        net(torch.randn(8, 3) + 5)  # moves the running statistics
        ema.update_parameters(net)
        assert torch.equal(ema.module.running_mean, net.running_mean)
        assert torch.equal(ema.module.running_var, net.running_var)


def test_sampling_step_never_reads_the_device_from_the_host(dispatched_ops):
    """No .item() in the step (it would break CUDA-graph capture and sync every step)."""
    from ddpm.sample import FastStep
    cfg = config.load("configs/ci.yaml", ["sample.sampler=ddim", "sample.steps=3"])
    net = model.build(cfg).eval()
    plan = Diffusion.from_config(cfg.diffusion).plan(cfg.sample)
    step = FastStep(net, plan, True, "cpu", precision="fp32", compile="none", cuda_graph="disabled")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ops = dispatched_ops(lambda: step(1, x, torch.randn_like(x)))
    assert "aten.add.Tensor" in ops  # the recorder saw the step
    assert "aten._local_scalar_dense.default" not in ops


def sixty_four_digits():
    """Random uint8 28x28 images: 4 steps an epoch at the CI config's batch of 16."""
    return torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and host syncs are CUDA matters")


@contextlib.contextmanager
def no_host_sync():
    """Any host synchronisation (.item(), a blocking copy, a stream sync) raises inside this block."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# What `auto` gives a T4 (fp16 with loss scaling, the fused GroupNorm, torch's attention), forced on
# whichever GPU runs the tests: the lent Hopper's own `auto` is bf16 with Triton attention.
T4_STACK = ["train.precision=fp16", "model.kernels=triton", "model.attention=torch"]
T4_BACKENDS = T4_STACK[1:]


@on_cuda
@pytest.mark.parametrize("overrides", [["train.precision=fp16", "train.grad_clip=1.0"], ["train.precision=auto"],
                                       ["train.precision=auto", "train.compile=auto"],
                                       [*T4_STACK, "train.compile=reduce-overhead"]],
                         ids=["fp16-gradscaler-clip", "auto", "auto-compiled-graphed", "t4-default"])
def test_cuda_training_steps_never_wait_for_the_gpu(overrides):
    """The whole step (resident batch, noise, Triton ops, autocast, loss scaling, fused Adam, EMA)
    queues work and returns: the loop reads the device once per log_every. 64 images: 4 steps an
    epoch, so step 4 draws a new epoch's permutation inside the check."""
    images = sixty_four_digits()
    cfg = config.load("configs/ci.yaml", ["train.device=cuda", "train.compile=none", *FUSED, *overrides])
    trainer = Trainer(cfg, torch.device("cuda"), images)
    assert all(group["fused"] for group in trainer.opt.param_groups)  # unfused, Adam launches kernels per parameter
    # Triton and inductor compile, CUDA graphs warm up and record, the allocator warms up
    losses = [trainer.step(step) for step in range(3)]
    with no_host_sync():
        losses += [trainer.step(step) for step in range(3, 7)]
    assert torch.stack(losses).isfinite().all()


@on_cuda
def test_the_training_loop_reads_the_device_only_when_it_logs(tmp_path, monkeypatch):
    """Around Trainer.step (the test above), train()'s loop keeps the loss window on the device:
    between two logs nothing it does waits for the GPU. Checked from the end of each step (after
    three of warm-up) to the start of the next, except where it logs or saves."""
    from ddpm.train import train
    step, checked = Trainer.step, []

    def step_then_watch(self, i):
        torch.cuda.set_sync_debug_mode("default")
        loss = step(self, i)
        if i >= 3 and (i + 1) % 5 and i + 1 < 12:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            checked.append(i + 1)
        return loss
    monkeypatch.setattr(Trainer, "step", step_then_watch)
    cfg = config.load("configs/ci.yaml", ["train.device=cuda", f"train.out_dir={tmp_path / 'run'}", "train.steps=12",
                                          "train.log_every=5", "train.checkpoint_every=100", "train.compile=none"])
    try:
        train(cfg, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checked == [4, 6, 7, 8, 9, 11]


@on_cuda
def test_the_loop_waits_for_the_queued_steps_before_timing_a_checkpoint(tmp_path, monkeypatch):
    """images/s leaves out checkpoints and grids: the steps' kernels still queued when one begins
    are the window's time, so the loop waits for them first (a CPU clock cannot show this)."""
    import ddpm.train
    saves, synced, synchronize, save = [], [], torch.cuda.synchronize, ddpm.train.save_checkpoint
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(len(saves)) or synchronize(device))
    monkeypatch.setattr(ddpm.train, "save_checkpoint", lambda *args: saves.append(args[1]) or save(*args))
    cfg = config.load("configs/ci.yaml", ["train.device=cuda", f"train.out_dir={tmp_path / 'run'}", "train.steps=4",
                                          "train.log_every=4", "train.checkpoint_every=2", "train.compile=none"])
    ddpm.train.train(cfg, progress=False)
    assert saves == [2, 4] and {0, 1} <= set(synced)  # a wait before each save


def graphed_losses(cfg, images, steps=8, ddp=False):
    """The losses (and the trainer) of `steps` training steps compiled with reduce-overhead, which inductor must have
    run from CUDA graphs: it falls back to plain compiled code where it cannot capture (a CPU
    tensor, a mutated input), counting a skip, and the losses would match all the same."""
    from torch._dynamo.utils import counters
    skips = counters["inductor"]["cudagraph_skips"]
    trainer = Trainer(cfg, torch.device("cuda"), images, ddp=ddp)
    assert isinstance(trainer.forward, torch.nn.parallel.DistributedDataParallel) == ddp
    losses = torch.stack([trainer.step(step) for step in range(steps)])
    assert counters["inductor"]["cudagraph_skips"] == skips, "inductor skipped CUDA graphs"
    return losses, trainer


@on_cuda
@pytest.mark.parametrize("eager_stack,graphed_stack,first_rtol,rtol", [
    (["train.precision=fp32", "model.kernels=torch", "model.attention=torch"], ["train.precision=fp32", *FUSED],
     1e-3, 1e-2),
    (T4_STACK, T4_STACK, 5e-3, 2e-2)], ids=["fp32", "t4-fp16"])
def test_cuda_graphed_training_takes_the_eager_steps(eager_stack, graphed_stack, first_rtol, rtol):
    """reduce-overhead replays forward and backward from CUDA graphs, whose outputs the next replay
    overwrites: 8 graphed steps follow the eager steps' losses (stale or overwritten buffers would
    not). The first step has the same weights and batch: only summation order differs. fp16: a T4's
    stack, whose loss scale starts at 2**16, so that early steps may overflow and be skipped: both
    runs must skip the same ones, ending with the same scale."""
    images = sixty_four_digits()

    def cfg(overrides):
        return config.load("configs/ci.yaml", ["train.device=cuda", *overrides])

    trainer = Trainer(cfg(["train.compile=none", *eager_stack]), torch.device("cuda"), images)
    eager = torch.stack([trainer.step(step) for step in range(8)])
    graphed, graphed_trainer = graphed_losses(cfg(["train.compile=reduce-overhead", *graphed_stack]), images)
    torch.testing.assert_close(graphed[0], eager[0], rtol=first_rtol, atol=0)
    torch.testing.assert_close(graphed, eager, rtol=rtol, atol=0)
    assert graphed_trainer.scaler.get_scale() == trainer.scaler.get_scale()


@on_cuda
@pytest.mark.parametrize("stack,first_rtol", [(["train.precision=fp32", "train.compile=reduce-overhead", *FUSED], 1e-3),
                                              ([*T4_STACK, "train.compile=default"], 5e-3)],
                         ids=["fp32-graphed", "t4-ddp-default"])
def test_ddp_around_the_cuda_graphed_unet_takes_its_steps(stack, first_rtol):
    """DDP (its hooks, buckets and all-reduce over NCCL, in a process group of one) around the compiled
    UNet: reduce-overhead, as NPROC=2 with train.compile=reduce-overhead would run it, and what `auto`
    gives 2xT4 (compiled without graphs, fp16 with loss scaling). 8 steps follow the same steps
    without DDP. One GPU shows that they compose, not what the all-reduce between two costs."""
    images = sixty_four_digits()

    cfg = config.load("configs/ci.yaml", ["train.device=cuda", *stack])
    alone, _ = graphed_losses(cfg, images)
    with distributed.solo_group(torch.device("cuda")):
        wrapped, _ = graphed_losses(cfg, images, ddp=True)
    torch.testing.assert_close(wrapped[0], alone[0], rtol=first_rtol, atol=0)
    torch.testing.assert_close(wrapped, alone, rtol=1e-2, atol=0)


@on_cuda
@pytest.mark.parametrize("sampler,compile,streams,precision,backends", [
    ("ddpm", "none", 1, "fp32", []), ("ddim", "default", 1, "fp32", []), ("ddim", "default", 3, "fp32", []),
    ("ddim", "default", 1, "auto", []), ("ddim", "default", 3, "auto", []),
    # a T4's stack; compile=none records autocast's weight casts inside the graph
    pytest.param("ddim", "default", 1, "fp16", T4_BACKENDS, id="t4-ddim-default"),
    pytest.param("ddpm", "none", 1, "fp16", T4_BACKENDS, id="t4-ddpm-none")])
def test_cuda_graph_sampling_matches_the_eager_loop_without_host_syncs(sampler, compile, streams, precision,
                                                                       backends):
    """streams=3: the batch of 4 as parts of 2, 1 and 1 images, parallel branches of the graph.
    precision=auto: the default (bf16, or fp16 on a T4, with the Triton ops the card gets), and fp16,
    against the eager loop in the same precision, within 16-bit rounding over 5 steps (a stale or
    overwritten buffer would be off by the images' scale)."""
    from ddpm.sample import FastStep
    device = torch.device("cuda")
    cfg = config.load("configs/ci.yaml", [f"sample.sampler={sampler}", "diffusion.timesteps=20", "sample.steps=5",
                                          *backends])
    torch.manual_seed(0)
    net = model.build(cfg, device).eval()
    d = Diffusion.from_config(cfg.diffusion, device)
    plan = d.plan(cfg.sample)
    shape = (4, 1, 32, 32)
    # fp32: Diffusion's own loop (no FastStep); 16 bits: FastStep's eager step in that precision
    eager = None if precision == "fp32" else FastStep(net, plan, True, device, precision=precision, compile="none",
                                                      cuda_graph="disabled")
    expected, _ = d.sample(net, shape, plan, True, torch.Generator(device).manual_seed(1), step=eager)
    step = FastStep(net, plan, True, device, precision=precision, compile=compile, cuda_graph="enabled", streams=streams)
    d.sample(net, shape, plan, True, torch.Generator(device).manual_seed(2), step=step)  # compiles, captures
    with no_host_sync():
        out, _ = d.sample(net, shape, plan, True, torch.Generator(device).manual_seed(1), step=step)
    assert step.graph is not None
    if precision == "fp32":
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(out, expected, rtol=0, atol=0.05)
        assert (out - expected).abs().mean() < 0.01
