"""DDP on CPU: torchrun with gloo and two processes."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ddpm import checkpoint, config, data, distributed
from ddpm.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args, status: int = 0):
    """`make train NPROC=nproc`'s launcher (ddpm.distributed: torchrun, failures in one line)."""
    result = subprocess.run([sys.executable, "-m", "ddpm.distributed", "--standalone", f"--nproc_per_node={nproc}",
                             *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == status, result.stderr[-3000:]
    return result


def patched_train(path: Path, patch: str) -> Path:
    """A script for torchrun that runs `patch` (Python source) in each worker, then train.py."""
    path.write_text(patch + "import runpy, sys\n"
                            "sys.argv[0] = 'train.py'\n"
                            "runpy.run_path('train.py', run_name='__main__')\n")
    return path


def test_two_ranks_stay_identical_and_match_one_process_on_the_global_batch(tmp_path):
    torchrun(2, "tests/ddp_worker.py", tmp_path, 5)
    torchrun(1, "tests/ddp_worker.py", tmp_path, 5)
    load = lambda name: torch.load(tmp_path / f"{name}.pt")  # noqa: E731
    rank0, rank1, single, init = load("world2-rank0"), load("world2-rank1"), load("world1-rank0"), load("init-world1-rank0")
    assert not all(torch.equal(init[name], single[name]) for name in single)  # training moved the weights
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name
    # The averaged gradient of two half batches is the gradient of the whole batch.
    grads0, grads1, grads_single = load("grads-world2-rank0"), load("grads-world2-rank1"), load("grads-world1-rank0")
    for name, g in grads_single.items():
        assert torch.equal(grads0[name], grads1[name]), name
        torch.testing.assert_close(grads0[name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item() + 1e-9)
    # Weights after 5 Adam steps agree to a few lr-sized steps at most: Adam divides by sqrt(v), so
    # near-zero gradients that differ only by summation order move by up to lr (1e-3) a step.
    for name in single:
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=5e-3)


def test_ddp_around_the_compiled_unet_trains_as_the_eager_ddp_run(tmp_path, monkeypatch):
    """The CUDA default under NPROC=2: DDP wraps the compiled UNet (one graph per rank, no recompile)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    (tmp_path / "eager").mkdir()
    (tmp_path / "compiled").mkdir()
    torchrun(2, "tests/ddp_worker.py", tmp_path / "eager", 3)
    result = torchrun(2, "tests/ddp_worker.py", tmp_path / "compiled", 3, "train.compile=default")
    # DDP's false alarm over the input convolution's gradient strides, and its deprecation of
    # broadcast_buffers (torch >= 2.13), are not printed at every run
    assert "Grad strides do not match" not in result.stderr and "broadcast_buffers" not in result.stderr, result.stderr
    load = lambda run, name: torch.load(tmp_path / run / f"{name}.pt")  # noqa: E731
    for rank in (0, 1):
        assert (tmp_path / "compiled" / f"graphs-world2-rank{rank}.txt").read_text() == "1"
        assert (tmp_path / "eager" / f"graphs-world2-rank{rank}.txt").read_text() == "0"
    grads, compiled_grads = load("eager", "grads-world2-rank0"), load("compiled", "grads-world2-rank0")
    # the first step's all-reduced gradients, summed in another order; the absolute tolerance is for the
    # gradients that are zero but for rounding (biases before a GroupNorm), scaled to the largest gradient
    scale = max(g.abs().max().item() for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-4, atol=1e-6 * scale)
    eager, compiled, compiled1 = load("eager", "world2-rank0"), load("compiled", "world2-rank0"), load("compiled", "world2-rank1")
    for name, w in eager.items():
        assert torch.equal(compiled[name], compiled1[name]), name
        # Adam moves a weight whose gradient is zero but for rounding by up to lr (1e-3) a step, either
        # way: two runs part by up to 2 lr a step
        torch.testing.assert_close(compiled[name], w, rtol=0, atol=2 * 1e-3 * 3)


def test_ddp_run_resumes_with_another_world_size(tmp_path):
    out = tmp_path / "run"
    common = ["--config", "configs/ci.yaml", "--no-progress", f"train.out_dir={out}", "train.batch_size=8"]
    result = torchrun(2, "train.py", *common, "train.steps=4")
    assert "training on 2 x cpu" in result.stderr and result.stdout.count("done:") == 1, result.stdout
    # rank 0 alone checks the run dir: its error, and rank 1 exits with it (not in a broken collective)
    refused = torchrun(2, "train.py", *common, "train.steps=6", status=2)
    assert refused.stderr.splitlines() == [f"train.py: error: {out} already holds a run; pass --resume to continue it, "
                                           "--overwrite to replace it, or set train.out_dir to another directory"]
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 4
    # rank 0 logs the global batch's loss (summed across the ranks), as one process would
    single = subprocess.run([sys.executable, "train.py", *common, f"train.out_dir={tmp_path / 'single'}", "train.steps=4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    logged = [float(next(line for line in r.stderr.splitlines() if line.startswith("step 4/4")).split()[3])
              for r in (result, single)]
    assert abs(logged[0] - logged[1]) <= 2e-4, logged
    result = subprocess.run([sys.executable, "train.py", *common, "train.steps=6", "--resume"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 6
    # and back to two: rank 0 reads the checkpoint and the data and sends them to rank 1
    torchrun(2, "train.py", *common, "train.steps=8", "--resume")
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 8


def test_ddp_in_a_process_group_of_one_takes_the_plain_steps():
    """What the benchmarks' ddp variants measure on one GPU: the UNet in DDP (hooks, buckets, an
    all-reduce over one rank) computes the plain step's losses and weights."""
    cfg = config.load("configs/ci.yaml", ["train.batch_size=8"])
    images = data.load_offline_subset().images[:96]
    device = torch.device("cpu")

    def run(ddp):
        trainer = Trainer(cfg, device, images, ddp=ddp)
        assert isinstance(trainer.forward, torch.nn.parallel.DistributedDataParallel) == ddp
        return [trainer.step(step) for step in range(3)], trainer.net.state_dict()

    losses, weights = run(False)
    with distributed.solo_group(device):
        with pytest.raises(RuntimeError, match="already initialized"), distributed.solo_group(device):
            pass
        ddp_losses, ddp_weights = run(True)
    assert not dist.is_initialized()
    assert torch.equal(torch.stack(ddp_losses), torch.stack(losses))
    for name, w in weights.items():
        assert torch.equal(ddp_weights[name], w), name


def test_bad_input_under_torchrun_is_one_line(tmp_path):
    """Every rank meets a bad override: local rank 0 alone prints it, and the launcher adds none of
    torchrun's traceback and failure table. Local rank 0 starts 2 s late here: the quiet rank must
    not exit first, or torchrun stops local rank 0 before it has printed."""
    late = patched_train(tmp_path / "late_train.py", "import os, time\n"
                                                     "if os.environ['LOCAL_RANK'] == '0':\n"
                                                     "    time.sleep(2)\n")
    result = torchrun(2, late, "--config", "configs/ci.yaml", f"train.out_dir={tmp_path / 'run'}", "train.lr=5",
                      status=2)
    assert result.stderr.splitlines() == ["train.py: error: train.lr must lie in (0, 1], got 5.0"]
    assert not (tmp_path / "run").exists()
    assert torchrun(0, "train.py", status=2).stderr.splitlines() == [
        "torchrun: error: --nproc_per_node=0: no processes to start; pass a count >= 1"]


def test_rank_0s_error_is_said_on_every_node(tmp_path):
    """Rank 0 alone checks the run dir: two nodes of one process each (two launchers on this
    machine, torchrun's c10d rendezvous), and the other node's process says rank 0's error too."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "file").write_text("")
    nodes = [subprocess.Popen([sys.executable, "-m", "ddpm.distributed", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               f"--rdzv_conf=is_host={str(node == 0).lower()}", "--rdzv_id=two-nodes", "train.py",
                               "--config", "configs/ci.yaml", f"train.out_dir={tmp_path / 'file' / 'run'}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    said = [node.communicate(timeout=120)[1].strip() for node in nodes]
    assert [node.returncode for node in nodes] == [2, 2]
    error = (f"train.out_dir {tmp_path / 'file' / 'run'} cannot be a run dir: {tmp_path / 'file'} is a file; "
             "choose another train.out_dir")
    assert sorted(lines.splitlines()[0] for lines in said) == \
        [f"train.py: error: rank 0: {error}", f"train.py: error: {error}"], said
    # After it, the other node may log torch's own warnings about the rendezvous host gone before it
    # shut down (c10d's TCPStore, dynamic_rendezvous), as the timing falls; not torchrun's traceback
    # or failure table
    for lines in said:
        assert not any(noise in lines for noise in ("Traceback", "ChildFailedError", "Root Cause")), lines


def test_a_diverged_run_is_one_line_and_ends_at_once(tmp_path):
    """Rank 0 reports the divergence; rank 1 waits to be stopped (cli.exit_after_reporter), and
    torchrun's SIGTERM ends it at once, though the training loop's own handler (finish the step,
    save) was still installed: before, it outlived the signal until torchrun's SIGKILL, 30 s on."""
    poisoned = patched_train(tmp_path / "poisoned_train.py",
                             "import torch\n"
                             "from ddpm import cli\n"
                             "from ddpm.train import Trainer\n"
                             "cli.QUIET_EXIT_WAIT_S = 120  # what stops rank 1 is torchrun, not the wait's end\n"
                             "step = Trainer.step\n"
                             "def poisoned(self, i):\n"
                             "    loss = step(self, i)\n"
                             "    with torch.no_grad():\n"
                             "        next(self.net.parameters()).fill_(float('nan'))\n"
                             "    return loss\n"
                             "Trainer.step = poisoned\n")
    start = time.monotonic()
    result = torchrun(2, poisoned, "--config", "configs/ci.yaml", "--no-progress", f"train.out_dir={tmp_path / 'run'}",
                      status=2)
    assert time.monotonic() - start < 25
    assert result.stderr.splitlines()[1:] == ["train.py: error: the loss is nan by step 5: training diverged (no "
                                              "checkpoint was written); lower train.lr or set train.grad_clip"]


def test_a_stop_asked_of_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Ctrl-C reaching rank 1 alone (a per-process signal): its vote, summed with the loss window at
    the next log, stops both ranks there; rank 0 saves that step and says so."""
    signalled = patched_train(tmp_path / "signalled_train.py",
                              "import os, signal\n"
                              "from ddpm.train import Trainer\n"
                              "step = Trainer.step\n"
                              "def step_then_signal(self, i):\n"
                              "    if i == 6 and os.environ['RANK'] == '1':\n"
                              "        os.kill(os.getpid(), signal.SIGINT)\n"
                              "    return step(self, i)\n"
                              "Trainer.step = step_then_signal\n")
    result = torchrun(2, signalled, "--config", "configs/ci.yaml", "--no-progress", f"train.out_dir={tmp_path / 'run'}",
                      "train.steps=40", "train.log_every=5", "train.checkpoint_every=100", status=130)
    assert f"stopped by signal after step 10: saved {tmp_path / 'run' / 'checkpoint.pt'}" in result.stderr
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["step"] == 10


def test_every_rank_returns_once_rank_0_has_saved_the_last_checkpoint(tmp_path):
    """train() returns the checkpoint's path on every rank only after rank 0 has written it, here
    3 s late: a rank that returned before would find no file (the write is atomic)."""
    slow = patched_train(tmp_path / "slow_save_train.py",
                         "import os, time\n"
                         "import ddpm.train\n"
                         "from ddpm import checkpoint\n"
                         "save, train = ddpm.train.save_checkpoint, ddpm.train.train\n"
                         "def slow_save(*args):\n"
                         "    time.sleep(3)\n"
                         "    save(*args)\n"
                         "def train_then_read(cfg, **kwargs):\n"
                         "    path = train(cfg, **kwargs)\n"
                         "    step = checkpoint.load(path)['step'] if path.exists() else None\n"
                         "    print(f\"rank {os.environ['RANK']} returned, the checkpoint's step: {step}\", flush=True)\n"
                         "    return path\n"
                         "ddpm.train.save_checkpoint, ddpm.train.train = slow_save, train_then_read\n")
    result = torchrun(2, slow, "--config", "configs/ci.yaml", "--no-progress", f"train.out_dir={tmp_path / 'run'}",
                      "train.steps=4", "train.checkpoint_every=100")
    assert sorted(line for line in result.stdout.splitlines() if line.startswith("rank ")) == [
        "rank 0 returned, the checkpoint's step: 4", "rank 1 returned, the checkpoint's step: 4"], result.stdout


def test_images_per_second_counts_the_global_batch_on_any_world_size(tmp_path):
    """A clock on which a step takes 0.2 s: each window of 5 steps at a global batch of 16 took 1 s,
    so 80 images/s, whether one process took the steps or two took half of each batch."""
    clocked = patched_train(tmp_path / "clocked_train.py",
                            "import time, types\n"
                            "import ddpm.train\n"
                            "clock, step = [0.0], ddpm.train.Trainer.step\n"
                            "def timed_step(self, i):\n"
                            "    clock[0] += 0.2\n"
                            "    return step(self, i)\n"
                            "ddpm.train.Trainer.step = timed_step\n"
                            "ddpm.train.time = types.SimpleNamespace(perf_counter=lambda: clock[0], monotonic=time.monotonic)\n")
    for nproc in (1, 2):
        result = torchrun(nproc, clocked, "--config", "configs/ci.yaml", "--no-progress",
                          f"train.out_dir={tmp_path / f'run{nproc}'}", "train.steps=10", "train.log_every=5")
        speeds = [line.split()[-2] for line in result.stderr.splitlines() if line.startswith("step ")]
        assert speeds == ["80", "80"], result.stderr


def test_a_killed_worker_is_one_line_naming_its_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import os, signal, time\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    os.kill(os.getpid(), signal.SIGKILL)\n"
                      "time.sleep(60)\n")
    result = torchrun(2, script, status=128 + 9)
    assert result.stderr.splitlines() == ["worker.py: rank 1 was killed by SIGKILL (out of memory?)"]


def test_the_launcher_stopped_by_a_signal_exits_with_its_status(monkeypatch):
    """Ctrl-C or SIGTERM to torchrun reaches the workers too (they save and stop): the launcher adds
    nothing to their lines and exits with 128 + the signal's number."""
    import signal

    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    for sig in (signal.SIGINT, signal.SIGTERM):
        def stopped(args, sig=sig):
            raise SignalException(f"Process {os.getpid()} got signal: {sig}", sigval=sig)
        monkeypatch.setattr(torch.distributed.run, "run", stopped)
        assert distributed.launch(["--nproc_per_node=1", "train.py"]) == 128 + sig


def test_each_process_takes_its_local_ranks_gpu_and_talks_nccl(monkeypatch):
    """Rank 3 of 4, the second process of its node: cuda:1, NCCL; on a CPU, gloo."""
    for name, value in (("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen, backends = [], []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", backends.append)
    world, device = distributed.init(torch.device("cuda"))
    assert (world.rank, world.world_size, world.local_rank) == (3, 4, 1)
    assert device == torch.device("cuda", 1) and chosen == [device] and backends == ["nccl"]
    assert distributed.init(torch.device("cpu"))[1] == torch.device("cpu") and backends == ["nccl", "gloo"]


def test_ddp_wraps_with_bucket_view_gradients_and_a_static_graph():
    with distributed.solo_group(torch.device("cpu")):
        ddp = distributed.wrap(torch.nn.Linear(2, 2), torch.device("cpu"))
        assert ddp.gradient_as_bucket_view and ddp.static_graph


def test_more_processes_than_gpus_is_a_user_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(config.UserError, match="2 processes on this node, which has 1 GPU: .* at most 1"):
        distributed.init(torch.device("cuda"))


def test_a_run_dir_write_failing_on_rank_0_stops_every_rank_in_one_line(tmp_path):
    """Rank 0 alone writes the run dir: when its lock is held by another run (at the first step) or a
    checkpoint cannot be written (a full disk, mid-run), rank 0 says why and the other ranks of its
    node exit after it without a word (the first process of another node says it too: on_main),
    instead of failing in the collective rank 0 has left."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = torchrun(2, "train.py", "--config", "configs/ci.yaml", "--no-progress", f"train.out_dir={out}",
                          "train.steps=4", status=2)
    finally:
        os.close(holder)
    assert said(result) == [f"train.py: error: another run is training in {out}; wait for it to end, "
                            f"stop it, or choose another train.out_dir"]
    full = patched_train(tmp_path / "full_disk_train.py",
                         "import torch\n"
                         "real_save, saves = torch.save, []\n"
                         "def save(obj, f, *args, **kwargs):\n"
                         "    saves.append('checkpoint.pt' in str(getattr(f, 'name', '')))\n"
                         "    if sum(saves) == 2 and saves[-1]:  # the second checkpoint\n"
                         "        raise OSError(28, 'No space left on device')\n"
                         "    real_save(obj, f, *args, **kwargs)\n"
                         "torch.save = save\n")
    result = torchrun(2, full, "--config", "configs/ci.yaml", "--no-progress", f"train.out_dir={out}",
                      "train.steps=6", "train.checkpoint_every=2", "train.log_every=2", status=2)
    errors = said(result)
    assert len(errors) == 1 and "No space left on device) at step 4; it keeps the last checkpoint" in errors[0], \
        result.stderr


def said(result) -> list[str]:
    """stderr without the run's own lines (its start, its progress, the offline-data warning)."""
    return [line for line in result.stderr.splitlines() if not line.startswith(("training on ", "step ", "WARNING: "))]
