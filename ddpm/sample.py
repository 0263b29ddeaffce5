"""Sampling from a checkpoint and the pictures a run shows: the grid, the denoising GIF, the
forward-diffusion figure."""
import functools
import sys
import types
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from ddpm import checkpoint, model as model_lib
from ddpm.cli import check_writable, leaves_no_new_dirs
from ddpm.config import UserError
from ddpm.diffusion import Diffusion, SamplerPlan
from ddpm.runtime import compile_model, precision_dtype, resolve_compile


def load_model(ckpt_path, device, use_ema: bool = True, cuda_graph: str | None = None):
    """The model (EMA weights by default) and the config stored in a checkpoint. cuda_graph: the
    sampling run's sample.cuda_graph where it overrides the checkpoint's; the `auto` backends
    depend on whether the step is replayed from a graph."""
    state = checkpoint.load(ckpt_path)
    cfg = checkpoint.config_of(state, ckpt_path)
    if not model_lib.triton_runs_on(device):  # a run trained with the Triton ops, sampled on a CPU
        asked = [key for key in ("kernels", "attention") if getattr(cfg.model, key) == "triton"]
        for key in asked:
            setattr(cfg.model, key, "auto")  # how it runs, not what it computes
        if asked:
            print(f"note: {ckpt_path} was trained with {', '.join(f'model.{k}=triton' for k in asked)}, which "
                  f"needs a CUDA GPU; on {torch.device(device).type} its PyTorch equivalent runs", file=sys.stderr)
    net = model_lib.build(cfg, device, graphed=(cuda_graph or cfg.sample.cuda_graph) != "disabled")
    checkpoint.load_weights(net, state["ema" if use_ema else "model"], ckpt_path)
    return net.eval(), cfg, state["step"]


def uses_cuda_graph(setting: str, device: torch.device) -> bool:
    """sample.cuda_graph resolved: auto = on CUDA; enabled without a CUDA device is a user error."""
    if setting == "enabled" and device.type != "cuda":
        raise UserError("sample.cuda_graph=enabled needs a CUDA device; use auto or disabled on this machine")
    return setting == "enabled" or (setting == "auto" and device.type == "cuda")


def step_compile_mode(compile: str) -> str:
    """The torch.compile mode the step runs in, never with inductor's own CUDA graphs: inside ours
    they would nest, and without ours each step's output, the next step's input, would be an output
    of inductor's graph that its next replay overwrites, an error (pytorch#152887)."""
    return "max-autotune-no-cudagraphs" if compile == "max-autotune" else compile


FROZEN_STEP_OPTIONS = {"freezing": True, "always_keep_tensor_constants": True}


def compile_with_frozen_weights(fn, mode: str, device):
    """compile_model(fn), traced and compiled under inductor's freezing: in a compile without grad,
    the weights fn reads become constants of its graph, so their casts to the autocast dtype happen
    once instead of at every step (the 1000-step DDPM step on an H200: 0.62 -> 0.55 ms,
    bench/results/nvidia-h200/conv-options.md).
    - The switch must be on while dynamo traces, not only in inductor (torch.compile's options reach
      inductor alone); so it wraps every call. Without a CUDA graph that costs ~20 us a step.
    - Dynamo matches the frozen weights by identity, not value, and keeps its graphs per code object:
      fn gets a code object of its own, so a later compile_with_frozen_weights (a new FastStep) on
      the same module with weights changed in place compiles afresh instead of reusing old constants.
    - The compiled function itself, after its weights change in place, gives undefined results
      (some weights frozen, some read live): build a new one.
    - Each compile's constants stay in inductor's module cache for the life of the process (tens
      of MB for the seed UNet), and on a CPU (weights prepacked for oneDNN) inductor's disk cache
      is bypassed, so each FastStep compiles from scratch there.
    - Frozen weights stay tensors (FROZEN_STEP_OPTIONS): inlined as constants, the tiny ones (the
      1-channel GroupNorm's weight and bias, the output convolution's bias) are rebuilt by kernels
      at every step."""
    fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    compiled = compile_model(fn, mode, device)
    if compiled is fn:
        return fn
    from torch._inductor import config as inductor_config  # here: eager sampling never loads inductor

    def run(*args):
        with inductor_config.patch(FROZEN_STEP_OPTIONS):
            return compiled(*args)
    return run


class FastStep:
    """The denoising step as one compiled region (the UNet under autocast, then the whole update
    fused by inductor) and, on CUDA, captured once in a CUDA graph and replayed for every step.
    The step index is a device tensor, so one graph serves all steps of a plan (DDPM or DDIM).
    A compiled step takes the UNet's time biases from a table computed once for the plan's
    timesteps (UNet.time_biases: the time MLP and every block's projection leave the step), and
    freezes the weights it was compiled with (compile_with_frozen_weights): build a new FastStep
    after changing them (time_table=False: the time MLP at every step, to measure what the table
    buys). Uncompiled, it is the eager loop's step, the baseline.
    streams > 1 splits the batch into that many parts (each of at least one image), whose steps the
    graph holds as parallel branches on streams of their own: at a small batch the GPU can overlap
    one part's small kernels, and their ramps and tails, with the other's. Without a graph the
    parts run one after another (the same computation, for the tests)."""

    def __init__(self, net, plan: SamplerPlan, clip_x0: bool, device, precision="auto", compile="auto",
                 cuda_graph="auto", time_table: bool = True, streams: int = 1):
        device = torch.device(device)
        dtype = precision_dtype(precision, device)
        autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)
        self.use_graph = uses_cuda_graph(cuda_graph, device)
        mode = step_compile_mode(compile)
        if resolve_compile(mode, device) == "none" or not time_table:
            def predict(i, x):
                return net(x, plan.timesteps[i].expand(x.shape[0]))
        else:
            with torch.no_grad(), autocast():  # the dtype the step's own linears would give
                biases = net.time_biases(plan.timesteps)  # [steps, C] per block; row i is step i's
            # one table, so that a step gathers its row in one kernel; the blocks' parts are views
            table, widths = torch.cat(biases, dim=1), [b.shape[1] for b in biases]

            def predict(i, x):
                return net(x, time_biases=table[i].split(widths, dim=1))

        def body(i, x, noise):
            with autocast():
                eps = predict(i, x).float()
            return Diffusion.step(plan, i, x, eps, noise, clip_x0)

        self.body = compile_with_frozen_weights(body, mode, device)
        self.streams = streams
        # [S, 1]: indexing with a 1-element tensor is a device gather; a 0-d index would call .item()
        self.indices = torch.arange(len(plan.timesteps), device=device).unsqueeze(1)
        self.graph = None

    @classmethod
    def from_config(cls, net, plan: SamplerPlan, sample_cfg, device, **options):
        """The step that a config's `sample` section describes."""
        s = sample_cfg
        return cls(net, plan, s.clip_x0, device, s.precision, s.compile, s.cuda_graph, streams=s.streams, **options)

    def _parts(self, x, noise):
        """(x, noise) of each part of the batch: views, split along the batch."""
        parts = min(self.streams, len(x))
        return list(zip(x.tensor_split(parts), noise.tensor_split(parts)))

    def _capture(self, x, noise):
        self.static_i, self.static_x, self.static_noise = self.indices[0].clone(), x.clone(), noise.clone()
        parts = self._parts(self.static_x, self.static_noise)
        # drawn together from torch's round-robin pool of 32, so the capture stream and the parts'
        # are distinct (sample.streams <= 16): on a shared stream two parts would run in turn
        capture, *streams = (torch.cuda.Stream() for _ in range(len(parts) + 1))
        for stream, (x_part, noise_part) in zip(streams, parts):  # warm-up (and compilation) off the capture
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.body(self.static_i, x_part.clone(), noise_part)
            torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=capture):
            for stream, (x_part, noise_part) in zip(streams, parts):  # forked from the capture, joined back
                stream.wait_stream(capture)
                with torch.cuda.stream(stream):
                    x_part.copy_(self.body(self.static_i, x_part, noise_part))
            for stream in streams:
                capture.wait_stream(stream)

    def __call__(self, i: int, x, noise):
        if not self.use_graph:
            if self.streams == 1:
                return self.body(self.indices[i], x, noise)
            return torch.cat([self.body(self.indices[i], x_part, noise_part) for x_part, noise_part in self._parts(x, noise)])
        if self.graph is None:
            self._capture(x, noise)
        self.static_i.copy_(self.indices[i])
        self.static_noise.copy_(noise)
        if x is not self.static_x:
            self.static_x.copy_(x)
        self.graph.replay()
        return self.static_x


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def grid_image(x: torch.Tensor) -> Image.Image:
    grid = make_grid(to_unit(x.float().cpu()), nrow=int(len(x) ** 0.5 + 0.5), padding=2, pad_value=1.0)
    return Image.fromarray((grid[0] * 255).round().byte().numpy(), mode="L")


def write_gif(frames: list[torch.Tensor]):
    """A writer (f -> None) of the frames as an animated GIF, 80 ms each, the last one held 1.5 s."""
    images = [grid_image(f) for f in frames]
    durations = [80] * (len(images) - 1) + [1500]
    return lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)


def write_forward_diffusion_figure(diffusion: Diffusion, image: torch.Tensor, columns: int = 11, generator=None):
    """A writer (f -> None) of one image noised to t = 0, T/10, ..., T-1 with one fixed noise draw:
    the forward process, as a PNG row."""
    steps = torch.linspace(0, diffusion.timesteps - 1, columns).round().long().to(diffusion.device)
    x0 = image.to(diffusion.device).expand(columns, *image.shape[-3:])
    noise = torch.randn(image.shape[-3:], generator=generator, device=diffusion.device).expand_as(x0)
    figure = to_unit(diffusion.q_sample(x0, steps, noise)).cpu()
    return lambda f: save_image(figure, f, format="png", nrow=columns, padding=2, pad_value=1.0)


MAX_GRID_IMAGES = 1024  # one picture (and its GIF) of 32x32 digits; evaluate.py scores more, in batches


def write_samples(net, cfg, out_dir: Path, device, num_images: int, seed: int, gif_frames: int = 40,
                  progress: bool = False) -> dict:
    """Sample num_images with cfg.sample's sampler; write samples.png, denoising.gif, forward.png.
    A run that fails or is interrupted before they are written leaves no out_dir it made."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; pass a directory for the pictures")
    with leaves_no_new_dirs(out_dir):
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # no permission, a file among its parents
            raise UserError(f"cannot use {out_dir} as the output directory ({e.strerror}); pass another --out") from None
        return _write_samples(net, cfg, out_dir, device, num_images, seed, gif_frames, progress)


def _write_samples(net, cfg, out_dir: Path, device, num_images, seed, gif_frames, progress) -> dict:
    paths = {"grid": out_dir / "samples.png", "gif": out_dir / "denoising.gif", "forward": out_dir / "forward.png"}
    for path in paths.values():  # now, not after the sampling
        check_writable(path, "--out")
    diffusion = Diffusion.from_config(cfg.diffusion, device)
    plan = diffusion.plan(cfg.sample)
    generator = torch.Generator(device).manual_seed(seed)
    keep_every = max(1, len(plan.timesteps) // gif_frames)
    s = cfg.sample
    fast_step = FastStep.from_config(net, plan, s, device)
    # counts the steps handed to the device (on a GPU it runs a few behind); the first includes the compile
    bar = tqdm(total=len(plan.timesteps), desc=f"{s.sampler} sampling", unit="step", disable=not progress, leave=False)

    def step(i, x, noise):
        bar.update()
        return fast_step(i, x, noise)

    with bar:
        x, frames = diffusion.sample(net, (num_images, 1, cfg.data.image_size, cfg.data.image_size), plan,
                                     s.clip_x0, generator, keep_every, step)
    grid = to_unit(x).cpu()
    try:  # all three or none (a full disk): no mixed set, and no dir it made
        checkpoint.write_all_atomically({
            paths["grid"]: lambda f: save_image(grid, f, format="png", nrow=int(num_images ** 0.5 + 0.5), padding=2,
                                                pad_value=1.0),
            paths["gif"]: write_gif(frames),
            paths["forward"]: write_forward_diffusion_figure(diffusion, x[:1].clamp(-1, 1), generator=generator)})
    except checkpoint.WriteError as e:
        raise checkpoint.WriteError(f"{e}; free space or pass another --out") from None
    return paths
