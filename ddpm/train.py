"""The training loop: data (data.loader) -> UNet -> epsilon MSE -> Adam -> EMA, with checkpoints,
TensorBoard logs and a progress bar. Counted in optimizer steps; resumable to the same weights."""
import fcntl
import gc
import math
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from ddpm import checkpoint, cli, config as config_lib, data, distributed, model as model_lib
from ddpm.config import UserError
from ddpm.runtime import compile_model, precision_dtype, resolve_device, resolve_precision, resolve_train_compile
from ddpm.diffusion import Diffusion, usual_ddim_steps
from ddpm.sample import to_unit

# Keys a resumed run may change: how long it runs, how it reports, and how it runs on this machine
# (backends, precision, compilation, loader, where the data lies: the same math), not what it
# computes. The data read must be the data the run was trained on (check_same_data).
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every",
                     "train.eval_every", "train.device", "train.out_dir", "train.precision", "train.compile",
                     "model.kernels", "model.attention", "data.loader", "data.dir", "sample.sampler", "sample.steps",
                     "sample.eta", "sample.variance", "sample.clip_x0", "sample.num_images", "sample.precision",
                     "sample.compile", "sample.cuda_graph", "sample.streams"}
CHECKPOINT_NAME = "checkpoint.pt"


class RunDirError(UserError):
    pass


def check_out_dir(cfg, resume: bool | str, overwrite: bool) -> dict | None:
    """Refuse to mix runs in one out dir; return the checkpoint state to resume from, if any.
    resume: True (--resume), False, or "if-present" (make train: resume where the dir holds a
    checkpoint). Changes nothing on disk: a run that fails to start leaves the dir as it was."""
    out = Path(cfg.train.out_dir)
    saved_cfg_path, ckpt_path = out / "config.yaml", out / CHECKPOINT_NAME
    asked = resume is True  # else the run dir's checkpoint chose to resume: say how to replace it too
    if resume == "if-present":
        resume = ckpt_path.exists()
    nearest = next(p for p in (out, *out.parents) if p.exists())  # out itself, or where it would be made
    if not nearest.is_dir():
        raise RunDirError(f"train.out_dir {out} cannot be a run dir: {nearest} is a file; choose another train.out_dir")
    if not os.access(nearest, os.W_OK):
        raise RunDirError(f"train.out_dir {out}: no permission to write in {nearest}; choose another train.out_dir")
    if resume:
        if not ckpt_path.exists():
            raise RunDirError(f"nothing to resume: {ckpt_path} does not exist; drop --resume to start a new run")
        state = checkpoint.load(ckpt_path)
        changed = set(config_lib.diff(checkpoint.config_of(state, ckpt_path), cfg)) - RESUMABLE_CHANGES
        if changed:
            raise RunDirError(f"the run in {out} was trained with other settings ({', '.join(sorted(changed))}); "
                              f"resume with the same config{'' if asked else ', replace it with --overwrite'} "
                              f"or choose another train.out_dir")
        if state["step"] > cfg.train.steps:
            raise RunDirError(f"the run in {out} is at step {state['step']}, past train.steps={cfg.train.steps}; "
                              f"resume with train.steps of at least {state['step']}")
        return state
    if ckpt_path.exists() and not overwrite:
        raise RunDirError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                          f"or set train.out_dir to another directory")
    if saved_cfg_path.exists() and not overwrite:
        raise RunDirError(f"{out} holds a run that stopped before its first checkpoint; pass --overwrite to "
                          f"replace it, or set train.out_dir to another directory")
    return None


def check_same_data(state: dict, fingerprint: dict, digits, cfg, path) -> None:
    """A resumed run reads the images its checkpoint was trained on (checkpoints before this check
    recorded none). data.dir may have moved; its files may not have changed, nor may data.source=auto
    have fallen back to another source for want of them."""
    trained_on = state.get("data")
    if trained_on is None or trained_on == fingerprint:
        return
    count = f"{trained_on['images']:,} images" if isinstance(trained_on, dict) and "images" in trained_on else "images"
    raise RunDirError(f"the run in {path.parent} was trained on other {count} than data.dir={cfg.data.dir} gives now "
                      f"({digits.description}: {len(digits.images):,}); point data.dir at the run's data")


def restore(trainer, state: dict, path) -> int:
    """trainer.load_state_dict, with a damaged training state (optimizer, scheduler, generator, EMA
    count) as one line: the checkpoint's keys are there, their contents are not what was saved."""
    try:
        return trainer.load_state_dict(state, path)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {path} holds a training state that cannot be restored "
                                         f"({config_lib.describe(e)}); it is damaged: resume from another "
                                         f"checkpoint or start anew") from None


def diverged(loss: float, step: int, ckpt_path: Path) -> UserError:
    kept = f"{ckpt_path} holds the last checkpoint before it" if ckpt_path.exists() else "no checkpoint was written"
    return UserError(f"the loss is {loss} by step {step}: training diverged ({kept}); lower train.lr or set "
                     f"train.grad_clip")


class _ExtrasInterrupted(BaseException):
    """A signal arrived while training drew its sample grid or evaluated: both are dropped. A
    BaseException, as KeyboardInterrupt is: the evaluation's own `except Exception` (an unusable
    cached classifier is retrained) must not catch it."""


def save_checkpoint(trainer, done: int, ckpt_path: Path, window: torch.Tensor, data_fingerprint: dict) -> None:
    if not torch.isfinite(window[0]):  # the loss of the steps since the last log; a save waits for the GPU anyway
        raise diverged(window[0].item(), done, ckpt_path)
    try:
        checkpoint.save({**trainer.state_dict(done), "data": data_fingerprint}, ckpt_path)
    except checkpoint.WriteError as e:
        then = ("it keeps the last checkpoint: free space, then continue with --resume" if ckpt_path.exists() else
                "none was written: free space, then start again with --overwrite")
        raise checkpoint.WriteError(f"{e} at step {done}; {then}") from None


def lock_run_dir(out: Path) -> tuple[int | None, bool]:
    """An exclusive lock on the run dir, held until its descriptor is closed or the process ends:
    (descriptor, False), or (None, True) when another process holds it. Where the dir cannot be
    opened or its file system has no locks, the run goes on without one, and says so."""
    try:
        lock = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock, False
        except OSError:
            os.close(lock)
            raise
    except BlockingIOError:
        return None, True
    except OSError as e:  # unreadable; ENOLCK, EOPNOTSUPP: a network or FUSE file system without locks
        print(f"note: cannot lock {out} ({e.strerror}): a second run started into it would not be stopped", file=sys.stderr)
        return None, False


def start_out_dir(cfg, replace: bool, fresh: bool) -> int | None:
    """Once the run is set up: lock the run dir for this run (returns the lock's descriptor, or None
    where there is no lock), clear the run it replaces (--overwrite), save the config. fresh: not
    resumed, so the dir should be as check_out_dir found it. A failure leaves no dir it made."""
    out = Path(cfg.train.out_dir)
    with cli.leaves_no_new_dirs(out):
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot make train.out_dir {out} ({e.strerror}); choose another train.out_dir") from None
        # two runs started in one dir: the second stops at its first step, before it writes, and
        # leaves the dir (which the other may have just made) alone
        lock, held = lock_run_dir(out)
        if not held:
            try:
                if fresh and not replace and any((out / name).exists() for name in (CHECKPOINT_NAME, "config.yaml")):
                    raise RunDirError(f"another run started in {out} while this one was setting up; choose another "
                                      f"train.out_dir, or pass --resume or --overwrite")
                if replace:
                    for name in (CHECKPOINT_NAME, "config.yaml", "tb", "samples"):
                        path = out / name
                        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                checkpoint.remove_stale_temporaries(out)
                text = config_lib.to_yaml(cfg).encode()
                checkpoint.write_atomically(out / "config.yaml", lambda f: f.write(text))
            except BaseException:
                if lock is not None:
                    os.close(lock)
                raise
    if held:
        raise RunDirError(f"another run is training in {out}; wait for it to end, stop it, or choose another train.out_dir")
    return lock


class EMA(AveragedModel):
    """torch's AveragedModel with its EMA rule (get_ema_multi_avg_fn), updated without waiting for
    the GPU: AveragedModel.update_parameters copies its host-side step count to the device every
    call, a blocking copy per training step. Buffers are copied, never averaged (a BatchNorm's
    statistics would follow the model; this UNet's one buffer, the sinusoid frequencies, is constant).

    warmup: update k (k = 1, 2, ... after the copy of the first weights) decays by
    min(decay, (1 + k) / (10 + k)), TensorFlow's ExponentialMovingAverage with num_updates, so that
    the average forgets the first steps' weights: at 0.9999 without it, 82% of the average is
    still the first step's weights after 2,000 steps, and 2.4% after the seed's 37,500."""

    def __init__(self, net: torch.nn.Module, decay: float, warmup: bool = True):
        super().__init__(net)  # its update_parameters, and with it multi_avg_fn and use_buffers, is replaced below
        self.decay, self.warmup = decay, warmup

    def decay_of_update(self, k: int) -> float:
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        averaged = [p.detach() for p in self.module.parameters()]
        current = [p.detach() for p in model.parameters()]
        k = int(self.n_averaged)  # a CPU tensor: no device sync
        if k == 0:
            torch._foreach_copy_(averaged, current)
        else:  # the EMA rule ignores its third argument, the count
            get_ema_multi_avg_fn(self.decay_of_update(k))(averaged, current, self.n_averaged)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.n_averaged += 1


class Trainer:
    """Everything one optimizer step touches. train() and the benchmarks drive this same object.

    The timesteps and noise of the whole global batch are drawn from one generator seeded alike
    on every rank, and each rank takes its slice: any world size computes the same step."""

    def __init__(self, cfg, device, images: torch.Tensor, rank: int = 0, world_size: int = 1, ddp: bool | None = None):
        """ddp: the UNet wrapped in DDP (default: when world_size > 1); True in a process group of one
        (distributed.solo_group) measures DDP's cost on one GPU."""
        t = cfg.train
        self.cfg, self.device, self.rank = cfg, torch.device(device), rank
        self.loader = data.make_loader(cfg.data.loader, images, t.batch_size, t.seed, self.device,
                                       cfg.data.image_size, cfg.data.resize, rank, world_size)
        torch.manual_seed(t.seed)
        compile_mode = resolve_train_compile(t.compile, self.device, world_size)
        graphed = compile_mode == "reduce-overhead"
        self.net = model_lib.build(cfg, self.device, graphed)
        model_lib.check_runs_on(self.net, self.device)
        self.ema = EMA(self.net, t.ema_decay, t.ema_warmup)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                    weight_decay=t.weight_decay, fused=self.device.type == "cuda")
        warmup = max(t.warmup_steps, 1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: min(1.0, (step + 1) / warmup))
        self.diffusion = Diffusion.from_config(cfg.diffusion, self.device)
        self.noise_gen = torch.Generator(self.device).manual_seed(t.seed + 1)
        self.autocast_dtype = precision_dtype(t.precision, self.device)
        # fp16 needs loss scaling; with the fused Adam the scaler's inf check stays on the device.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.forward = compile_model(self.net, compile_mode, self.device)
        norm, attention = self.net.backends
        self.runs_as = (f"{resolve_precision(t.precision, self.device)}, compile {compile_mode}, "
                        f"GroupNorm {norm}, attention {attention}")
        if ddp is None:
            ddp = world_size > 1
        if ddp:
            self.forward = distributed.wrap(self.forward, self.device)
        self.image_shape = (1, cfg.data.image_size, cfg.data.image_size)
        self.local = slice(self.loader.offset, self.loader.offset + self.loader.local_batch)

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step on the batch of `step`; returns the loss, detached, on the device."""
        x0 = self.loader.batch(step)
        t, noise = self.diffusion.draw(self.cfg.train.batch_size, self.image_shape, self.noise_gen)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.diffusion.loss(self.forward, x0, t[self.local], noise[self.local])
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.ema.update_parameters(self.net)
        return loss.detach()

    def state_dict(self, step: int) -> dict:
        return {"config": self.cfg.to_dict(), "step": step, "model": self.net.state_dict(),
                "ema": self.ema.module.state_dict(), "ema_n_averaged": self.ema.n_averaged,
                "optimizer": self.opt.state_dict(), "lr_scheduler": self.sched.state_dict(),
                "rng": {"noise": self.noise_gen.get_state()}, "grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, path) -> int:
        """Restore a checkpoint's training state; returns its step."""
        checkpoint.load_weights(self.net, state["model"], path)
        checkpoint.load_weights(self.ema.module, state["ema"], path)
        self.ema.n_averaged.copy_(state["ema_n_averaged"])
        # How Adam runs (fused on CUDA, not on a CPU) is this device's, not the checkpoint's: a CPU
        # run's fused=False resumed on CUDA would give the GradScaler's grad_scale to a non-fused
        # Adam, which refuses it.
        saved = state["optimizer"]
        groups = [{**group, **{key: now[key] for key in ("fused", "foreach", "capturable") if key in now}}
                  for group, now in zip(saved["param_groups"], self.opt.param_groups)]
        self.opt.load_state_dict({**saved, "param_groups": groups})
        self.sched.load_state_dict(state["lr_scheduler"])
        noise_state = state["rng"]["noise"]
        if noise_state.numel() == self.noise_gen.get_state().numel():
            self.noise_gen.set_state(noise_state)
        else:
            # A CPU generator's state (Mersenne twister) does not fit a CUDA one (seed, offset) or the
            # reverse: the run goes on with a stream seeded by its step, statistically the same.
            self.noise_gen.manual_seed(self.cfg.train.seed + 1 + 1_000_003 * state["step"])
            if self.rank == 0:
                print(f"resuming on {self.device.type}: the checkpoint's noise generator was another device's, "
                      f"so the noise from step {state['step']} on differs from an uninterrupted run's", file=sys.stderr)
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        return state["step"]


@torch.no_grad()
def sample_grid(ema_net, diffusion: Diffusion, image_size: int, n: int = 16, seed: int = 0) -> torch.Tensor:
    """A quick DDIM-50 grid from the EMA weights for TensorBoard (same noise every time)."""
    plan = diffusion.ddim_plan(usual_ddim_steps(diffusion.timesteps), 0.0)
    x, _ = diffusion.sample(ema_net, (n, 1, image_size, image_size), plan, True,
                            torch.Generator(diffusion.device).manual_seed(seed))
    return x


class TensorBoard:
    """SummaryWriter whose failure (a full disk: its writer thread's error comes back at the next
    call) turns TensorBoard off with a one-line note, instead of stopping the run with a traceback
    before its next checkpoint (whose own write says what is wrong, if it fails too)."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.writer = log_dir, None
        try:
            self.writer = SummaryWriter(str(log_dir))
        except OSError as e:
            self._stop(e)

    def _stop(self, error: OSError) -> None:
        self.writer = None
        print(f"note: TensorBoard stopped: cannot write {self.log_dir} ({error.strerror}); training goes on",
              file=sys.stderr)

    def _call(self, method: str, *args):
        if self.writer is not None:
            try:
                getattr(self.writer, method)(*args)
            except OSError as e:
                self._stop(e)

    def add_scalar(self, tag: str, value, step: int) -> None:
        self._call("add_scalar", tag, value, step)

    def add_image(self, tag: str, image, step: int) -> None:
        self._call("add_image", tag, image, step)

    def close(self) -> None:
        self._call("close")


def on_main(world: distributed.World, fn):
    """fn() on rank 0 alone (checking the run dir, reading the data, a write to the run dir); its
    result goes to every rank. If it fails, every rank stops, instead of failing in a collective
    that rank 0 has left: rank 0 with its error, the first process of every other node with the
    same one line (`rank 0: ...`) for a user error, the others quietly (cli.exit_after_reporter)."""
    result = failure = None
    if world.is_main:
        try:
            result = fn()
        except Exception as e:
            failure = e
    exit_status = None if failure is None else 2 if isinstance(failure, UserError) else 1
    message = str(failure) if isinstance(failure, UserError) else None
    result, exit_status, message = distributed.from_main(world, (result, exit_status, message))
    if failure is not None:
        raise failure
    if message is not None and world.local_rank == 0:
        raise UserError(f"rank 0: {message}")
    if exit_status is not None:
        cli.exit_after_reporter(exit_status)
    return result


def detach_from_terminal(terminal_fds: list[int]) -> None:
    """After SIGHUP the terminal is gone and every write to it fails (EIO): a progress line would
    stop the run before it saves. terminal_fds (stdout, stderr: those that were the terminal when
    the run began; a hung-up one no longer says so) go to /dev/null; redirected ones stay."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in terminal_fds:
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def train(cfg, resume: bool | str = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Train as cfg says (in every process torchrun starts, if any); returns the final checkpoint's path.
    resume: True, False or "if-present" (check_out_dir)."""
    world, device = distributed.init(resolve_device(cfg.train.device))
    try:
        return _train(cfg, world, device, resume, overwrite, progress)
    except BaseException as e:
        # A run that fails or stops keeps its Trainer alive in the traceback's frames: DDP's reducer
        # and the gloo work it holds would outlive the process group into interpreter teardown, where
        # gloo can abort ("terminate called without an active exception"). Freed now, before it.
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        raise
    finally:
        distributed.shutdown()


def _train(cfg, world: distributed.World, device, resume, overwrite, progress) -> Path:
    t = cfg.train
    out = Path(t.out_dir)
    ckpt_path = out / CHECKPOINT_NAME
    # Rank 0 alone checks the run dir, reads the checkpoint and loads (if need be downloads) the
    # data, then sends both to the other ranks: they all train on the same digits, and other
    # nodes need neither the data nor the run dir. Nothing is written or deleted until the run
    # is set up, so bad input costs no earlier work.
    data_fingerprint = None  # rank 0's, for its checkpoints

    def set_up():
        nonlocal data_fingerprint
        resumed = check_out_dir(cfg, resume, overwrite)
        digits = data.load_digits(cfg.data, train=True)
        data_fingerprint = digits.fingerprint()
        if resumed is not None:
            check_same_data(resumed, data_fingerprint, digits, cfg, ckpt_path)
        if t.eval_every:
            from ddpm.eval import real_splits  # torchmetrics only when asked for
            real_splits(cfg.data)  # a missing test split stops now, not at the first evaluation
        return resumed, digits
    resumed, digits = on_main(world, set_up)

    trainer = Trainer(cfg, device, digits.images, world.rank, world.world_size)
    start = restore(trainer, resumed, ckpt_path) if resumed is not None else 0
    replace_old_run = overwrite and resumed is None  # --overwrite clears the dir when the first step has run
    fresh_run = resumed is None
    del resumed
    writer = run_dir_lock = None  # rank 0's, made with the run dir once the first step has run
    if world.is_main:
        print(f"training on {world.world_size} x {device.type} with {digits.description}: {len(digits.images)} images, "
              f"{sum(p.numel() for p in trainer.net.parameters()):,} parameters ({trainer.runs_as}), "
              f"steps {start} -> {t.steps}",
              file=sys.stderr)
    bar = tqdm(total=t.steps, initial=start, disable=not (progress and world.is_main), unit="step", dynamic_ncols=True)
    # loss sum and stop votes of the window, reduced across ranks once per log_every
    window = torch.zeros(2, device=device)
    window_steps, window_start = 0, time.perf_counter()
    # Ctrl-C / SIGTERM / SIGHUP (a closed terminal, a dropped ssh session): finish the step (under
    # DDP: the logging window, so all ranks agree), save, stop.
    # A sample grid or evaluation under way is cut short: it computes nothing the run keeps. A
    # second signal stops at once, keeping the last checkpoint (its writes are atomic), but not
    # one within a second of the first: a cluster's scheduler signals every process of a job and
    # torchrun forwards the same signal again.
    stop_signal = []
    in_extras = False

    def on_signal(signum, frame):
        if signum == signal.SIGHUP:
            detach_from_terminal(terminal_fds)
        if stop_signal:
            if time.monotonic() - stop_signal[0] > 1.0:
                raise KeyboardInterrupt
            return
        stop_signal.append(time.monotonic())
        if in_extras:
            raise _ExtrasInterrupted

    stop_signals, terminal_fds = [signal.SIGINT, signal.SIGTERM], [fd for fd in (1, 2) if os.isatty(fd)]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup's runs go on
        stop_signals.append(signal.SIGHUP)
    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in stop_signals}
    try:
        for step in range(start, t.steps):
            window[0] += trainer.step(step)
            if step == start:
                # settings that fail at the first step (a kernel, an overflow) have failed by now, so
                # only now is the run dir written and the run it replaces (--overwrite) cleared
                def start_run_dir():
                    nonlocal run_dir_lock, writer
                    run_dir_lock = start_out_dir(cfg, replace=replace_old_run, fresh=fresh_run)
                    writer = TensorBoard(out / "tb")
                on_main(world, start_run_dir)
            window_steps += 1
            done = step + 1
            bar.update(1)
            stop = False  # a signal's stop, decided at a log (all ranks) or after the extras (one process)
            if done % t.log_every == 0 or done == t.steps:
                window[1] = float(bool(stop_signal))
                loss_sum, stop_votes = distributed.sum_across(world, window).tolist()  # the one host sync
                stop = stop_votes > 0
                if not math.isfinite(loss_sum):  # on every rank: rank 0 says it
                    if not world.is_main:
                        cli.exit_after_reporter(2)
                    raise diverged(loss_sum, done, ckpt_path)
                images_per_s = window_steps * t.batch_size / (time.perf_counter() - window_start)
                if world.is_main:
                    mean_loss = loss_sum / (window_steps * world.world_size)
                    writer.add_scalar("train/loss", mean_loss, done)
                    writer.add_scalar("train/lr", trainer.sched.get_last_lr()[0], done)
                    writer.add_scalar("train/images_per_s", images_per_s, done)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_s:.0f}")
                    if not progress:
                        print(f"step {done}/{t.steps}  loss {mean_loss:.4f}  {images_per_s:.0f} images/s", file=sys.stderr)
                window.zero_()
                window_steps, window_start = 0, time.perf_counter()
            saved = done % t.checkpoint_every == 0 or done == t.steps or stop  # alike on every rank
            extras = t.sample_every and done % t.sample_every == 0 or t.eval_every and done % t.eval_every == 0
            if world.is_main and (saved or extras) and device.type == "cuda":
                torch.cuda.synchronize(device)  # the steps' queued kernels are the window's time, not the extras'
            extras_start = time.perf_counter()
            if saved:  # first: a failing evaluation loses nothing
                on_main(world, lambda: save_checkpoint(trainer, done, ckpt_path, window, data_fingerprint))
            if world.is_main:
                in_extras = True  # before the check: a signal from here on cuts the extras short
                try:
                    if not stop_signal and t.sample_every and done % t.sample_every == 0:
                        x = sample_grid(trainer.ema.module, trainer.diffusion, cfg.data.image_size)
                        writer.add_image("samples/ema_ddim50", make_grid(to_unit(x).cpu(), nrow=4, pad_value=1.0), done)
                    if not stop_signal and t.eval_every and done % t.eval_every == 0:
                        from ddpm.eval import quick_score  # torchmetrics only when asked for
                        for name, value in quick_score(trainer.ema.module, cfg, device).items():  # each beside its floor
                            writer.add_scalar(f"eval/{name}", value, done)
                except _ExtrasInterrupted:
                    print(f"sample grid / evaluation at step {done} cut short by the signal", file=sys.stderr)
                finally:
                    in_extras = False
                stop = stop or (bool(stop_signal) and not world.distributed)
                if stop and not saved:
                    save_checkpoint(trainer, done, ckpt_path, window, data_fingerprint)
            window_start += time.perf_counter() - extras_start  # images/s counts training steps alone
            if stop and done < t.steps:  # at the last step the run is complete: it ends as usual
                bar.close()
                if world.is_main:
                    print(f"stopped by signal after step {done}: saved {ckpt_path}; continue with --resume", file=sys.stderr)
                raise KeyboardInterrupt
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        bar.close()
        if writer is not None:
            writer.close()
        if run_dir_lock is not None:
            os.close(run_dir_lock)
    distributed.barrier(world)
    return ckpt_path
