"""bench/'s arithmetic: which baseline each result row is divided by."""
import pytest

from bench.conftest import speedups


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


def test_training_rows_of_several_precisions_share_the_eager_fp32_baseline():
    rows = [dict(kind="train", workload="train step", variant="eager-fp32", batch=64, precision="fp32", median_ms=90.0),
            dict(kind="train", workload="train step", variant="fp16", batch=64, precision="fp16", median_ms=30.0)]
    speedups(rows)
    assert rows[1]["speedup_vs_eager"] == pytest.approx(3.0)
