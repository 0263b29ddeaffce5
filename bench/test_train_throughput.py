"""Training throughput of the whole step (input -> loss -> backward -> optimizer -> EMA), per variant."""
import pytest
import torch

from bench import variants
from bench.common import T4_MEMORY_BYTES, consecutive_steps, flops_per_image, load_config, measure_peaks, sync, synthetic_digits
from ddpm.config import UserError
from ddpm.runtime import resolve_precision
from ddpm.train import Trainer

IMAGES = synthetic_digits()


@pytest.fixture(scope="session")
def peaks(device, quick, record):
    p = measure_peaks(device, quick)
    record(kind="peak", workload=f"matmul {p['matmul_dtype']}", variant="-", gflop_per_s=p["matmul_tflop_per_s"] * 1e3)
    record(kind="peak", workload="copy", variant="-", gb_per_s=p["copy_gb_per_s"])
    return p


@pytest.fixture(scope="session")
def t4_max_batch(device, quick):
    """The largest multiple of 64 whose eager fp32 step fits in a 16 GB T4, from peak memory at 64 and 128."""
    if device.type != "cuda" or quick:
        return None
    peak = {}
    for batch in (64, 128):
        trainer = Trainer(load_config(False, [*variants.EAGER, f"train.batch_size={batch}"], device), device, IMAGES)
        torch.cuda.reset_peak_memory_stats(device)
        for step in range(2):
            trainer.step(step)
        sync(device)
        peak[batch] = torch.cuda.max_memory_allocated(device)
        del trainer
    per_image = (peak[128] - peak[64]) / 64
    fixed = peak[64] - 64 * per_image
    return min(int((T4_MEMORY_BYTES - fixed) / per_image), len(IMAGES)) // 64 * 64


# Every variant at batch 64 first, the T4-sized batch last: a run cut short has the rows that count.
@pytest.mark.parametrize("variant", list(variants.TRAIN))
@pytest.mark.parametrize("batch", [64, "t4-max"])
def test_train_step(benchmark, record, device, quick, peaks, request, variant, batch):
    if quick and (variant in variants.GPU_ONLY or batch != 64):
        pytest.skip("GPU-only variant or batch in the quick CPU run")
    if batch == "t4-max" and variant not in ("eager-fp32", "default"):
        pytest.skip("the T4-sized batch is measured for the baseline and the default only")
    if batch == "t4-max":
        batch = request.getfixturevalue("t4_max_batch")  # measured only when a T4-sized row runs
    cfg = load_config(quick, [*variants.TRAIN[variant], f"train.batch_size={batch}"], device)
    ddp = variant in variants.SOLO_DDP
    if ddp:
        request.getfixturevalue("solo_process_group")
    try:
        trainer = Trainer(cfg, device, IMAGES, ddp=ddp)
    except UserError as e:  # e.g. bf16 on a card without it
        record(kind="train", workload="train step", variant=variant, batch=batch, note=f"skipped: {e}")
        pytest.skip(str(e))
    steps_per_round = 3 if quick else 10
    run = consecutive_steps(trainer.step, steps_per_round, device)
    for _ in range(2):  # warm-up: compilation, autotuning, allocator
        run()
    benchmark.pedantic(run, rounds=3 if quick else 5, iterations=1)
    stats = benchmark.stats.stats
    median_ms = stats.median / steps_per_round * 1e3
    images_per_s = batch / median_ms * 1e3
    gflop_per_s = flops_per_image(cfg)["forward_backward"] * images_per_s / 1e9
    record(kind="train", workload="train step", variant=variant, batch=batch,
           precision=resolve_precision(cfg.train.precision, device), median_ms=median_ms,
           spread_ms=stats.iqr / steps_per_round * 1e3, images_per_s=images_per_s, gflop_per_s=gflop_per_s,
           fraction_of_peak=gflop_per_s / (peaks["matmul_tflop_per_s"] * 1e3))
