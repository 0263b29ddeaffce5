"""Input pipelines: images/s that each loader delivers to the training device."""
import pytest

from bench.common import consecutive_steps, synthetic_digits
from ddpm import data


@pytest.mark.parametrize("loader", list(data.LOADERS))
def test_loader(benchmark, record, device, quick, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    batch, steps = 64, (20 if quick else 200)
    source = data.make_loader(loader, synthetic_digits(8192), batch, 0, device)
    run = consecutive_steps(source.batch, steps, device)
    run()
    benchmark.pedantic(run, rounds=3, iterations=1)
    stats = benchmark.stats.stats
    record(kind="input", workload="batches of 64", variant=loader, batch=batch, median_ms=stats.median / steps * 1e3,
           spread_ms=stats.iqr / steps * 1e3, images_per_s=batch * steps / stats.median)
