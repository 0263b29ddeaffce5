import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    env.pop("GPU_CHECK_ALLOW_CPU", None)
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], result.stderr


@pytest.mark.parametrize("variable,value", [("GPU_CHECK_TEST_SECONDS", "0"), ("GPU_CHECK_BENCH_SECONDS", "5m"),
                                            ("GPU_CHECK_PROFILE_SECONDS", "0")])
def test_gpu_check_refuses_a_stage_limit_that_is_no_limit(tmp_path, variable, value):
    """`timeout 0` runs a stage without a limit, past the device call's own."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), variable: value}
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"gpu_check.sh: stage time limits are whole seconds from 1 (got '{value}'): "
                                     "set GPU_CHECK_{TEST,BENCH,COMPARE,PROFILE}_SECONDS to such numbers")


def test_benchmark_parts_add_their_rows_to_one_results_file(tmp_path):
    """What gpu_check.sh's stage 2 does: the first part starts the file, --bench-append adds to it."""
    import json

    def run(*args):
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--bench-size=quick",
                                 "--bench-out", str(tmp_path), *args, "bench/test_input_pipelines.py", "-k", "resident"],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:]
        (path,) = tmp_path.glob("*.json")
        return [row["variant"] for row in json.loads(path.read_text())["results"]]

    assert run() == ["resident"]
    assert run("--bench-append") == ["resident", "resident"]
    assert run() == ["resident"]  # without it, a new file


def test_the_gpu_check_runs_every_cuda_only_test():
    """The tests that skip without CUDA run nowhere else; a node id that names no test would make
    pytest run none of stage 1."""
    import ast
    import re
    named = set(re.findall(r"(tests/\w+\.py)::(\w+)", (ROOT / "bench/gpu_check.sh").read_text()))
    cuda_only = set()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                marks = " ".join(ast.unparse(d) for d in node.decorator_list)
                if "on_cuda" in marks or "not torch.cuda.is_available()" in marks:
                    cuda_only.add((f"tests/{path.name}", node.name))
    assert ("tests/test_fast_path.py", "test_cuda_graphed_training_takes_the_eager_steps") in cuda_only  # the scan works
    assert named == cuda_only
