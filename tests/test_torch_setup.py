"""make setup's choice of torch for the machine (ddpm/torch_setup.py) and what it installs to match."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
import triton

from ddpm import torch_setup
from ddpm.torch_setup import CUDA12_PIN, choose

ROOT = Path(__file__).resolve().parents[1]
TESTED = "torch==2.14.1 torchvision==0.29.1"
KAGGLE_TORCH = ("2.6.0+cu124", "0.21.0+cu124", True)


def test_the_choice_follows_the_pin_then_the_record_then_the_gpus_torch_then_the_driver():
    assert choose("torch==2.9.0 torchvision==0.24.0", "", KAGGLE_TORCH, (12, 4), TESTED)[0] == \
        "torch==2.9.0 torchvision==0.24.0"
    assert choose("", CUDA12_PIN, KAGGLE_TORCH, (13, 0), TESTED)[0] == CUDA12_PIN
    assert choose("", "", KAGGLE_TORCH, (12, 4), TESTED) == \
        ("system", f"{sys.executable}'s torch 2.6.0+cu124 sees the GPU")
    # a torch that sees no GPU, or one older than 2.6, is not used: the driver decides
    assert choose("", "", ("2.6.0+cu124", "0.21.0", False), (12, 4), TESTED)[0] == CUDA12_PIN
    assert choose("", "", ("2.5.1", "0.20.1", True), (12, 8), TESTED)[0] == CUDA12_PIN
    assert choose("", "", None, (13, 0), TESTED)[0] == TESTED
    assert choose("", "", ("2.14.1", "0.29.1", False), None, TESTED)[0] == TESTED  # this CPU machine and CI
    assert choose("system", "", ("2.6.0", "0.21.0", False), None, TESTED)[0] == "system"  # even without a GPU


@pytest.mark.parametrize("pin, recorded", [("system", ""), ("", "system")])
def test_a_system_torch_that_is_not_there_is_refused(pin, recorded):
    for found, have in ((None, "no torch with torchvision"), (("2.5.1", "0.20.1", True), "torch 2.5.1")):
        with pytest.raises(torch_setup.SetupError, match=f"TORCH_PIN=system, but .* has {have}; install torch >= 2.6"):
            choose(pin, recorded, found, (12, 4), TESTED)


def test_a_quoted_system_is_system_and_unbalanced_quotes_are_refused():
    assert torch_setup.normalized('"system"') == torch_setup.normalized(" system ") == "system"
    assert torch_setup.normalized(" torch==2.9.1  torchvision==0.24.1 ") == "torch==2.9.1  torchvision==0.24.1"
    with pytest.raises(torch_setup.SetupError, match="unbalanced quotes"):
        torch_setup.normalized("torch --index-url 'https://x")


def fake_program(tmp_path, name, script):
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def test_it_reads_the_drivers_cuda_from_nvidia_smi_and_the_torch_of_a_python(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert torch_setup.driver_cuda() is None  # no nvidia-smi
    fake_program(tmp_path, "nvidia-smi", "echo '| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |'")
    assert torch_setup.driver_cuda() == (12, 4)
    fake_program(tmp_path, "nvidia-smi", "echo '| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: N/A |'")
    assert torch_setup.driver_cuda() is None
    # whatever else importing torch prints on stdout
    python = fake_program(tmp_path, "python", 'echo "a warning"; echo "torch-setup-probe 2.6.0+cu124 0.21.0+cu124 1"; '
                                              'echo "a message at exit"')
    assert torch_setup.probe_torch(str(python)) == KAGGLE_TORCH
    from importlib.metadata import version
    assert torch_setup.probe_torch(sys.executable) == (version("torch"), version("torchvision"),
                                                       torch.cuda.is_available())
    missing = fake_program(tmp_path, "python-without-torch", "echo 'ModuleNotFoundError' >&2; exit 1")
    assert torch_setup.probe_torch(str(missing)) is None


def test_pip_takes_the_constraints_of_the_torch_installed_here(tmp_path):
    """What create() writes from the probe of this python: pip, offline, finds its torch satisfies them."""
    file = tmp_path / "constraints.txt"
    file.write_text(torch_setup.constraints(torch_setup.probe_torch(sys.executable)))
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--dry-run", "--quiet", "-c", str(file),
                             "torch", "torchvision"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def run_create(venv, monkeypatch, pin, found_torch, cuda=None, installed=("2.14.1", "0.29.1", False)):
    """create() with its commands recorded, not run; a command's effect on the venv as `venv` has it."""
    commands = []

    def run(cmd, check):
        commands.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            if "--clear" in cmd:
                shutil.rmtree(venv)
            venv.mkdir(exist_ok=True)
    monkeypatch.setattr(torch_setup.subprocess, "run", run)
    monkeypatch.setattr(torch_setup, "probe_torch", lambda python=sys.executable:
                        found_torch if python == sys.executable else installed)
    monkeypatch.setattr(torch_setup, "driver_cuda", lambda: cuda)
    monkeypatch.setenv("TORCH_PIN", pin)
    torch_setup.create(venv, TESTED)
    return commands


def own_torch(venv):
    (venv / "lib" / "python3.12" / "site-packages" / "torch").mkdir(parents=True, exist_ok=True)


def test_it_installs_the_chosen_pair_and_keeps_a_pin_it_was_given_for_the_next_build(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    pip, make_venv = str(venv / "bin" / "pip"), [sys.executable, "-m", "venv", str(venv)]
    assert run_create(venv, monkeypatch, "", None) == [make_venv, [pip, "--quiet", "install", *TESTED.split()]]
    assert (venv / "torch-constraints.txt").read_text() == "torch==2.14.1\ntorchvision==0.29.1\n"
    assert not (venv / ".torch-pin").exists()  # the tested pair is not kept: a new one in the Makefile applies
    own_torch(venv)
    assert run_create(venv, monkeypatch, "", None) == [make_venv, [pip, "--quiet", "install", *TESTED.split()]]
    # another choice (here, a CUDA 12 driver's): pip would keep the installed torch, so the venv starts again
    assert run_create(venv, monkeypatch, "", None, cuda=(12, 2)) == [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [pip, "--quiet", "install", "torch", "torchvision", "--index-url", "https://download.pytorch.org/whl/cu126"]]
    given = "torch==2.9.1 torchvision==0.24.1 --index-url 'https://download.pytorch.org/whl/cu128'"
    run_create(venv, monkeypatch, given, None, installed=("2.9.1+cu128", "0.24.1+cu128", False))
    assert (venv / ".torch-pin").read_text() == given + "\n"
    assert (venv / "torch-constraints.txt").read_text() == "torch==2.9.1+cu128\ntorchvision==0.24.1+cu128\n"
    # a rebuild not told the pin (a later `make train` after a change to the Makefile) installs it again
    own_torch(venv)
    assert run_create(venv, monkeypatch, "", KAGGLE_TORCH, cuda=(12, 4)) == [make_venv, [
        pip, "--quiet", "install", "torch==2.9.1", "torchvision==0.24.1", "--index-url",
        "https://download.pytorch.org/whl/cu128"]]


def test_the_system_torch_is_read_through_the_venv_with_no_copy_of_its_own(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    assert run_create(venv, monkeypatch, "", KAGGLE_TORCH, cuda=(12, 4), installed=KAGGLE_TORCH) == [
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)]]
    assert (venv / "torch-constraints.txt").read_text() == "torch==2.6.0+cu124\ntorchvision==0.21.0+cu124\n"
    # a venv built before (no records, its own torch: the tested pair) would put that torch, and its
    # CUDA libraries, before the system's on the path
    shutil.rmtree(venv)
    own_torch(venv)
    assert run_create(venv, monkeypatch, "", KAGGLE_TORCH, cuda=(12, 4), installed=KAGGLE_TORCH) == [
        [sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(venv)]]
    # TORCH_PIN=system, cleared and rebuilt without being told again: the pin outlives --clear
    run_create(venv, monkeypatch, "system", ("2.14.1", "0.29.1", False), installed=("2.14.1", "0.29.1", False))
    own_torch(venv)
    (venv / ".torch-from").write_text("torch==2.14.1 torchvision==0.29.1\n")
    run_create(venv, monkeypatch, "", ("2.14.1", "0.29.1", False), installed=("2.14.1", "0.29.1", False))
    assert (venv / ".torch-pin").read_text() == "system\n" and (venv / ".torch-from").read_text() == "system\n"


def test_a_refused_or_failed_setup_is_one_line_and_a_nonzero_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)  # as the system python (the tests run in .venv)
    monkeypatch.setattr(torch_setup, "probe_torch", lambda python=None: None)
    monkeypatch.setattr(torch_setup, "driver_cuda", lambda: None)
    monkeypatch.setenv("TORCH_PIN", "system")
    assert torch_setup.main([str(tmp_path / "venv"), TESTED]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make setup: error: TORCH_PIN=system, but ") and err.count("\n") == 1
    monkeypatch.setenv("TORCH_PIN", "torch==0.0.0")
    monkeypatch.setattr(torch_setup.subprocess, "run", lambda cmd, check: (tmp_path / "venv").mkdir(exist_ok=True))
    assert torch_setup.main([str(tmp_path / "venv"), TESTED]) == 2  # pip "installed" it, yet it does not import
    assert capsys.readouterr().err == (f"make setup: error: {tmp_path / 'venv'}/bin/python cannot import torch and "
                                       f"torchvision after installing them from 'torch==0.0.0'; see pip's output above\n")
    def fails(cmd, check):
        if "venv" in cmd or "install" in cmd:
            raise subprocess.CalledProcessError(1, cmd)
    monkeypatch.setattr(torch_setup.subprocess, "run", fails)
    assert torch_setup.main([str(tmp_path / "venv"), TESTED]) == 1
    assert capsys.readouterr().err == \
        f"make setup: error: {sys.executable} -m venv {tmp_path / 'venv'} failed (exit status 1); see its output above\n"
    # pip failing (or stopped) after the venv was made: the next run knows what that venv's torch came from
    monkeypatch.setattr(torch_setup.subprocess, "run", lambda cmd, check: fails(cmd, check) if "install" in cmd else None)
    monkeypatch.setenv("TORCH_PIN", CUDA12_PIN)
    assert torch_setup.main([str(tmp_path / "venv"), TESTED]) == 1
    assert (tmp_path / "venv" / ".torch-from").read_text() == (tmp_path / "venv" / ".torch-pin").read_text() == \
        CUDA12_PIN + "\n"
    assert torch_setup.main([]) == 2
    capsys.readouterr()
    monkeypatch.setattr(sys, "version_info", (3, 9, 18))
    assert torch_setup.main([str(tmp_path / "venv"), TESTED]) == 2
    assert capsys.readouterr().err.startswith(f"make setup: error: {sys.executable} is Python ")


def test_inside_a_venv_it_runs_as_the_base_python(tmp_path, monkeypatch, capsys):
    """An activated .venv: its torch is not the system's, and a venv made from it would read the base
    python's packages, not its own."""
    calls = []
    monkeypatch.setattr(torch_setup.os, "execv", lambda path, args: calls.append((path, args)))
    monkeypatch.setattr(torch_setup, "create", lambda venv, pin: None)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setattr(sys, "_base_executable", "/usr/bin/python3", raising=False)
    torch_setup.main(["venv", TESTED])
    assert calls == [("/usr/bin/python3", ["/usr/bin/python3", "-m", "ddpm.torch_setup", "venv", TESTED])]
    monkeypatch.setattr(sys, "_base_executable", sys.executable)
    assert torch_setup.main(["venv", TESTED]) == 2
    assert "runs in a virtual environment" in capsys.readouterr().err and len(calls) == 1


def test_the_extras_go_into_a_file_whatever_importing_torch_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch_setup, "extras", lambda: print("a warning") or ["nvidia-dali-cuda120", "numpy<2.4"])
    assert torch_setup.main(["--extras", str(tmp_path / "extras.txt")]) == 0
    assert (tmp_path / "extras.txt").read_text() == "nvidia-dali-cuda120\nnumpy<2.4\n"


def test_the_extras_match_the_installed_torchs_cuda_and_triton(monkeypatch):
    old_triton = torch_setup.version_tuple(triton.__version__) < (3, 8)
    assert torch_setup.extras() == [f"nvidia-dali-cuda{torch.version.cuda.split('.')[0] if torch.version.cuda else 13}0"] \
        + (["numpy<2.4"] if old_triton and torch_setup.version_tuple(numpy.__version__) >= (2, 4) else [])
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    assert torch_setup.extras() == ["nvidia-dali-cuda120", "numpy<2.4"]
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert torch_setup.extras() == ["nvidia-dali-cuda130"]
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build: DALI runs on the CPU
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    assert torch_setup.extras() == ["nvidia-dali-cuda130"]
    monkeypatch.setitem(sys.modules, "triton", None)  # a torch without Triton (PyTorch's CPU wheels)
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert torch_setup.extras() == ["nvidia-dali-cuda120"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here (the GPU check runs pytest alone)")
def test_make_setup_hands_the_pin_of_the_command_line_or_the_environment_to_the_chooser(tmp_path):
    """A CUDA 12 machine's wheels (README, Kaggle-style machines) given either way reach ddpm.torch_setup."""
    log = tmp_path / "log"
    # one line per argument, then the pin; exit 1 stops make there
    python = fake_program(tmp_path, "python", f'printf "%s\\n" "$@" "pin=$TORCH_PIN" >> {log}; exit 1')
    pin = "torch torchvision --index-url https://download.pytorch.org/whl/cu126"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_PIN"}
    for args, extra_env in (([], {}), ([f"TORCH_PIN={pin}"], {}), ([], {"TORCH_PIN": pin})):
        subprocess.run(["make", f"VENV={tmp_path / 'venv'}", f"PY={python}", "setup", *args], cwd=ROOT,
                       env={**env, **extra_env}, capture_output=True, timeout=60)
    assert log.read_text().splitlines() == [line for pin_ in ("", pin, pin)
                                            for line in ("-m", "ddpm.torch_setup", str(tmp_path / "venv"), TESTED,
                                                         f"pin={pin_}")]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here (the GPU check runs pytest alone)")
def test_a_new_torch_pin_rebuilds_a_venv_that_is_up_to_date(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".torch-pin").write_text(CUDA12_PIN + "\n")
    (venv / ".installed").touch()

    def rebuilds(*args):
        result = subprocess.run(["make", "-n", f"VENV={venv}", "setup", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "TORCH_PIN"})
        assert result.returncode == 0, result.stderr
        return "ddpm.torch_setup" in result.stdout
    assert not rebuilds() and not rebuilds(f"TORCH_PIN={CUDA12_PIN}")  # the pin it keeps
    assert rebuilds("TORCH_PIN=system")
