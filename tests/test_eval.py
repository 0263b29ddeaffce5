"""Sample-quality evaluation: the classifier cache, metrics that tell real digits from noise,
evaluate() on a tiny checkpoint, and the CLI's bad-input paths. On the offline MNIST subset with a
classifier trained for a few dozen steps, so that the file runs in well under a minute on a CPU."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm import config, eval as ev
from ddpm.config import ConfigError
from ddpm.train import train

ROOT = Path(__file__).resolve().parents[1]

QUICK_STEPS = 120  # classifier steps for the tests: ~95% held-out accuracy on the offline subset


def ci_config(out_dir, *overrides):
    return config.load(ROOT / "configs/ci.yaml", [f"train.out_dir={out_dir}", *overrides])


def run_cli(*args, cache_dir=None):
    env = {**os.environ, **({"DDPM_CACHE_DIR": str(cache_dir)} if cache_dir else {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def assert_one_line_error(result, program):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{program}: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache dir holding a quickly trained offline-subset classifier, for the whole module."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPM_CACHE_DIR", str(path))
        data_cfg = ci_config(path).data
        ev.get_classifier(data_cfg, "cpu", ev.real_splits(data_cfg), steps=QUICK_STEPS)
        yield path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train(ci_config(tmp_path_factory.mktemp("run") / "ci", "train.steps=2"), progress=False)


def test_classifier_cache_round_trip_and_corrupt_file(cache, tmp_path, monkeypatch):
    data_cfg = ci_config(tmp_path).data
    path = ev.classifier_path("mnist-offline_subset", data_cfg)
    assert path == cache / "classifier-mnist-offline_subset.pt" and path.is_file()
    state = torch.load(path, weights_only=True)
    assert state["key"] == "mnist-offline_subset" and state["accuracy"] > 0.8, state["accuracy"]
    monkeypatch.setattr(ev, "train_classifier", lambda *a, **k: pytest.fail("a cached classifier was retrained"))
    net = ev.get_classifier(data_cfg, "cpu", ev.real_splits(data_cfg))
    assert all(torch.equal(v, state["weights"][k]) for k, v in net.state_dict().items())
    # the accuracy it reports is on the held-out digits, not on those it learned
    assert state["accuracy"] == pytest.approx(ev.accuracy(net, ev.real_splits(data_cfg).held_out, data_cfg, "cpu"))

    monkeypatch.undo()
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path))
    (tmp_path / "classifier-mnist-offline_subset.pt").write_bytes(b"not a checkpoint")
    messages = []
    ev.get_classifier(data_cfg, "cpu", ev.real_splits(data_cfg), steps=3, log=messages.append)
    assert "is unusable" in messages[0] and "retraining" in messages[0]
    assert torch.load(tmp_path / "classifier-mnist-offline_subset.pt", weights_only=True)["steps"] == 3
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DDPM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ev.cache_dir() == tmp_path / "ddpm-mnist"
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "x"))
    assert ev.cache_dir() == tmp_path / "x"
    data = config.load(None, ["data.resize=pad"]).data
    assert ev.classifier_path("mnist-full", data).name == "classifier-mnist-full-pad32.pt"


def test_metrics_tell_real_digits_from_noise(cache, tmp_path):
    scorer = ev.Scorer(ci_config(tmp_path).data, "cpu", 400)
    real = scorer.floor  # held-out half B against reference half A: disjoint real digits
    noise = scorer.score([torch.randn(400, 1, 32, 32, generator=torch.Generator().manual_seed(0))])
    assert real["num"] == noise["num"] == 400
    assert noise["fid"] > 20 * max(real["fid"], 1e-3), (real, noise)
    assert noise["kid"] > 20 * max(real["kid"], 1e-3 * noise["kid"]), (real, noise)
    assert real["recognizable"] > 0.6 and noise["recognizable"] < 0.2, (real, noise)
    assert real["class_tv"] < 0.1
    # the floor scores the held-out digits (not the reference against itself, which gives 0)
    assert real["fid"] > 0 and scorer.score(scorer._batches(scorer.floor_images))["fid"] == pytest.approx(real["fid"])
    # features in units of their RMS over the training digits (KID's kernel assumes O(1) features)
    with torch.no_grad():
        rms = scorer.classifier(next(scorer._batches(scorer.reference))).square().mean().sqrt()
    assert 0.8 < rms < 1.25, rms
    splits = ev.real_splits(ci_config(tmp_path).data)
    as_bytes = lambda images: {image.numpy().tobytes() for image in images}  # noqa: E731
    held_out, trained_on = as_bytes(splits.held_out.images), as_bytes(splits.train.images)
    floor, reference = as_bytes(scorer.floor_images), as_bytes(scorer.reference)
    assert len(floor) == 400 and floor <= held_out and not floor & trained_on and reference <= trained_on


def test_scoring_under_ddp_talks_to_no_other_rank(cache, tmp_path, monkeypatch):
    """Under DDP rank 0 alone scores (train.eval_every), while the others go on to their next step:
    a collective from the metrics (torchmetrics gathers their states in compute() whenever a process
    group exists) would hang both. Here, a group of one whose collectives fail."""
    from ddpm import distributed

    def collective(*args, **kwargs):
        raise AssertionError("a collective while rank 0 scores alone")
    with distributed.solo_group(torch.device("cpu")):
        for name in ("barrier", "all_gather", "all_gather_object", "all_reduce", "broadcast"):
            monkeypatch.setattr(torch.distributed, name, collective)
        scorer = ev.Scorer(ci_config(tmp_path).data, "cpu", 100)
        assert scorer.score([torch.randn(100, 1, 32, 32)])["num"] == 100


def test_the_offline_subset_splits_into_two_balanced_halves(tmp_path):
    splits = ev.real_splits(ci_config(tmp_path).data)
    for half in (splits.train, splits.held_out):
        assert len(half.images) == 2500 and torch.bincount(half.labels, minlength=10).tolist() == [250] * 10


def test_training_files_without_their_test_split_are_refused_not_scored_against_the_subset(tmp_path, monkeypatch):
    """data.source=auto finds the training split's IDX files but not the test split's, whose
    download fails: the test split falls back to the offline subset, which cannot be the floor."""
    from ddpm import data
    from test_train import write_idx_digits

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading t10k-images-idx3-ubyte.gz:\n<urlopen error no network>")
    monkeypatch.setattr(data, "load_torchvision", offline)
    write_idx_digits(tmp_path / "idx", torch.zeros(64, 28, 28, dtype=torch.uint8))
    cfg = config.load("configs/ci.yaml", ["data.source=auto", f"data.dir={tmp_path / 'idx'}"]).data
    assert not data.load_digits(cfg, train=True).offline_subset and data.load_digits(cfg, train=False).offline_subset
    with pytest.raises(config.UserError, match="found the mnist training split but not its test split"):
        ev.real_splits(cfg)


def test_class_histogram_distance():
    assert ev.class_histogram_tv(torch.arange(10).repeat(50)) == pytest.approx(0.0, abs=1e-12)
    assert ev.class_histogram_tv(torch.full((300,), 7)) == pytest.approx(0.9)


@pytest.mark.parametrize("cuda_graph,graphed", [(None, True), ("auto", True), ("enabled", True), ("disabled", False)])
def test_a_loaded_model_takes_the_backends_of_the_runs_cuda_graph_setting(ckpt, monkeypatch, cuda_graph, graphed):
    """From compute capability 8.0 `auto` keeps the Triton ops only where CUDA graphs hide their
    launches: sample.py and evaluate.py build the UNet for their --cuda-graph (None: the checkpoint's
    sample.cuda_graph, auto)."""
    import ddpm.sample
    seen = []
    build = ddpm.sample.model_lib.build
    monkeypatch.setattr(ddpm.sample.model_lib, "build", lambda cfg, device, graphed: seen.append(graphed) or build(cfg, device))
    ddpm.sample.load_model(ckpt, "cpu", cuda_graph=cuda_graph)
    assert seen == [graphed]


def test_evaluate_a_tiny_checkpoint(cache, ckpt):
    from ddpm.sample import load_model
    net, cfg, _ = load_model(ckpt, "cpu")
    rng = torch.random.get_rng_state()
    scores = ev.evaluate(net, cfg, "cpu", num_samples=24, sampler="ddim", steps=3, batch_size=10, progress=False)
    keys = {"fid", "kid", "kid_std", "recognizable", "class_tv"}
    assert keys | {f"floor_{k}" for k in keys} | {"num_samples", "floor_num_samples"} <= set(scores)
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores.values()), scores
    assert scores["num_samples"] == scores["floor_num_samples"] == 24
    ddpm = ev.evaluate(net, cfg, "cpu", num_samples=6, sampler="ddpm", batch_size=4, progress=False)  # 4 + 2
    assert ddpm["num_samples"] == 6 and all(math.isfinite(v) for v in ddpm.values())
    quick = ev.quick_score(net, cfg, "cpu", num_samples=8)
    assert set(quick) == set(scores) and all(math.isfinite(v) for v in quick.values())
    assert torch.equal(rng, torch.random.get_rng_state())  # training's RNG stream is left alone


def test_the_sample_stream_is_one_seeded_run_of_the_named_sampler(ckpt):
    """Batches of DDIM on `steps` timesteps, or DDPM over all T, drawn one after another from one
    generator seeded once: the eager sampler's samples, and no batch a repeat of another."""
    import dataclasses

    from ddpm.diffusion import Diffusion
    from ddpm.sample import load_model
    net, cfg, _ = load_model(ckpt, "cpu")
    net.eval()
    diffusion = Diffusion.from_config(cfg.diffusion, "cpu")
    for sampler, steps, sizes in (("ddim", 3, (4, 4, 2)), ("ddpm", 0, (2, 1))):
        with torch.no_grad():
            got = list(ev.sample_batches(net, cfg, "cpu", sum(sizes), sampler, steps, sizes[0], seed=5))
            plan = diffusion.plan(dataclasses.replace(cfg.sample, sampler=sampler, steps=steps or 1))
            generator = torch.Generator().manual_seed(5)
            want = [diffusion.sample(net, (b, 1, 32, 32), plan, cfg.sample.clip_x0, generator)[0] for b in sizes]
        assert len(plan.timesteps) == (steps or cfg.diffusion.timesteps)
        assert [len(x) for x in got] == list(sizes)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        assert not torch.allclose(got[1], got[0][:len(got[1])], atol=1e-3)


def test_evaluate_cli_writes_table_json_and_the_samples(cache, ckpt, tmp_path):
    """--samples keeps the scored samples: the seeded stream's, as the pictures quantize them."""
    import numpy as np

    from ddpm.sample import load_model
    out, npz = tmp_path / "scores.json", tmp_path / "samples.npz"
    result = run_cli("evaluate.py", "--ckpt", str(ckpt), "--n", "16", "--steps", "2", "--batch-size", "8",
                     "--no-progress", "--json", str(out), "--samples", str(npz), cache_dir=cache)
    assert result.returncode == 0, result.stderr
    assert "real-vs-real floor" in result.stdout and "Fréchet distance" in result.stdout
    assert json.loads(out.read_text())["scores"]["num_samples"] == 16
    with np.load(npz) as saved:
        images = torch.from_numpy(saved["arr_0"])
    assert images.dtype == torch.uint8 and images.shape == (16, 32, 32, 1)
    net, cfg, _ = load_model(ckpt, "cpu")
    with torch.no_grad():
        stream = torch.cat(list(ev.sample_batches(net.eval(), cfg, "cpu", 16, "ddim", 2, 8, seed=0)))
    want = ((stream + 1) / 2).clamp(0, 1).mul(255).round().permute(0, 2, 3, 1)
    assert (images.float() - want).abs().max() <= 1 and images.float().std() > 10  # rounding, not noise or zeros


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "missing/checkpoint.pt"], "does not exist"),
    (["--ckpt", "CKPT", "--steps", "500"], "DDIM steps must lie in [1, diffusion.timesteps=100]"),
    (["--ckpt", "CKPT", "--json", "/nonexistent/dir/x.json"], "does not exist"),
    (["--ckpt", "CKPT", "--json", "EMPTY_DIR"], "is a directory"),
    (["--ckpt", "CKPT", "--device", "gpu"], "unknown device 'gpu'"),
    (["--ckpt", "CKPT", "--json", "CKPT"], "is the checkpoint being evaluated"),
    (["--ckpt", "CKPT", "--json", ""], "--json needs a file name"),
    (["--ckpt", "CKPT", "--samples", ""], "--samples needs a file name"),
    (["--ckpt", "CKPT", "--samples", "CKPT"], "is the checkpoint being evaluated"),
    (["--ckpt", "CKPT", "--samples", "/nonexistent/dir/x.npz"], "does not exist"),
    (["--ckpt", "CKPT", "--json", "x.out", "--samples", "x.out"], "--json and --samples name one file"),
    (["--ckpt", ""], "the checkpoint's name is empty; pass the checkpoint.pt inside a run's out dir"),
    (["--ckpt", "CKPT", "--sampler", "ddpm", "--steps", "7"], "--steps is an option of the DDIM sampler, not of DDPM"),
    pytest.param(["--ckpt", "CKPT", "--cuda-graph", "enabled"], "needs a CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")),
])
def test_evaluate_cli_bad_input(args, message, ckpt, tmp_path, capsys, monkeypatch):
    """The first case runs evaluate.py as a process; the others its main() here (a process costs ~4 s
    of imports), the same code from argument parsing to the one-line error and exit status 2."""
    args = [{"CKPT": str(ckpt), "EMPTY_DIR": str(tmp_path)}.get(a, a) for a in args]
    # an empty cache: an error found only after the classifier's training would log a second line
    before = ckpt.read_bytes()
    if args[1] == "missing/checkpoint.pt":
        result = run_cli("evaluate.py", *args, cache_dir=tmp_path)
    else:
        import evaluate
        monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(sys, "argv", ["evaluate.py", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            evaluate.main()
        result = subprocess.CompletedProcess(args, exit_.value.code, "", capsys.readouterr().err)
    assert message in assert_one_line_error(result, "evaluate.py")
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": 1}, "at least 2 samples"),
    ({"sampler": "euler"}, "sampler must be ddim or ddpm"),
    ({"steps": 0}, "DDIM steps must lie in"),
    ({"batch_size": 0}, "batch size must be >= 1"),
])
def test_evaluate_checks_its_arguments_before_any_work(kwargs, message, tmp_path):
    from ddpm.config import UserError
    args = {"num_samples": 10, "sampler": "ddim", "steps": 5, "batch_size": 5, **kwargs}
    with pytest.raises(UserError, match=message):
        ev.evaluate(None, ci_config(tmp_path), "cpu", **args)


def test_evaluate_cli_inception_without_torch_fidelity(ckpt):
    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed: --inception would try to download its weights")
    line = assert_one_line_error(run_cli("evaluate.py", "--ckpt", str(ckpt), "--inception"), "evaluate.py")
    assert "torch-fidelity" in line


def test_train_eval_every_is_validated(tmp_path):
    assert ci_config(tmp_path).train.eval_every == 0
    with pytest.raises(ConfigError, match="train.eval_every must be >= 0"):
        ci_config(tmp_path, "train.eval_every=-1")


def test_evaluate_cli_options_reach_the_sampler(ckpt, monkeypatch, tmp_path):
    """--raw-weights loads the raw weights; --n, --sampler, --steps, --batch-size, --seed and the
    runtime options reach the evaluation (stopped there: no classifier, no sampling)."""
    import runpy
    main = runpy.run_path(str(ROOT / "evaluate.py"))["main"]
    seen = []

    class Stop(Exception):
        pass

    def load_model(path, device, use_ema=True, cuda_graph=None):
        seen.append(use_ema)
        return real_load_model(path, device, use_ema, cuda_graph)

    def evaluate(net, cfg, device, n, sampler, steps, batch_size, seed, **kwargs):
        s = cfg.sample
        seen.append((s.precision, s.compile, s.cuda_graph, s.streams, n, sampler, steps, batch_size, seed))
        raise Stop

    real_load_model = main.__globals__["load_model"]
    monkeypatch.setitem(main.__globals__, "load_model", load_model)
    monkeypatch.setitem(main.__globals__, "Scorer", lambda *args, **kwargs: None)
    monkeypatch.setitem(main.__globals__, "evaluate", evaluate)
    for args in ([], ["--raw-weights", "--n", "30", "--sampler", "ddim", "--steps", "7", "--batch-size", "9",
                      "--seed", "3", "--precision", "fp16", "--compile", "default", "--cuda-graph", "disabled", "--streams", "2"]):
        monkeypatch.setattr(sys, "argv", ["evaluate.py", "--ckpt", str(ckpt), "--device", "cpu", *args])
        with pytest.raises(Stop):
            main()
    assert seen == [True, ("auto", "auto", "auto", 1, 10_000, "ddim", 50, 500, 0),
                    False, ("fp16", "default", "disabled", 2, 30, "ddim", 7, 9, 3)]
    # a model of 20 diffusion steps: DDIM over all 20 by default, as its training grid had it
    state = torch.load(ckpt, weights_only=True)
    state["config"]["diffusion"]["timesteps"] = 20
    short = tmp_path / "short.pt"
    torch.save(state, short)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--ckpt", str(short), "--device", "cpu"])
    with pytest.raises(Stop):
        main()
    assert seen[-1][6] == 20


def test_evaluate_prints_and_records_what_it_ran(ckpt, monkeypatch, tmp_path, capsys):
    """The table puts each score beside its own floor; --json records the run's settings (DDPM: all
    T steps) with the scores."""
    import runpy
    from types import SimpleNamespace
    main = runpy.run_path(str(ROOT / "evaluate.py"))["main"]
    scores = dict(fid=1.0, kid=3.0, kid_std=0.5, recognizable=0.25, class_tv=0.125, floor_fid=2.0, floor_kid=4.0,
                  floor_kid_std=0.7, floor_recognizable=0.75, floor_class_tv=0.0625, num_samples=6,
                  floor_num_samples=6, num_reference=6, seconds=1.0)
    monkeypatch.setitem(main.__globals__, "Scorer", lambda *args, **kwargs: SimpleNamespace(
        feature_extractor="features", description="real digits"))
    monkeypatch.setitem(main.__globals__, "evaluate", lambda *args, **kwargs: scores)
    from ddpm import checkpoint
    written, write_atomically = [], checkpoint.write_atomically
    monkeypatch.setattr(checkpoint, "write_atomically",
                        lambda path, write: written.append(path) or write_atomically(path, write))
    out = tmp_path / "scores.json"
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--ckpt", str(ckpt), "--device", "cpu", "--raw-weights",
                                      "--sampler", "ddpm", "--n", "6", "--seed", "4", "--json", str(out)])
    main()
    table = capsys.readouterr().out
    for row in ("| Fréchet distance (lower is better) | 1.000 | 2.000 |", "| KID (lower is better) | 3.000 ± 0.500 | 4.000 ± 0.700 |",
                "| recognizable (top prob > 0.9) | 25.0% | 75.0% |", "| class histogram TV from uniform | 0.125 | 0.062 |"):
        assert row in table, table
    record = json.loads(out.read_text())
    assert {k: record[k] for k in ("sampler", "steps", "seed", "weights")} == dict(
        sampler="ddpm", steps=100, seed=4, weights="raw")
    assert record["scores"] == scores
    assert written == [out]  # whole or not at all: an earlier file survives a failed write
