"""Every Triton kernel launch of the seed UNet's training step and channels-last sampling step
compiles, without a GPU, for the users' T4 (sm_75: 64 KB of shared memory per block, no bf16),
for an H100 (sm_90) and, in bf16, for an A100 (sm_80: attention's tensor-core tiles of 64 rows,
which Hopper caps at 32), within the card's shared memory, and without spilling registers at the seed's
shapes (tests/gpu_compile_worker.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A few bytes of stack in one small kernel (T4, fp32 GroupNorm forward: 8 with triton 3.6) are
# noise; a tile that does not fit the register file spills hundreds (attention's 64-wide d chunk
# on a T4 spilled 312 to 2,416 before the launch config gave FMA dots 16-wide chunks).
SPILL_NOISE_BYTES = 64


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "tests/gpu_compile_worker.py"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def dtype(row):
    return row["signature"]["x_ptr" if "x_ptr" in row["signature"] else "qkv_ptr"].removeprefix("*")


def describe(row):
    return f"{row['gpu']} {row['case']} {row['kernel']} {dtype(row)} {row['constants']} {row['options']}"


def test_every_launch_compiles_for_each_card(compiled):
    kernels = {"group_norm_silu._fwd_kernel", "group_norm_silu._bwd_kernel", "attention._fwd_kernel",
               "attention._bwd_dq_kernel", "attention._bwd_dkdv_kernel"}
    # under bf16 autocast some launches still get fp32 inputs: the A100's fp32 rows are those
    for gpu, dtypes in (("T4", {"fp32", "fp16"}), ("H100", {"fp32", "fp16", "bf16"}), ("A100", {"fp32", "bf16"})):
        rows = [r for r in compiled if r["gpu"] == gpu and r["case"] == "seed UNet"]
        assert {r["kernel"].removeprefix("kernels.") for r in rows} == kernels
        assert {dtype(r) for r in rows} == dtypes


def test_channels_last_group_norm_compiles_for_each_card(compiled):
    for gpu in ("T4", "H100", "A100"):
        rows = [r for r in compiled if r["gpu"] == gpu and r["case"] == "seed UNet, channels-last sampling"
                and r["kernel"] == "kernels.group_norm_silu._fwd_kernel"]
        assert rows and all(r["constants"]["CHANNELS_LAST"] for r in rows), [describe(r) for r in rows]


def test_shared_memory_fits_the_card(compiled):
    for row in compiled:
        assert row["shared_bytes"] <= row["shared_limit"], describe(row)


def test_no_register_spills_at_the_seed_shapes(compiled):
    spilling = [f"{describe(r)}: {r['spill_bytes']} bytes" for r in compiled
                if r["case"].startswith("seed UNet") and r["spill_bytes"] > SPILL_NOISE_BYTES]
    assert not spilling, "\n".join(spilling)
