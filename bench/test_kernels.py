"""Kernel microbenchmarks: each Triton op against its PyTorch forms, GB/s against the copy peak."""
import pytest
import torch

from bench import bench_attention, bench_group_norm_silu
from bench.common import measure_peaks
from ddpm.runtime import has_bf16


@pytest.mark.parametrize("op", [bench_group_norm_silu, bench_attention], ids=["group_norm_silu", "attention"])
def test_kernel(record, device, quick, op):
    copy_gb_per_s = measure_peaks(device, quick=True)["copy_gb_per_s"]
    kwargs = {"batch_sizes": (512, 64)}  # the bandwidth aim is at batch 512: first, in case time runs out
    if op is bench_group_norm_silu and device.type == "cuda":  # one dtype: each shape compiles anew
        kwargs["dtypes"] = [torch.bfloat16 if has_bf16(device) else torch.float16]
    for row in op.run(str(device), quick=quick, **kwargs):
        extra = {}
        if "gb_per_s" in row:
            extra["fraction_of_peak"] = row["gb_per_s"] / copy_gb_per_s
        if "tflops" in row:
            extra["gflop_per_s"] = row["tflops"] * 1e3
        record(kind="kernel", workload=f"{row['op']} {row['shape']} {row['pass']}", variant=row["variant"],
               precision=str(row["dtype"]).removeprefix("torch."), median_ms=row["median_ms"], spread_ms=row["iqr_ms"],
               **({"gb_per_s": row["gb_per_s"]} if "gb_per_s" in row else {}), **extra)
