import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

import ddpm.train
from ddpm import checkpoint, config, data
from ddpm.config import UserError
from ddpm.diffusion import Diffusion
from ddpm.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]


def ci_config(out_dir, *overrides):
    return config.load(ROOT / "configs/ci.yaml", [f"train.out_dir={out_dir}", *overrides])


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, program):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) >= 1
    assert lines[-1].startswith(f"{program}: error: "), result.stderr
    return lines[-1]


def run_sample_main(capsys, monkeypatch, *args):
    """sample.py's main() in this process (a subprocess costs ~4 s of imports): its exit status and
    stderr as a CompletedProcess. An exception other than the CLI's exit propagates: a traceback."""
    import sample
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        sample.main()
    return subprocess.CompletedProcess(args, exit_.value.code, "", capsys.readouterr().err)


def test_checkpoint_round_trip(tmp_path):
    ckpt = train(ci_config(tmp_path / "run", "train.steps=2"), progress=False)
    state = checkpoint.load(ckpt)
    assert state["step"] == 2 and config.diff(checkpoint.config_of(state, ckpt), ci_config(tmp_path / "run", "train.steps=2")) == []
    from ddpm.sample import load_model
    net, cfg, step = load_model(ckpt, "cpu", use_ema=False)
    for name, value in net.state_dict().items():
        assert torch.equal(value, state["model"][name])
    assert not list(tmp_path.glob("run/.*tmp*"))  # the atomic write left no temporary file


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    straight = checkpoint.load(train(ci_config(tmp_path / "a", "train.steps=6", "train.checkpoint_every=3",
                                               "train.warmup_steps=4", "train.grad_clip=0.5"), progress=False))
    train(ci_config(tmp_path / "b", "train.steps=3", "train.warmup_steps=4", "train.grad_clip=0.5"), progress=False)
    resumed = checkpoint.load(train(ci_config(tmp_path / "b", "train.steps=6", "train.warmup_steps=4",
                                              "train.grad_clip=0.5"), resume=True, progress=False))
    assert resumed["step"] == straight["step"] == 6
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(straight["ema_n_averaged"], resumed["ema_n_averaged"])


def test_resume_from_another_devices_noise_generator(tmp_path, capsys):
    """A CUDA generator's state is 16 bytes (seed, offset), a CPU one's 5 KB: resuming across devices
    reseeds instead of failing."""
    ckpt = train(ci_config(tmp_path / "r", "train.steps=2"), progress=False)
    state = checkpoint.load(ckpt)
    state["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator saves
    checkpoint.save(state, ckpt)
    resumed = checkpoint.load(train(ci_config(tmp_path / "r", "train.steps=4"), resume=True, progress=False))
    assert resumed["step"] == 4
    assert "noise from step 2 on differs" in capsys.readouterr().err


def test_a_run_that_fails_to_start_leaves_the_run_dir_as_it_was(tmp_path):
    from ddpm.config import UserError
    run = tmp_path / "run"
    no_data = ["data.source=idx", f"data.dir={tmp_path / 'no-data'}"]
    with pytest.raises(UserError, match="no train-images"):
        train(ci_config(run, *no_data), progress=False)
    assert not run.exists() or not any(run.iterdir())  # nothing written: a corrected rerun just starts
    train(ci_config(run, "train.steps=1"), progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match="no train-images"):
        train(ci_config(run, *no_data), overwrite=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before  # --overwrite deletes only once the run is set up


def test_overwrite_keeps_the_old_run_until_the_new_one_has_taken_a_step(tmp_path, monkeypatch):
    """Settings that fail only at the first step (a kernel, an overflow) cost the old run nothing."""
    run = tmp_path / "run"
    train(ci_config(run, "train.steps=1"), progress=False)
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "config.yaml")}

    def fails(self, step):
        raise RuntimeError("the first step failed")
    monkeypatch.setattr(Trainer, "step", fails)
    with pytest.raises(RuntimeError, match="the first step failed"):
        train(ci_config(run, "train.lr=0.5"), overwrite=True, progress=False)
    assert {name: (run / name).read_bytes() for name in before} == before
    with pytest.raises(RuntimeError, match="the first step failed"):
        train(ci_config(tmp_path / "new"), progress=False)
    assert not (tmp_path / "new").exists()  # nothing half-made that a rerun would have to --overwrite


def test_run_dirs_that_cannot_be_made_and_damaged_training_states_fail_in_one_line(tmp_path):
    from ddpm.config import UserError
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(UserError, match="is a file; choose another train.out_dir"):
            train(ci_config(out), progress=False)
    ckpt = train(ci_config(tmp_path / "run", "train.steps=1"), progress=False)
    state = torch.load(ckpt, weights_only=True)
    state["optimizer"] = {}
    torch.save(state, ckpt)
    with pytest.raises(UserError, match="holds a training state that cannot be restored"):
        train(ci_config(tmp_path / "run", "train.steps=2"), resume=True, progress=False)


def test_a_diverging_run_stops_without_saving_its_nan_weights(tmp_path, monkeypatch):
    from ddpm.config import UserError
    step = Trainer.step

    def poisoned(self, i):  # what lr=1e10 did, before train.lr was bounded
        loss = step(self, i)
        with torch.no_grad():
            next(self.net.parameters()).fill_(float("nan"))
        return loss
    monkeypatch.setattr(Trainer, "step", poisoned)
    with pytest.raises(UserError, match="the loss is nan by step 2: training diverged .no checkpoint was written"):
        train(ci_config(tmp_path / "new", "train.log_every=2"), progress=False)
    assert not (tmp_path / "new" / "checkpoint.pt").exists()
    # between two logs: the checkpoint's own check keeps the last good one
    monkeypatch.setattr(Trainer, "step", step)
    run = tmp_path / "run"
    common = ["train.log_every=20", "train.checkpoint_every=2"]
    train(ci_config(run, "train.steps=2", *common), progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(Trainer, "step", poisoned)
    with pytest.raises(UserError, match="by step 4: training diverged .* holds the last checkpoint before it"):
        train(ci_config(run, "train.steps=40", *common), resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_the_triton_ops_on_a_cpu_without_the_interpreter(tmp_path, monkeypatch, capsys):
    """Training refuses them in one line; sampling a run trained with them runs PyTorch's instead."""
    from ddpm.config import UserError
    from ddpm.sample import load_model
    ckpt = train(ci_config(tmp_path / "run", "train.steps=1"), progress=False)
    state = torch.load(ckpt, weights_only=True)
    state["config"]["model"]["kernels"] = "triton"  # as a GPU run with the op would have saved it
    torch.save(state, ckpt)
    monkeypatch.delenv("TRITON_INTERPRET")
    for key in ("kernels", "attention"):
        with pytest.raises(UserError, match=f"model.{key}=triton needs a CUDA GPU"):
            _trainer(tmp_path, f"model.{key}=triton")
    capsys.readouterr()
    net, cfg, _ = load_model(ckpt, "cpu")
    assert cfg.model.kernels == "auto" and net.backends[0] == "torch"
    assert "was trained with model.kernels=triton" in capsys.readouterr().err


def test_train_cli_takes_overrides_between_and_after_flags(monkeypatch):
    import runpy
    main = runpy.run_path(str(ROOT / "train.py"))["main"]
    seen = []
    monkeypatch.setitem(main.__globals__, "train", lambda cfg, **kwargs: seen.append((cfg, kwargs)) or "ckpt")
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", "configs/ci.yaml", "train.steps=2", "--no-progress",
                                      "train.lr=0.002", "--overwrite", "train.seed=3"])
    main()
    (cfg, kwargs), = seen
    assert (cfg.train.steps, cfg.train.lr, cfg.train.seed) == (2, 0.002, 3) and kwargs["overwrite"]


def test_resume_refuses_a_shorter_run_and_eval_without_its_data(tmp_path):
    from ddpm.config import UserError
    run = tmp_path / "run"
    train(ci_config(run, "train.steps=3"), progress=False)
    with pytest.raises(UserError, match="is at step 3, past train.steps=2; resume with train.steps of at least 3"):
        train(ci_config(run, "train.steps=2"), resume=True, progress=False)
    # IDX training files without their test split: train.eval_every stops before the first step
    idx = tmp_path / "idx"
    write_idx_digits(idx, torch.zeros(64, 28, 28, dtype=torch.uint8))
    with pytest.raises(UserError, match="no t10k-images"):
        train(ci_config(tmp_path / "eval-run", "data.source=idx", f"data.dir={idx}", "train.eval_every=2"),
              progress=False)
    assert not (tmp_path / "eval-run" / "tb").exists()


def test_resume_refuses_other_settings_and_missing_runs(tmp_path):
    from ddpm.config import UserError
    with pytest.raises(UserError, match="nothing to resume"):
        train(ci_config(tmp_path / "r"), resume=True, progress=False)
    train(ci_config(tmp_path / "r", "train.steps=1"), progress=False)
    for change in ("train.lr=0.5", "train.batch_size=8", "train.seed=1", "train.ema_decay=0.5",
                   "diffusion.timesteps=50", "model.base_channels=16", "data.resize=pad"):
        with pytest.raises(UserError, match=rf"other settings \({change.split('=')[0]}\)"):
            train(ci_config(tmp_path / "r", "train.steps=2", change), resume=True, progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        train(ci_config(tmp_path / "r", "train.steps=2"), progress=False)
    (tmp_path / "r" / "samples").mkdir()  # sample.py's pictures of the old run
    assert checkpoint.load(train(ci_config(tmp_path / "r", "train.steps=2"), overwrite=True, progress=False))["step"] == 2
    assert not (tmp_path / "r" / "samples").exists() and len(list((tmp_path / "r" / "tb").iterdir())) == 1
    # a run dir holding a config alone: a run that stopped before its first checkpoint
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_text(config.to_yaml(ci_config(tmp_path / "early")))
    with pytest.raises(UserError, match="stopped before its first checkpoint; pass --overwrite"):
        train(ci_config(tmp_path / "early", "train.steps=1"), progress=False)
    assert checkpoint.load(train(ci_config(tmp_path / "early", "train.steps=1"), overwrite=True, progress=False))


def write_idx_digits(folder: Path, images: torch.Tensor) -> None:
    folder.mkdir(parents=True)
    for name, array in (("train-images-idx3-ubyte", images),
                        ("train-labels-idx1-ubyte", torch.arange(len(images), dtype=torch.uint8) % 10)):
        header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
        (folder / name).write_bytes(header + array.numpy().tobytes())


def test_resume_follows_moved_data_but_refuses_other_data(tmp_path, monkeypatch):
    from ddpm.config import UserError
    images = torch.randint(0, 256, (64, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    write_idx_digits(tmp_path / "data", images)
    run = tmp_path / "run"
    on = lambda folder, steps: ci_config(run, "data.source=auto", f"data.dir={folder}", f"train.steps={steps}")  # noqa: E731
    train(on(tmp_path / "data", 1), progress=False)
    assert checkpoint.load(run / "checkpoint.pt")["data"]["images"] == 64
    (tmp_path / "data").rename(tmp_path / "moved")
    assert checkpoint.load(train(on(tmp_path / "moved", 2), resume=True, progress=False))["step"] == 2
    changed = images.clone()
    changed[5, 14, 14] ^= 1  # one pixel
    write_idx_digits(tmp_path / "other", changed)
    with pytest.raises(UserError, match=r"was trained on other 64 images than data.dir=.*other gives now .*: 64\); "
                                        r"point data.dir at the run's data"):
        train(on(tmp_path / "other", 3), resume=True, progress=False)
    # data.source=auto without the run's files (and offline) falls back to the offline subset: refused too
    def offline(*args):
        raise OSError("no network")
    monkeypatch.setattr(data, "load_torchvision", offline)
    with pytest.raises(UserError, match="trained on other 64 images .*offline subset"):
        train(on(tmp_path / "nothing", 3), resume=True, progress=False)
    # checkpoints written before the data was recorded resume as before
    state = checkpoint.load(run / "checkpoint.pt")
    del state["data"]
    checkpoint.save(state, run / "checkpoint.pt")
    assert checkpoint.load(train(on(tmp_path / "other", 3), resume=True, progress=False))["step"] == 3


def test_sigint_saves_a_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--config", "configs/ci.yaml", "--no-progress",
                             f"train.out_dir={out}", "train.steps=100000", "train.log_every=1"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until training runs
        if line.startswith("step 2/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    step = checkpoint.load(out / "checkpoint.pt")["step"]
    assert step >= 2
    result = run_cli("train.py", "--config", "configs/ci.yaml", "--no-progress", "--resume",
                     f"train.out_dir={out}", f"train.steps={step + 2}")
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(out / "checkpoint.pt")["step"] == step + 2


def test_sigint_cuts_an_evaluation_short_and_saves_the_step(tmp_path, monkeypatch, capsys):
    """Ctrl-C during train.eval_every's evaluation (the first trains a classifier: minutes) stops at
    once instead of after it; the step it followed is saved."""
    import ddpm.eval

    def slow_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        try:
            time.sleep(60)
        except Exception:  # as eval.get_classifier's guard around a cached classifier: it would retrain
            time.sleep(60)
        raise AssertionError("the signal did not cut the evaluation short")

    monkeypatch.setattr(ddpm.eval, "quick_score", slow_evaluation)
    cfg = ci_config(tmp_path / "run", "train.steps=50", "train.eval_every=3", "train.checkpoint_every=100")
    start, handler = time.perf_counter(), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    assert time.perf_counter() - start < 30
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["step"] == 3
    err = capsys.readouterr().err
    assert "evaluation at step 3 cut short" in err and "stopped by signal after step 3" in err
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.fixture
def hangups_not_ignored():
    """SIGHUP's default action while a test runs, even where the suite runs under nohup."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_the_step_and_stop(tmp_path, monkeypatch, capsys, sig, hangups_not_ignored):
    """`kill`, a scheduler's stop, a closed terminal or a dropped ssh session (SIGHUP): as Ctrl-C,
    the step finishes and is saved, and the handlers before the run are back after it."""
    step = Trainer.step
    detached = []
    monkeypatch.setattr(ddpm.train, "detach_from_terminal", detached.append)  # pytest's own terminal stays

    def step_then_signal(self, i):
        if i == 2:
            os.kill(os.getpid(), sig)
        return step(self, i)

    monkeypatch.setattr(Trainer, "step", step_then_signal)
    monkeypatch.setattr(os, "isatty", lambda fd: fd == 2)  # stdout sent to a log file, stderr the terminal
    handler = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt):
        train(ci_config(tmp_path / "run", "train.steps=50", "train.checkpoint_every=100"), progress=False)
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["step"] == 3
    assert "stopped by signal after step 3" in capsys.readouterr().err
    assert signal.getsignal(sig) is handler
    # a hangup leaves the terminal, but not a log file that stdout or stderr was sent to
    assert detached == ([[2]] if sig == signal.SIGHUP else [])


def test_a_hangup_saves_the_step_and_stops_even_though_the_terminal_is_gone(tmp_path):
    """A terminal closed under a run: writes to it fail (EIO), which would stop the run at its next
    progress line without saving. The run leaves the dead terminal and saves."""
    import pty
    import select
    master, terminal = pty.openpty()
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--config", "configs/ci.yaml", "--no-progress",
                             f"train.out_dir={out}", "train.steps=100000", "train.log_every=1"],
                            cwd=ROOT, stdin=terminal, stdout=terminal, stderr=terminal,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # even under nohup
    os.close(terminal)
    try:
        seen, deadline = b"", time.monotonic() + 120
        while b"step 2/" not in seen:  # wait until training runs
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            if select.select([master], [], [], 1.0)[0]:
                seen += os.read(master, 4096)
        proc.send_signal(signal.SIGHUP)  # as the kernel does when the terminal goes, then:
        os.close(master)  # from now on writes to the terminal fail
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()
    assert checkpoint.load(out / "checkpoint.pt")["step"] >= 2


def test_under_nohup_a_hangup_does_not_stop_the_run(tmp_path, monkeypatch):
    step = Trainer.step

    def step_then_hangup(self, i):
        if i == 1:
            os.kill(os.getpid(), signal.SIGHUP)
        return step(self, i)

    monkeypatch.setattr(Trainer, "step", step_then_hangup)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        ckpt = train(ci_config(tmp_path / "run", "train.steps=4"), progress=False)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert checkpoint.load(ckpt)["step"] == 4


def test_images_per_s_counts_the_training_steps_alone(tmp_path, monkeypatch, capsys):
    """The speed in the log, the progress bar and TensorBoard leaves out checkpoints, sample grids
    and evaluations: on a clock where a step takes 1 s and a grid or a checkpoint 100 s, every
    window shows batch_size images/s. (The clock starts far from 0, as perf_counter's does.)"""
    clock, step, save = [1000.0], Trainer.step, ddpm.train.save_checkpoint

    def one_second_step(self, i):
        clock[0] += 1.0
        return step(self, i)

    def slow_grid(*args, **kwargs):
        clock[0] += 100.0
        return torch.zeros(16, 1, 32, 32)

    def slow_save(*args):
        clock[0] += 100.0
        save(*args)
    monkeypatch.setattr(Trainer, "step", one_second_step)
    monkeypatch.setattr(ddpm.train, "sample_grid", slow_grid)
    monkeypatch.setattr(ddpm.train, "save_checkpoint", slow_save)
    monkeypatch.setattr(ddpm.train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], monotonic=time.monotonic))
    cfg = ci_config(tmp_path / "run", "train.steps=6", "train.log_every=2", "train.sample_every=1",
                    "train.checkpoint_every=1")
    train(cfg, progress=False)
    speeds = [line.split()[4] for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert speeds == [str(cfg.train.batch_size)] * 3


def test_a_second_sigint_stops_at_once_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    """A second signal within a step stops without finishing it: the checkpoint before stands. One
    within a second of the first (a scheduler signalling every process, torchrun forwarding the
    same signal) is the same request: the step finishes and is saved."""
    step = Trainer.step
    pause = {"s": 1.2}

    def step_with_two_signals(self, i):
        if i == 4:  # steps 1..4 done, checkpoint at 4 written; this is the 5th
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(pause["s"])
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, i)

    monkeypatch.setattr(Trainer, "step", step_with_two_signals)
    for seconds, saved_step in ((1.2, 4), (0.0, 5)):
        pause["s"] = seconds
        with pytest.raises(KeyboardInterrupt):
            train(ci_config(tmp_path / f"run{seconds}", "train.steps=50", "train.checkpoint_every=2"), progress=False)
        assert checkpoint.load(tmp_path / f"run{seconds}" / "checkpoint.pt")["step"] == saved_step


def test_training_draws_its_grids_and_scores_from_the_ema_weights(tmp_path, monkeypatch):
    import ddpm.eval
    import ddpm.train
    from ddpm.sample import load_model
    seen = {}

    def recording(name, result):
        def stub(net, *args, **kwargs):
            seen[name] = {k: v.clone() for k, v in net.state_dict().items()}
            return result
        return stub
    monkeypatch.setattr(ddpm.eval, "quick_score", recording("scores", {"fid": 1.0}))
    monkeypatch.setattr(ddpm.train, "sample_grid", recording("grid", torch.zeros(16, 1, 32, 32)))
    ckpt = train(ci_config(tmp_path / "run", "train.steps=3", "train.eval_every=3", "train.sample_every=3"),
                 progress=False)
    ema, raw = (load_model(ckpt, "cpu", use_ema=use_ema)[0].state_dict() for use_ema in (True, False))
    default = load_model(ckpt, "cpu")[0].state_dict()  # what a caller gets without asking: the EMA weights
    assert all(torch.equal(default[k], ema[k]) for k in ema)
    assert not all(torch.equal(ema[k], raw[k]) for k in ema)  # three steps at ema_decay 0.9 tell them apart
    for name in ("grid", "scores"):
        assert seen[name].keys() == ema.keys()
        assert all(torch.equal(seen[name][k], ema[k]) for k in ema), name


def test_a_signal_during_the_last_steps_evaluation_ends_the_run_as_complete(tmp_path, monkeypatch, capsys):
    import ddpm.eval

    def interrupted_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    monkeypatch.setattr(ddpm.eval, "quick_score", interrupted_evaluation)
    ckpt = train(ci_config(tmp_path / "run", "train.steps=3", "train.eval_every=3"), progress=False)
    assert checkpoint.load(ckpt)["step"] == 3 and "stopped by signal" not in capsys.readouterr().err


def test_sample_cli_writes_grid_gif_and_forward_figure(tmp_path):
    ckpt = train(ci_config(tmp_path / "run", "train.steps=2"), progress=False)
    out = tmp_path / "pictures"
    result = run_cli("sample.py", "--ckpt", str(ckpt), "--out", str(out), "--n", "4", "--sampler", "ddim", "--steps", "5")
    assert result.returncode == 0, result.stderr
    from PIL import Image
    grid = Image.open(out / "samples.png")
    assert grid.size == (2 * 34 + 2, 2 * 34 + 2)
    gif = Image.open(out / "denoising.gif")
    assert gif.n_frames == 6  # x_T and one frame per step, ending at t = 0
    assert Image.open(out / "forward.png").size[0] > 10 * 32


def test_sample_pictures_show_the_samples_and_one_noise_draw_of_the_forward_process(tmp_path, monkeypatch):
    """samples.png maps [-1, 1] to black..white, image by image in a grid; forward.png is the first
    sample at t = 0, T/10, ..., T-1 under one noise draw (the generator's next after the sampling)."""
    import numpy as np
    from PIL import Image

    from ddpm import model
    from ddpm.sample import write_samples
    cfg = ci_config(tmp_path / "run")
    images = torch.linspace(-1.5, 1.5, 4 * 32 * 32).view(4, 1, 32, 32)  # beyond [-1, 1] at both ends
    monkeypatch.setattr(Diffusion, "sample", lambda *args, **kwargs: (images.clone(), [images, images]))
    write_samples(model.build(cfg), cfg, tmp_path / "out", torch.device("cpu"), 4, seed=3)

    def tiles(name, rows, columns):  # save_image's grid: 2 pixels of padding around each 32x32 image
        pixels = torch.from_numpy(np.array(Image.open(tmp_path / "out" / name).convert("L"))).float()
        assert pixels.shape == (2 + 34 * rows, 2 + 34 * columns)
        return torch.stack([pixels[2 + 34 * r:34 + 34 * r, 2 + 34 * c:34 + 34 * c]
                            for r in range(rows) for c in range(columns)])

    def as_pixels(x):
        return ((x.clamp(-1, 1) + 1) / 2 * 255).squeeze(1)

    torch.testing.assert_close(tiles("samples.png", 2, 2), as_pixels(images), rtol=0, atol=0.51)
    diffusion = Diffusion.from_config(cfg.diffusion, "cpu")
    t = torch.linspace(0, diffusion.timesteps - 1, 11).round().long()
    noise = torch.randn((1, 32, 32), generator=torch.Generator().manual_seed(3))
    noised = (diffusion.sqrt_abar[t].view(-1, 1, 1, 1) * images[:1].clamp(-1, 1)
              + diffusion.sqrt_one_minus_abar[t].view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(tiles("forward.png", 1, 11), as_pixels(noised), rtol=0, atol=0.51)


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/ci.yaml", "train.batch_size=0"], "train.batch_size must be >= 1"),
    (["--config", "configs/ci.yaml", "train.nope=1"], "unknown config key 'train.nope'"),
    (["--config", "configs/ci.yaml", "diffusion.timesteps=0"], "diffusion.timesteps must be >= 1"),
    (["--config", "configs/missing.yaml"], "does not exist"),
    (["--config", ""], "the config file's name is empty; pass a YAML file"),
    (["--config", "configs/ci.yaml", "data.source=idx", "data.dir=/nonexistent"], "no train-images-idx3-ubyte"),
])
def test_train_cli_bad_input(args, message, tmp_path, capsys, monkeypatch):
    """The first case runs train.py as a process; the others its main() here (a process costs ~4 s)."""
    args = [*args, f"train.out_dir={tmp_path / 'x'}"]
    if "train.batch_size=0" in args:
        result = run_cli("train.py", *args)
    else:
        import runpy
        main = runpy.run_path(str(ROOT / "train.py"))["main"]
        monkeypatch.setattr(sys, "argv", ["train.py", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main()
        result = subprocess.CompletedProcess(args, exit_.value.code, "", capsys.readouterr().err)
    assert message in assert_one_line_error(result, "train.py")
    assert not (tmp_path / "x").exists()


def test_sample_cli_on_a_full_disk_leaves_no_pictures_nor_the_dir_it_made(tmp_path, capsys, monkeypatch):
    """The three pictures are written all or none: a full disk at the GIF leaves no new dir, and an
    earlier run's pictures as they were (not a mixed set)."""
    import ddpm.sample
    ckpt = train(ci_config(tmp_path / "run", "train.steps=1"), progress=False)

    def full_disk(frames):
        def write(f):
            f.write(b"GIF89a")
            raise OSError(28, "No space left on device")
        return write
    monkeypatch.setattr(ddpm.sample, "write_gif", full_disk)
    args = ["--ckpt", str(ckpt), "--n", "4", "--sampler", "ddim", "--steps", "2"]
    out = tmp_path / "new" / "pictures"
    line = assert_one_line_error(run_sample_main(capsys, monkeypatch, *args, "--out", str(out)), "sample.py")
    assert line.endswith("denoising.gif (No space left on device); free space or pass another --out")
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    old.mkdir()
    names = ("samples.png", "denoising.gif", "forward.png")
    for name in names:
        (old / name).write_bytes(b"old")
    assert_one_line_error(run_sample_main(capsys, monkeypatch, *args, "--out", str(old)), "sample.py")
    assert sorted(p.name for p in old.iterdir()) == sorted(names)
    assert all((old / name).read_bytes() == b"old" for name in names)


def test_train_cli_refuses_an_occupied_out_dir(tmp_path):
    train(ci_config(tmp_path / "run", "train.steps=1"), progress=False)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    line = assert_one_line_error(run_cli("train.py", "--config", "configs/ci.yaml", f"train.out_dir={tmp_path / 'run'}"), "train.py")
    assert "already holds a run" in line and "--resume" in line
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before  # no lost work


def test_sample_cli_bad_checkpoints(tmp_path, capsys, monkeypatch):
    """The first case runs sample.py as a process; the others call its main() here, the same code
    from argument parsing to the one-line error and exit status 2."""
    ckpt = train(ci_config(tmp_path / "run", "train.steps=1"), progress=False)

    def error_of(*args):
        return assert_one_line_error(run_sample_main(capsys, monkeypatch, *args), "sample.py")

    line = assert_one_line_error(run_cli("sample.py", "--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path)), "sample.py")
    assert "does not exist" in line
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    line = error_of("--ckpt", str(truncated), "--out", str(tmp_path))
    assert "truncated" in line
    truncated.write_bytes(ckpt.read_bytes()[:len(ckpt.read_bytes()) // 2])
    line = error_of("--ckpt", str(truncated), "--out", str(tmp_path))
    # torch's reason, clipped after a sentence or a word (it used to end "This is an interna"); its
    # wording differs between torch versions
    with pytest.raises(RuntimeError) as reason:
        torch.load(truncated, weights_only=True)
    assert f"cannot be read (RuntimeError: {config.clip(str(reason.value))}); it is truncated" in line, line
    state = torch.load(ckpt, weights_only=True)
    state["config"]["model"]["base_channels"] = 16
    mismatched = tmp_path / "mismatched.pt"
    torch.save(state, mismatched)
    line = error_of("--ckpt", str(mismatched), "--out", str(tmp_path))
    assert "does not match the model" in line
    result = run_sample_main(capsys, monkeypatch, "--ckpt", str(ckpt), "--out", str(tmp_path), "--n", "0")
    assert "--n" in assert_one_line_error(result, "sample.py") and len(result.stderr.strip().splitlines()) == 1
    assert "--n 100000 is more than one grid holds (1024)" in error_of("--ckpt", str(ckpt), "--out", str(tmp_path),
                                                                       "--n", "100000")
    state = torch.load(ckpt, weights_only=True)
    state["config"]["sample"]["num_images"] = 2000  # allowed in configs: evaluate.py and training ignore it
    torch.save(state, tmp_path / "big-grid.pt")
    assert "the checkpoint's sample.num_images=2000 is more than one grid holds" in error_of(
        "--ckpt", str(tmp_path / "big-grid.pt"), "--out", str(tmp_path))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "cannot be read (EOFError" in error_of("--ckpt", str(empty), "--out", str(tmp_path))
    assert "is a directory" in error_of("--ckpt", str(tmp_path), "--out", str(tmp_path))
    state = torch.load(ckpt, weights_only=True)
    state["config"]["model"]["attention_resolutions"] = []  # weights left over, none missing a shape
    torch.save(state, mismatched)
    assert "does not match the model" in error_of("--ckpt", str(mismatched), "--out", str(tmp_path))
    for step in ("abc", True):
        state = torch.load(ckpt, weights_only=True)
        state["step"] = step
        torch.save(state, tmp_path / "bad-step.pt")
        assert f"step count of {step!r}" in error_of("--ckpt", str(tmp_path / "bad-step.pt"), "--out", str(tmp_path))
    state = torch.load(ckpt, weights_only=True)
    del state["rng"]
    torch.save(state, tmp_path / "no-rng.pt")
    assert "not a checkpoint of this toolkit (missing keys)" in error_of("--ckpt", str(tmp_path / "no-rng.pt"),
                                                                         "--out", str(tmp_path))
    # the options of the other sampler, and outputs that cannot be written, fail before any sampling
    line = error_of("--ckpt", str(ckpt), "--out", str(tmp_path), "--steps", "3")
    assert "--steps is an option of the DDIM sampler, not of DDPM" in line
    assert "--variance is an option of the DDPM sampler" in error_of("--ckpt", str(ckpt), "--out", str(tmp_path),
                                                           "--sampler", "ddim", "--variance", "posterior")
    (tmp_path / "taken" / "samples.png").mkdir(parents=True)
    line = error_of("--ckpt", str(ckpt), "--out", str(tmp_path / "taken"))
    assert "samples.png is a directory" in line
    if not torch.cuda.is_available():
        line = error_of("--ckpt", str(ckpt), "--out", str(tmp_path), "--cuda-graph", "enabled")
        assert "needs a CUDA device" in line
    line = error_of("--ckpt", str(ckpt), "--out", str(tmp_path), "--device", "gpu")
    assert "unknown device 'gpu'" in line
    assert f"--out {truncated} is a file" in error_of("--ckpt", str(ckpt), "--out", str(truncated))
    line = error_of("--ckpt", str(ckpt), "--out", str(truncated / "pictures"))
    assert "cannot use" in line and "--out" in line
    # Ctrl-C or SIGTERM while sampling: exit status 130 / 143, and no empty --out dir left behind
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def terminated(*args, **kwargs):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, handler)  # else the signal ends pytest
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    handler = signal.getsignal(signal.SIGTERM)
    for stop, status in ((interrupted, 130), (terminated, 143)):
        with monkeypatch.context() as patched:
            patched.setattr(Diffusion, "sample", stop)
            out = tmp_path / "new" / "pictures"
            assert run_sample_main(capsys, patched, "--ckpt", str(ckpt), "--out", str(out)).returncode == status
        assert not (tmp_path / "new").exists()
        assert signal.getsignal(signal.SIGTERM) is handler
    state = torch.load(ckpt, weights_only=True)
    state["ema"] = [1, 2]
    malformed = tmp_path / "malformed.pt"
    torch.save(state, malformed)
    line = error_of("--ckpt", str(malformed), "--out", str(tmp_path))
    assert "does not match the model" in line
    pickled = tmp_path / "pickled.pt"  # pickle's protocol 4 made torch warn before the error
    pickled.write_bytes(pickle.dumps({"model": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = error_of("--ckpt", str(pickled), "--out", str(tmp_path))
    assert "cannot be read (torch's weights-only unpickler refused it)" in line and not caught, \
        [str(w.message) for w in caught]
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole module, not its state
    line = error_of("--ckpt", str(tmp_path / "module.pt"), "--out", str(tmp_path))
    assert "holds Python objects besides tensors" in line
    bare = tmp_path / "bare.pt"  # a bare state dict, as torch.save(model.state_dict()) writes
    torch.save(torch.load(ckpt, weights_only=True)["model"], bare)
    line = error_of("--ckpt", str(bare), "--out", str(tmp_path))
    assert "not a checkpoint of this toolkit" in line
    state = torch.load(ckpt, weights_only=True)
    state["format_version"] = 99
    future = tmp_path / "future.pt"
    torch.save(state, future)
    line = error_of("--ckpt", str(future), "--out", str(tmp_path))
    assert "format version 99" in line


def _trainer(tmp_path, *overrides):
    cfg = ci_config(tmp_path / "unused", *overrides)
    return Trainer(cfg, "cpu", data.load_digits(cfg.data).images)


def test_optimizer_warmup_and_clipping_are_the_configs(tmp_path):
    trainer = _trainer(tmp_path, "train.lr=0.002", "train.warmup_steps=4", "train.adam_betas=[0.8,0.95]",
                       "train.weight_decay=0.01", "train.grad_clip=0.001")
    group = trainer.opt.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.01
    lrs = []
    for step in range(6):
        lrs.append(group["lr"])  # the rate this step uses
        trainer.step(step)
        # the gradients the optimizer stepped with (on the CPU, Adam leaves them in .grad)
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.net.parameters()])
        assert abs(norm.item() - 0.001) < 1e-6, norm
    # linear warmup over train.warmup_steps steps: step k runs at lr * (k + 1) / warmup, then lr
    assert lrs == pytest.approx([0.0005, 0.001, 0.0015, 0.002, 0.002, 0.002])
    assert _trainer(tmp_path, "train.lr=0.002", "train.warmup_steps=0").opt.param_groups[0]["lr"] == 0.002
    unclipped = _trainer(tmp_path)
    unclipped.step(0)
    assert torch.nn.utils.get_total_norm([p.grad for p in unclipped.net.parameters()]) > 0.01


def test_fp16_gradients_are_clipped_unscaled(tmp_path):
    """With the GradScaler (fp16) the clip applies to the true gradients: unscaled first."""
    trainer = _trainer(tmp_path, "train.precision=fp16", "train.grad_clip=0.001")
    assert trainer.scaler.is_enabled()
    for step in range(2):
        trainer.step(step)
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.net.parameters()])
        assert abs(norm.item() - 0.001) < 1e-6, norm


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_the_training_step_runs_the_unet_in_its_precision(tmp_path, precision, dtype):
    trainer = _trainer(tmp_path, f"train.precision={precision}")
    seen = []
    conv = next(m for m in trainer.net.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    trainer.step(0)
    assert seen == [dtype]
    assert trainer.scaler.is_enabled() == (precision == "fp16")  # loss scaling for fp16 alone


@pytest.mark.parametrize("warmup, decay", [("false", 0.9), ("true", 2 / 11)])
def test_each_step_moves_the_ema_weights_by_its_decay(tmp_path, warmup, decay):
    """The second update's decay: train.ema_decay, or with the warm-up (the default) (1 + 1) / (10 + 1)."""
    trainer = _trainer(tmp_path, "train.ema_decay=0.9", f"train.ema_warmup={warmup}")
    ema = dict(trainer.ema.module.named_parameters())
    trainer.step(0)
    first = {name: p.detach().clone() for name, p in trainer.net.named_parameters()}
    for name, p in first.items():  # the first update copies the weights
        assert torch.equal(ema[name], p), name
    trainer.step(1)
    moved = 0
    for name, p in trainer.net.named_parameters():
        torch.testing.assert_close(ema[name], decay * first[name] + (1 - decay) * p.detach(), msg=name)
        moved += not torch.equal(p, first[name])
    assert moved > 0


def test_grad_scaler_state_survives_a_resume(tmp_path):
    trainer = _trainer(tmp_path, "train.precision=fp16")
    trainer.step(0)
    trainer.scaler.update(new_scale=1024.0)
    state = trainer.state_dict(1)
    resumed = _trainer(tmp_path, "train.precision=fp16")
    resumed.load_state_dict(state, "checkpoint.pt")
    assert resumed.scaler.get_scale() == 1024.0


@pytest.mark.parametrize("fused_then,fused_now", [(False, True), (True, False)])
def test_adam_runs_as_the_resuming_device_has_it(tmp_path, monkeypatch, fused_then, fused_now):
    """Adam is fused on CUDA, not on a CPU. A checkpoint's optimizer keeps the flag it ran with: a
    CPU run resumed on CUDA in fp16 (a T4's default) had a non-fused Adam handed the GradScaler's
    grad_scale, and failed at its first step. CPU Adam fused stands in for CUDA's here."""
    torch_adam = torch.optim.Adam

    def adam(fused):
        return lambda *args, **kwargs: torch_adam(*args, **{**kwargs, "fused": fused})
    monkeypatch.setattr(torch.optim, "Adam", adam(fused_then))
    trainer = _trainer(tmp_path, "train.precision=fp16")
    trainer.step(0)
    state = trainer.state_dict(1)
    monkeypatch.setattr(torch.optim, "Adam", adam(fused_now))
    resumed = _trainer(tmp_path, "train.precision=fp16")
    resumed.load_state_dict(state, "checkpoint.pt")
    assert torch.isfinite(resumed.step(1))
    assert [group["fused"] for group in resumed.opt.param_groups] == [fused_now]


def test_logged_loss_is_the_mean_of_each_window(tmp_path, capsys):
    """Windows of log_every steps, the last one shorter: each line is the mean of its own steps."""
    trainer = _trainer(tmp_path)
    losses = [trainer.step(step).item() for step in range(7)]
    train(ci_config(tmp_path / "run", "train.steps=7", "train.log_every=5"), progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    logged = [float(line.split("loss ")[1].split()[0]) for line in lines]
    assert [line.split()[1] for line in lines] == ["5/7", "7/7"]
    assert logged == pytest.approx([sum(losses[:5]) / 5, sum(losses[5:]) / 2], abs=6e-5)


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    """make train on a run dir that holds a checkpoint resumes it: a finished run stays as it is."""
    ckpt = train(ci_config(tmp_path / "run", "train.steps=2"), progress=False)
    before = ckpt.read_bytes()
    assert train(ci_config(tmp_path / "run", "train.steps=2"), resume=True, progress=False) == ckpt
    assert ckpt.read_bytes() == before


def test_a_checkpoint_write_that_fails_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = train(ci_config(tmp_path / "run", "train.steps=1"), progress=False)
    before = ckpt.read_bytes()
    state = checkpoint.load(ckpt)

    def write_half_then_fail(obj, f, *args, **kwargs):
        f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    def zip_writer_fails(obj, f, *args, **kwargs):  # torch.save's own report of a full disk
        try:
            write_half_then_fail(obj, f)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    def a_bug(obj, f, *args, **kwargs):
        raise RuntimeError("not a write error")

    for save in (write_half_then_fail, zip_writer_fails):
        monkeypatch.setattr(torch, "save", save)
        with pytest.raises(checkpoint.WriteError, match=r"cannot write .*checkpoint.pt \(No space left on device\)$"):
            checkpoint.save(state, ckpt)
        assert ckpt.read_bytes() == before and sorted(p.name for p in ckpt.parent.iterdir()) == sorted(
            ["checkpoint.pt", "config.yaml", "tb"])
    monkeypatch.setattr(torch, "save", a_bug)
    with pytest.raises(RuntimeError, match="not a write error"):  # not said to be the disk's fault
        checkpoint.save(state, ckpt)


def test_a_full_disk_stops_training_in_one_line_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    def second_save_fails(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", second_save_fails)
    out = tmp_path / "run"
    with pytest.raises(checkpoint.WriteError, match=r"cannot write .*checkpoint.pt \(No space left on device\) at "
                                                    r"step 4; it keeps the last checkpoint: free space, then continue "
                                                    r"with --resume"):
        train(ci_config(out, "train.steps=6", "train.checkpoint_every=2"), progress=False)
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "tb"]


def test_tensorboard_on_a_full_disk_stops_with_a_note_and_training_goes_on(tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter
    calls = []

    def full(self, *args, **kwargs):
        calls.append(args[0])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    ckpt = train(ci_config(tmp_path / "run", "train.steps=4", "train.log_every=1"), progress=False)
    assert checkpoint.load(ckpt)["step"] == 4 and calls == ["train/loss"]  # off after the first failure
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: TensorBoard stopped: cannot write {tmp_path / 'run' / 'tb'} (No space left on device); "
                     f"training goes on"]


def test_a_first_checkpoint_that_cannot_be_written_says_none_was(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(checkpoint.WriteError, match="at step 1; none was written: free space, then start again with --overwrite"):
        train(ci_config(tmp_path / "run", "train.steps=1"), progress=False)


def test_tensorboard_that_cannot_start_is_a_note_and_training_goes_on(tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(SummaryWriter, "__init__", full)
    ckpt = train(ci_config(tmp_path / "run", "train.steps=2", "train.log_every=1"), progress=False)
    assert checkpoint.load(ckpt)["step"] == 2
    assert "note: TensorBoard stopped" in capsys.readouterr().err


def test_a_run_dir_that_cannot_be_started_is_not_left_half_made(tmp_path, monkeypatch):
    """A full disk when the config is written: no dir made and no empty config.yaml, which would
    have the next start refused as a run that stopped before its first checkpoint."""
    real_write = checkpoint.write_atomically

    def full(path, write):
        raise checkpoint.WriteError(f"cannot write {path} (No space left on device)")
    monkeypatch.setattr(checkpoint, "write_atomically", full)
    out = tmp_path / "new" / "run"
    with pytest.raises(checkpoint.WriteError, match="config.yaml"):
        train(ci_config(out, "train.steps=1"), progress=False)
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(checkpoint, "write_atomically", real_write)
    assert checkpoint.load(train(ci_config(out, "train.steps=1"), resume="if-present", progress=False))["step"] == 1


@pytest.fixture
def fails_instead_of_waiting():
    """A lock taken without LOCK_NB would wait for ever, and a SIGTERM would not end it (the run's
    handler takes the first): fail after 60 s instead."""
    def waited(signum, frame):
        raise RuntimeError("waited 60 s: a lock blocked instead of being refused at once")
    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_two_runs_in_one_run_dir_the_second_stops_before_writing(tmp_path, fails_instead_of_waiting):
    """Both passed the run-dir check before either wrote: the one that takes its first step second
    finds the dir locked, or (the first has ended) holding a run, and stops before it writes."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another run is training in .*run; wait for it to end"):
            train(ci_config(out, "train.steps=1"), progress=False)
    finally:
        os.close(holder)
    assert list(out.iterdir()) == []
    cfg = ci_config(out, "train.steps=1")
    (out / "config.yaml").write_text(config.to_yaml(cfg))  # the other run's, written after this one's check
    with pytest.raises(UserError, match="another run started in .*run while this one was setting up"):
        ddpm.train.start_out_dir(cfg, replace=False, fresh=True)
    os.close(ddpm.train.start_out_dir(cfg, replace=False, fresh=False))  # a resumed run's own dir
    train(ci_config(out, "train.steps=1"), overwrite=True, progress=False)  # and the lock is let go at the end
    lock = ddpm.train.start_out_dir(cfg, replace=False, fresh=False)
    try:
        assert ddpm.train.lock_run_dir(out) == (None, True)  # exclusive: not shared with another run
    finally:
        os.close(lock)


def test_a_file_system_without_locks_trains_unlocked_with_a_note(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert checkpoint.load(train(ci_config(tmp_path / "run", "train.steps=1"), progress=False))["step"] == 1
    assert f"note: cannot lock {tmp_path / 'run'} (No locks available)" in capsys.readouterr().err


def test_a_run_from_before_the_ema_warmup_resumes_without_it(tmp_path):
    """Its checkpoint's config has no train.ema_warmup: read as false (the rule it trained with), so
    resuming it under the new default is refused as other settings, not silently switched."""
    ckpt = train(ci_config(tmp_path / "run", "train.steps=1"), progress=False)
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["train"]["ema_warmup"]
    torch.save(state, ckpt)
    assert checkpoint.config_of(checkpoint.load(ckpt), ckpt).train.ema_warmup is False
    with pytest.raises(UserError, match=r"other settings \(train.ema_warmup\)"):
        train(ci_config(tmp_path / "run", "train.steps=2"), resume=True, progress=False)
    resumed = train(ci_config(tmp_path / "run", "train.steps=2", "train.ema_warmup=false"), resume=True, progress=False)
    assert checkpoint.load(resumed)["step"] == 2


def test_temporaries_of_killed_writes_are_removed(tmp_path):
    """A write killed with SIGKILL leaves its .NAME.tmpPID@HOST; the next run's start removes this
    host's whose process has gone, not a live process's nor another host's."""
    import socket
    host = socket.gethostname()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = [f".checkpoint.pt.tmp{int(gone.stdout)}@{host}", f".checkpoint.pt.tmp{os.getppid()}@{host}",
             f".x.tmp{os.getpid()}@{host}", f".checkpoint.pt.tmp{int(gone.stdout)}@another-host",
             f".x.tmp{10 ** 30}@{host}", "notes.tmp1"]
    for name in names:
        (tmp_path / name).write_bytes(b"half")
    checkpoint.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    checkpoint.write_atomically(tmp_path / "checkpoint.pt", lambda f: f.write(b"whole"))  # its own name's pattern
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"whole" and len(list(tmp_path.iterdir())) == len(names)
    # the temporary a write really makes is one the clean-up finds (at a run's start)
    temporaries = []
    checkpoint.write_atomically(tmp_path / "checkpoint.pt", lambda f: temporaries.append(Path(f.name).name))
    (tmp_path / temporaries[0].replace(f"tmp{os.getpid()}@", f"tmp{int(gone.stdout)}@")).write_bytes(b"half")
    run = ci_config(tmp_path, "train.steps=1")
    os.close(ddpm.train.start_out_dir(run, replace=True, fresh=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[1:], "config.yaml"])


def test_an_atomic_write_syncs_the_file_renames_it_then_syncs_the_dir(tmp_path, monkeypatch):
    """So that a crash or power loss leaves the old file or the whole new one; a file system that
    cannot sync a directory (some network ones) has still written the file."""
    import errno
    import stat
    events, fsync, replace = [], os.fsync, os.replace

    def recorded_fsync(fd):
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        events.append(("fsync", "dir" if is_dir else "file"))
        if is_dir and dir_sync_fails:
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)
    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace",)) or replace(a, b))
    for dir_sync_fails in (False, True):
        events.clear()
        checkpoint.write_atomically(tmp_path / "a", lambda f: f.write(b"new"))
        assert events == [("fsync", "file"), ("replace",), ("fsync", "dir")]
        assert (tmp_path / "a").read_bytes() == b"new"


def test_sample_cli_options_reach_the_sampler(tmp_path, monkeypatch):
    """Every sample.py option lands in the config the sampler runs, and --raw-weights picks the raw weights."""
    import runpy
    ckpt = train(ci_config(tmp_path / "run", "train.steps=2"), progress=False)
    state = checkpoint.load(ckpt)
    main = runpy.run_path(str(ROOT / "sample.py"))["main"]
    calls = []
    monkeypatch.setitem(main.__globals__, "write_samples",
                        lambda net, cfg, out, device, n, seed, progress: calls.append((net, cfg, n, seed, progress)) or {})

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "o"), *args])
        main()
        return calls[-1]

    net, cfg, n, seed, progress = run()
    s = cfg.sample
    assert (s.sampler, s.eta, s.variance, s.clip_x0, n, seed, progress) == ("ddpm", 0.0, "beta", True, 64, 0, True)
    assert all(torch.equal(v, state["ema"][k]) for k, v in net.state_dict().items())
    net, cfg, n, seed, progress = run("--n", "3", "--sampler", "ddim", "--steps", "7", "--eta", "0.5",
                            "--no-clip", "--precision", "fp16", "--compile", "default", "--cuda-graph", "disabled", "--streams", "3",
                            "--raw-weights", "--seed", "5", "--device", "cpu", "--no-progress")
    s = cfg.sample
    assert (s.sampler, s.steps, s.eta, s.clip_x0, s.precision, s.compile, s.cuda_graph, s.streams) == \
        ("ddim", 7, 0.5, False, "fp16", "default", "disabled", 3)
    assert (n, seed, progress) == (3, 5, False)
    assert all(torch.equal(v, state["model"][k]) for k, v in net.state_dict().items())
    assert not all(torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])  # the two differ
    assert run("--variance", "posterior")[1].sample.variance == "posterior"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here (the GPU check runs pytest alone)")
def test_make_train_asks_train_py_to_continue_a_run_dir_that_holds_a_checkpoint():
    """--resume-if-present, unless ARGS says --overwrite or --resume; train.py finds the run dir
    (ARGS may name another config, or a path with a space); a dry run of the command."""
    def train_command(args):
        result = subprocess.run(["make", "-n", "-o", ".venv/.installed", f"PYTHON={sys.executable}", "train",
                                 "CONFIG=configs/ci.yaml", f"ARGS={args}"], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return next(line for line in result.stdout.splitlines() if "train.py" in line).split()
    assert "--resume-if-present" in train_command("train.steps=3")
    assert train_command("--overwrite train.steps=3")[-2:] == ["--overwrite", "train.steps=3"]
    assert "--resume-if-present" not in train_command("--resume") and "--resume" in train_command("--resume")


def test_resume_if_present_starts_a_run_then_continues_it(tmp_path):
    run = tmp_path / "my run"
    first = checkpoint.load(train(ci_config(run, "train.steps=2"), resume="if-present", progress=False))
    assert first["step"] == 2
    assert checkpoint.load(train(ci_config(run, "train.steps=3"), resume="if-present", progress=False))["step"] == 3
    # a run it did not ask to resume: the refusal says how to replace it as well
    with pytest.raises(config.UserError, match=r"other settings \(train.lr\); resume with the same config, replace it "
                                        r"with --overwrite or choose another train.out_dir"):
        train(ci_config(run, "train.steps=4", "train.lr=0.01"), resume="if-present", progress=False)
    with pytest.raises(config.UserError, match=r"other settings \(train.lr\); resume with the same config or choose"):
        train(ci_config(run, "train.steps=4", "train.lr=0.01"), resume=True, progress=False)
    # with --overwrite (the Python API allows both) a dir without a checkpoint is cleared as --overwrite clears it
    stopped = tmp_path / "stopped"
    (stopped / "tb").mkdir(parents=True)
    (stopped / "tb" / "events.old").write_text("")
    (stopped / "config.yaml").write_text("")
    train(ci_config(stopped, "train.steps=1"), resume="if-present", overwrite=True, progress=False)
    assert not (stopped / "tb" / "events.old").exists()


def test_train_py_passes_resume_if_present_on(monkeypatch):
    import runpy
    main = runpy.run_path(str(ROOT / "train.py"))["main"]
    calls = []
    monkeypatch.setitem(main.__globals__, "train", lambda cfg, **kwargs: calls.append(kwargs) or Path("x"))
    for flag, resume in (("--resume-if-present", "if-present"), ("--resume", True), (None, False)):
        monkeypatch.setattr(sys, "argv", ["train.py", "--config", "configs/ci.yaml", *([flag] if flag else [])])
        main()
        assert calls[-1]["resume"] == resume
    monkeypatch.setattr(sys, "argv", ["train.py", "--overwrite", "--resume-if-present"])
    with pytest.raises(SystemExit):
        main()


def test_tensorboard_gets_each_windows_mean_loss_the_scheduled_lr_the_speed_and_the_grid(tmp_path, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    closed, close = [], SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: closed.append(1) or close(self))
    monkeypatch.setattr(ddpm.train, "sample_grid", lambda *args, **kwargs: torch.zeros(16, 1, 32, 32))
    train(ci_config(tmp_path / "run", "train.steps=4", "train.log_every=2", "train.warmup_steps=4", "train.lr=0.002",
                    "train.sample_every=4"), progress=False)
    assert closed == [1]
    printed = [float(line.split()[3]) for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [step for step, _ in scalars["train/loss"]] == [2, 4]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx(printed, abs=1e-4)
    # the rate of the step that follows: warmup's (k + 1) / 4 after k steps, then the full rate
    assert scalars["train/lr"] == [(2, pytest.approx(0.0015)), (4, pytest.approx(0.002))]
    assert [step for step, value in scalars["train/images_per_s"] if value > 0] == [2, 4]
    assert [e.step for e in events.Images("samples/ema_ddim50")] == [4]


def test_the_training_grid_is_ddim50_from_the_same_noise_every_time(monkeypatch):
    from ddpm import model
    from ddpm.train import sample_grid
    cfg = ci_config("unused")
    torch.manual_seed(0)
    net = model.build(cfg).eval()
    diffusion = Diffusion.from_config(cfg.diffusion)
    plans = []
    ddim_plan = diffusion.ddim_plan
    monkeypatch.setattr(diffusion, "ddim_plan", lambda steps, eta: plans.append((steps, eta)) or ddim_plan(steps, eta))
    with torch.no_grad():
        first = sample_grid(net, diffusion, 32, n=2)
        torch.manual_seed(123)  # the global RNG plays no part
        second = sample_grid(net, diffusion, 32, n=2)
    assert torch.equal(first, second) and plans == [(50, 0.0), (50, 0.0)]
