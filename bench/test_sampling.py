"""Sampling latency for a batch of images: 1000-step DDPM and 50-step DDIM, per variant."""
import pytest
import torch

from bench import variants
from bench.common import load_config, sync
from ddpm import model
from ddpm.config import UserError
from ddpm.diffusion import Diffusion
from ddpm.runtime import resolve_precision
from ddpm.sample import FastStep


# Every variant's DDPM first (the latency aim is 1000-step DDPM), then DDIM.
@pytest.mark.parametrize("variant", list(variants.SAMPLE))
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling(benchmark, record, device, quick, variant, sampler):
    if quick and variant in variants.GPU_ONLY:
        pytest.skip("GPU-only variant in the quick CPU run")
    # quick: the tiny CI model with T = 100, 8 images; full: the seed model, T = 1000, 64 images
    cfg = load_config(quick, [*variants.SAMPLE[variant], f"sample.sampler={sampler}"], device)
    images = 8 if quick else 64
    torch.manual_seed(0)
    net = model.build(cfg, device).eval()
    diffusion = Diffusion.from_config(cfg.diffusion, device)
    plan = diffusion.plan(cfg.sample)
    s = cfg.sample
    try:
        step = FastStep.from_config(net, plan, s, device)
    except UserError as e:
        pytest.skip(str(e))
    shape = (images, 1, cfg.data.image_size, cfg.data.image_size)

    def run():
        with torch.inference_mode():
            diffusion.sample(net, shape, plan, s.clip_x0, torch.Generator(device).manual_seed(0), step=step)
        sync(device)

    run()  # compile and capture
    benchmark.pedantic(run, rounds=2 if quick else 3, iterations=1)
    stats = benchmark.stats.stats
    record(kind="sample", workload=f"{sampler}-{len(plan.timesteps)} x {images}", variant=variant, batch=images,
           precision=resolve_precision(s.precision, device), median_ms=stats.median * 1e3,
           spread_ms=stats.iqr * 1e3, images_per_s=images / stats.median)
