"""bench/'s tools: which baseline each result row is divided by, how two runs compare, the profiler
and the loss comparison."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import compare
from bench.conftest import speedups
from ddpm import config


def test_each_row_is_compared_with_its_own_baseline():
    rows = [
        dict(kind="train", workload="train step", variant="eager-fp32", batch=64, median_ms=100.0),
        dict(kind="train", workload="train step", variant="default", batch=64, median_ms=25.0),
        dict(kind="train", workload="train step", variant="eager-fp32", batch=512, median_ms=800.0),
        dict(kind="train", workload="train step", variant="default", batch=512, median_ms=100.0),
        dict(kind="train", workload="train step", variant="bf16", batch=128, median_ms=10.0),  # no baseline
        dict(kind="sample", workload="ddpm-1000 x 64", variant="eager-fp32", batch=64, median_ms=9000.0),
        dict(kind="sample", workload="ddpm-1000 x 64", variant="default", batch=64, median_ms=600.0),
        # kernels: against the eager PyTorch form of the same op, shape and dtype
        dict(kind="kernel", workload="gn fwd 64x64", variant="eager", batch=64, precision="fp16", median_ms=0.3),
        dict(kind="kernel", workload="gn fwd 64x64", variant="triton", batch=64, precision="fp16", median_ms=0.1),
        dict(kind="kernel", workload="gn fwd 64x64", variant="eager", batch=64, precision="fp32", median_ms=0.4),
        dict(kind="kernel", workload="gn fwd 64x64", variant="triton", batch=64, precision="fp32", median_ms=0.2),
        dict(kind="train", workload="train step", variant="fp16", batch=64, note="skipped: no GPU"),
    ]
    speedups(rows)
    got = [r.get("speedup_vs_eager") for r in rows]
    assert got == [1.0, 4.0, 1.0, 8.0, None, 1.0, 15.0, 1.0, 3.0, 1.0, 2.0, None]


def test_the_results_files_carry_the_speedups(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import bench.conftest
    monkeypatch.setattr(bench.conftest, "ROWS", [
        dict(kind="train", workload="train step", variant="eager-fp32", batch=64, precision="fp32", median_ms=90.0),
        dict(kind="train", workload="train step", variant="default", batch=64, precision="bf16", median_ms=30.0)])
    path, table = bench.conftest.write_results(SimpleNamespace(getoption=lambda name: str(tmp_path)))
    rows = json.loads(path.with_suffix(".json").read_text())["results"]
    assert [r["speedup_vs_eager"] for r in rows] == [1.0, 3.0]
    header = next(line for line in table.splitlines() if line.startswith("| kind"))
    column = [cell.strip() for cell in header.split("|")].index("speedup_vs_eager")
    assert [[cell.strip() for cell in line.split("|")][column] for line in table.splitlines()
            if "| train step |" in line] == ["1", "3"]
    assert path.with_suffix(".md").read_text() == table


def test_training_rows_of_several_precisions_share_the_eager_fp32_baseline():
    rows = [dict(kind="train", workload="train step", variant="eager-fp32", batch=64, precision="fp32", median_ms=90.0),
            dict(kind="train", workload="train step", variant="fp16", batch=64, precision="fp16", median_ms=30.0)]
    speedups(rows)
    assert rows[1]["speedup_vs_eager"] == pytest.approx(3.0)


def results(device="H100", commit="a", rows=()):
    return {"environment": {"device": device, "commit": commit, "date": "today", "torch": "2.11"}, "results": list(rows)}


def timed(variant, median_ms, spread_ms, **fields):
    return dict(kind="train", workload="train step", variant=variant, batch=64, precision="bf16",
                median_ms=median_ms, spread_ms=spread_ms, **fields)


def test_a_change_counts_only_beyond_the_spread():
    old = results(rows=[timed("eager-fp32", 100.0, 4.0), timed("default", 20.0, 1.0, speedup_vs_eager=5.0),
                        timed("gone", 1.0, 0.1), dict(kind="peak", workload="matmul", variant="-")])
    new = results(commit="b", rows=[timed("eager-fp32", 103.0, 2.0), timed("default", 25.0, 1.0, speedup_vs_eager=4.12),
                                    timed("new", 1.0, 0.1), dict(kind="peak", workload="matmul", variant="-")])
    lines = compare.compare(old, new)
    assert [(line["key"][2], line["verdict"]) for line in lines] == [("eager-fp32", ""), ("default", "slower")]
    assert lines[1]["time_ratio"] == pytest.approx(1.25)
    assert compare.compare(new, old)[1]["verdict"] == "faster"
    other_batch = results(rows=[timed("default", 99.0, 1.0) | {"batch": 512}])
    assert compare.compare(other_batch, new) == []
    table = compare.markdown(old, new, lines)
    assert "| default | 64 | bf16 | 20 | 25 | 1.250 | 5 → 4.12 | slower |" in table
    assert "2 rows in both runs; 1 moved" in table


def test_runs_of_two_devices_or_other_files_are_refused(tmp_path, capsys):
    with pytest.raises(compare.CompareError, match="two devices"):
        compare.compare(results("H100"), results("Tesla T4"))
    new = tmp_path / "new.json"
    new.write_text(json.dumps(results()))
    (tmp_path / "notes.json").write_text('{"device": "H100"}')
    assert compare.main([str(new), "--against", str(tmp_path / "notes.json")]) == 2
    assert "is not a results file" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "absent.json")]) == 2
    assert "run `make bench` first" in capsys.readouterr().err


def test_the_earlier_run_defaults_to_the_committed_file(tmp_path, capsys):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(results(rows=[timed("default", 20.0, 1.0)])))
    subprocess.run(git + ["add", "h100.json"], check=True)
    subprocess.run(git + ["commit", "-qm", "bench"], check=True)
    path.write_text(json.dumps(results(commit="b", rows=[timed("default", 10.0, 1.0)])))
    assert compare.main([str(path)]) == 0
    assert "| 20 | 10 | 0.500 |" in capsys.readouterr().out
    assert compare.main([str(path), "--against", "nosuchrev"]) == 2
    assert "neither a results file nor a git revision" in capsys.readouterr().err


def test_the_gpu_check_names_variants_that_exist_in_their_order():
    """A misspelt name would be filtered out silently, and the order is the priority under the time limit."""
    from bench import variants
    for chosen, known in ((variants.GPU_CHECK_TRAIN, variants.TRAIN), (variants.GPU_CHECK_SAMPLE, variants.SAMPLE)):
        assert chosen == [name for name in known if name in chosen]
        assert chosen[:2] == [variants.BASELINE, "default"]


def test_every_variant_is_a_valid_config():
    """The GPU-only variants never run in CI: a bad override there would surface only on a lent GPU."""
    from bench import variants
    for name, overrides in [*variants.TRAIN.items(), *variants.SAMPLE.items()]:
        config.load("configs/mnist.yaml", overrides)
    # the baselines: every switch off, whatever the device's `auto` would pick
    train, sample = (config.load("configs/mnist.yaml", variants.TRAIN[variants.BASELINE]),
                     config.load("configs/mnist.yaml", variants.SAMPLE[variants.BASELINE]))
    for cfg in (train, sample):
        assert (cfg.model.kernels, cfg.model.attention) == ("torch", "torch")
    assert (train.train.precision, train.train.compile, train.data.loader) == ("fp32", "none", "resident")
    assert (sample.sample.precision, sample.sample.compile, sample.sample.cuda_graph) == ("fp32", "none", "disabled")
    assert variants.GPU_ONLY <= variants.TRAIN.keys() | variants.SAMPLE.keys()


def test_the_quick_cpu_run_skips_every_variant_that_needs_a_gpu():
    """CUDA graphs, bf16, the Triton ops (the interpreter, on a CPU), max-autotune, DDP: a CPU
    `make bench` that ran them would fail or take hours, and measure nothing a user has."""
    from bench import variants
    gpu_settings = {"sample.cuda_graph=enabled", "train.compile=reduce-overhead", "model.kernels=triton",
                    "model.attention=triton", "train.precision=bf16", "sample.compile=max-autotune"}
    for name, overrides in [*variants.TRAIN.items(), *variants.SAMPLE.items()]:
        if gpu_settings & set(overrides) or name in variants.SOLO_DDP:
            assert name in variants.GPU_ONLY, name
    # what the default's CUDA graphs buy: nothing to measure on a CPU, where the default has none
    assert "default-no-cudagraph" in variants.GPU_ONLY


ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_bench_skips_the_gpu_only_variants(tmp_path):
    """...and the benchmarks act on that list: each GPU-only variant's row is skipped, not run."""
    from bench import variants
    nodes = [f"bench/test_train_throughput.py::test_train_step[64-{name}]" for name in variants.TRAIN
             if name in variants.GPU_ONLY]
    nodes += [f"bench/test_sampling.py::test_sampling[ddpm-{name}]" for name in variants.SAMPLE if name in variants.GPU_ONLY]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--bench-size=quick",
                             "--bench-out", str(tmp_path), "-rs", *nodes], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    assert f"{len(nodes)} skipped" in result.stdout and " passed" not in result.stdout, result.stdout[-2000:]


def test_make_profile_writes_traces_for_tensorboard_and_prints_the_top_operators(tmp_path):
    """Without digits on the machine (a lent GPU without the carried wheel), on synthetic ones."""
    no_data = ["data.source=idx", f"data.dir={tmp_path / 'no-data'}"]
    result = subprocess.run([sys.executable, "-m", "bench.profile", "--config", "configs/ci.yaml", "--train-steps", "2",
                             "--sample-steps", "2", "--out", str(tmp_path), "sample.num_images=4", *no_data],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "profiling on synthetic digits (" in result.stderr
    assert "== train: top operators over 2 steps" in result.stdout and "== sample: top operators" in result.stdout
    for phase, op in (("train", "aten::convolution_backward"), ("sample", "aten::convolution")):
        (trace,) = (tmp_path / "tb").glob(f"{phase}.*.pt.trace.json")
        names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
        assert op in names, phase


@pytest.mark.parametrize("tool, args, message", [
    ("profile", ["--config", "nonexist.yaml"], "config file nonexist.yaml does not exist"),
    ("profile", ["--rows", "0"], "argument --rows: must be >= 1, got 0"),
    ("profile", ["--train-steps", "-1"], "argument --train-steps: must be >= 0, got -1"),
    ("profile", ["--rows", "x"], "argument --rows: must be a whole number, got 'x'"),
    ("bench_attention", ["--device", "gpu"], "argument --device: unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
    ("bench_group_norm_silu", ["--batch-sizes", "64", "0"], "argument --batch-sizes: must be >= 1, got 0"),
    ("compare", ["--bogus"], "unrecognized arguments: --bogus"),
    ("probe_sampling_options", ["--out", "{file}", "--rows", "default,nope"], "unknown rows ['nope']"),
    ("profile", ["--out", "{file}"], "is a file; pass a directory"),
    ("profile", ["--config", "configs/ci.yaml", "train.lr=fast"], "train.lr must be float"),
    ("compare_losses", ["--steps", "10", "--window", "10"], "--steps 10 leaves no timed window after the first"),
    ("compare_losses", ["--window", "0"], "argument --window: must be >= 1, got 0"),
    ("compare_losses", ["--config", "configs/ci.yaml", "--steps", "4", "--window", "2", "--out", "{file}/x"],
     "cannot be made a directory"),
])
def test_the_bench_tools_refuse_bad_input_in_one_line(tool, args, message, tmp_path, monkeypatch, capsys):
    import importlib
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(sys, "argv", [tool, *(a.replace("{file}", str(tmp_path / "file")) for a in args)])
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"bench.{tool}").main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(f"bench.{tool}: error: "), err
    assert message in err, err


def test_the_loss_comparison_of_two_identical_paths_finds_no_difference(tmp_path):
    """On a CPU the default path is eager fp32: the same seed must give the very same losses."""
    result = subprocess.run([sys.executable, "-m", "bench.compare_losses", "--config", "configs/ci.yaml", "--steps", "20",
                             "--window", "5", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "loss_comparison.json").read_text())
    eager, default = report["runs"]["eager-fp32"], report["runs"]["default"]
    assert len(eager["curve"]) == 4 and eager["curve"] == default["curve"]
    assert eager["final_loss"] == eager["curve"][-1] != eager["curve"][0]
    assert report["relative_final_loss_difference"] == 0.0
    assert "relative final-loss difference (default vs eager): +0.00%" in (tmp_path / "loss_comparison.md").read_text()


def test_every_sampling_probe_row_is_a_valid_option_set():
    """Its rows run only on a lent GPU: a misspelt override, inductor option or FastStep argument
    would cost a row there."""
    import inspect
    from torch._inductor import config as inductor_config
    from bench.probe_sampling_options import ROWS
    from ddpm.sample import FastStep
    step_arguments = inspect.signature(FastStep).parameters
    for name, (overrides, options, step_options, _) in ROWS.items():
        config.load("configs/mnist.yaml", overrides)
        with inductor_config.patch(options):
            pass
        assert set(step_options) <= set(step_arguments), name


@pytest.mark.parametrize("row,swapped", [("pointwise thin convs", 3), ("sub-pixel upsampling", 2),
                                          ("space-to-depth downsampling", 2), ("every conv rewrite", 7)])
def test_the_probes_rewritten_convolutions_compute_the_convolutions(row, swapped):
    """Each of the probe's changes to the seed UNet's convolutions (the three with one input or
    output channel as products and sums; the two transposed ones as a 3x3 convolution and
    pixel_shuffle; the two stride-2 ones as pixel_unshuffle and a 2x2 convolution): the same
    outputs in float64, and in bf16 autocast within its rounding."""
    from bench.probe_sampling_options import NET_CHANGES, ROWS
    from ddpm import model
    assert set(NET_CHANGES) <= set(ROWS)
    cfg = config.load("configs/mnist.yaml", ["model.base_channels=16"])
    torch.manual_seed(0)
    net = model.build(cfg, torch.device("cpu")).eval()
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0, 500, 999])
    with torch.no_grad():
        ref = net.double()(x.double(), t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16 = net.float()(x, t)
        assert NET_CHANGES[row](net) == swapped
        torch.testing.assert_close(net.double()(x.double(), t), ref, rtol=1e-12, atol=1e-12)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = net.float()(x, t)
    assert out16.dtype == ref16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref16.float(), rtol=0.05, atol=0.05)


def test_the_sampling_probe_writes_a_row_per_option_set(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.probe_sampling_options", "--out", str(tmp_path),
                             "--rows", "eager-fp32,no time table"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = (tmp_path / "sampling-options.md").read_text().splitlines()[-2:]
    assert [row.split(" | ")[0] for row in rows] == ["| eager-fp32", "| no time table"]
    assert not any("failed" in row for row in rows), rows


def test_kernel_timing_leaves_out_the_warm_up_calls():
    from bench.timing import time_fn
    calls = []

    def slow_first():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.2)  # a compile
    timing = time_fn(slow_first, warmup=2, repeats=5)
    assert len(calls) == 7 and timing["max_ms"] < 100, timing


def test_the_loss_comparison_times_the_steps_after_its_first_window(monkeypatch):
    """The first window (compilation, CUDA-graph capture, warm-up) is in the curve, not in the time."""
    import bench.compare_losses

    class SlowFirstStep:
        def __init__(self, *args):
            pass

        def step(self, i):
            if i == 0:
                time.sleep(0.5)  # a compile
            return torch.tensor(float(i))
    monkeypatch.setattr(bench.compare_losses, "Trainer", SlowFirstStep)
    cfg = config.load("configs/ci.yaml", [])
    result = bench.compare_losses.run(cfg, torch.device("cpu"), None, steps=6, window=2)
    assert result["curve"] == [0.5, 2.5, 4.5] and result["final_loss"] == 4.5
    assert result["seconds"] < 0.25, result["seconds"]


def test_benchmark_rounds_continue_where_the_last_stopped():
    from bench.common import consecutive_steps
    steps = []
    round_of_three = consecutive_steps(steps.append, 3, torch.device("cpu"))
    round_of_three()
    round_of_three()
    assert steps == [0, 1, 2, 3, 4, 5]
