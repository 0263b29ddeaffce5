"""The benchmark runner: pytest + pytest-benchmark, one results table at the end.

`make bench` runs `pytest bench`. Each benchmark records rows through the `record` fixture; at the
end of the session the rows are printed as one table and written to bench/results/<device>.json
and .md. Without a GPU the suite runs its quick version (small shapes, few repeats).
"""
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402  (does not import triton)

from bench import variants  # noqa: E402
from ddpm import distributed  # noqa: E402
from ddpm.checkpoint import remove_stale_temporaries, write_all_atomically  # noqa: E402
from ddpm.runtime import use_inductor_cache  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see tests/conftest.py)
# plain torch.compile calls too get a cache folder per version of kernels/ (see tests/conftest.py)
use_inductor_cache()

RESULTS_DIR = Path(__file__).parent / "results"
ROWS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=("auto", "quick", "full"), default="auto",
                     help="quick: small shapes, few repeats (the default without a GPU); full: the default on a GPU")
    parser.addoption("--bench-out", default=None, help="directory for <device>.json/.md (default: bench/results)")
    parser.addoption("--bench-variants", default=None,
                     help="comma-separated variant names to run (default: all in bench/variants.py)")
    parser.addoption("--bench-append", action="store_true",
                     help="add to the rows of this device's results file instead of replacing them "
                          "(gpu_check.sh runs each benchmark under its own time limit)")


def pytest_configure(config):
    path = results_path(config.getoption("--bench-out")).with_suffix(".json")
    if config.getoption("--bench-append", False) and path.exists():
        ROWS.extend(json.loads(path.read_text())["results"])


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--bench-variants")
    if not wanted:
        return
    wanted = set(wanted.split(","))
    skip = pytest.mark.skip(reason="not in --bench-variants")
    for item in items:
        variant = getattr(item, "callspec", None) and item.callspec.params.get("variant")
        if variant is not None and variant not in wanted:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each benchmark compiles as a new process would: after a compile at another shape, dynamo would
    recompile with a symbolic batch (automatic dynamic shapes), and the variants would not compare."""
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def solo_process_group(device):
    """A process group of this process alone, for the variants that wrap the UNet in DDP."""
    with distributed.solo_group(device):
        yield


@pytest.fixture(scope="session")
def quick(request, device):
    size = request.config.getoption("--bench-size")
    return size == "quick" or (size == "auto" and device.type != "cuda")


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "cpu")
    return f"CPU {os.cpu_count()} cores ({cpu})"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device) -> dict:
    # DDPM_COMMIT: for copies of the tree without .git (the lent GPU machine gets one)
    commit = os.environ.get("DDPM_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "commit": commit,
            # PyTorch's defaults, which the "fp32" variants keep: on sm_80+ cuDNN convolutions run in TF32
            "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


@pytest.fixture(scope="session")
def record(request):
    """record(kind=..., variant=..., **fields): one result row (kind: train, sample, kernel, input, peak).
    The results files are rewritten after every row, so a run cut short keeps what it measured."""
    def add(**row):
        ROWS.append(row)
        write_results(request.config)
    return add


BASELINES = {"train": {variants.BASELINE}, "sample": {variants.BASELINE}, "kernel": {"eager", "torch"}}


def speedups(rows: list[dict]) -> None:
    """Each timed row's speed-up over its baseline (eager fp32; for kernels the eager PyTorch form)
    with the same kind, workload, batch and, for kernels, dtype."""
    def key(r):
        return r["kind"], r.get("workload"), r.get("batch"), r.get("precision") if r["kind"] == "kernel" else None
    base = {key(r): r["median_ms"] for r in rows if r.get("variant") in BASELINES.get(r["kind"], ()) and "median_ms" in r}
    for r in rows:
        if key(r) in base and "median_ms" in r:
            r["speedup_vs_eager"] = round(base[key(r)] / r["median_ms"], 3)


COLUMNS = ["kind", "workload", "variant", "batch", "precision", "median_ms", "spread_ms", "images_per_s",
           "speedup_vs_eager", "gflop_per_s", "fraction_of_peak", "gb_per_s", "note"]


def markdown(env: dict, rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = [f"# Benchmarks on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}, {env['date']}; "
             f"TF32 in cuDNN convolutions {env['tf32']['cudnn']}, in matmuls {env['tf32']['matmul']} (fp32 variants)",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def results_path(out_dir=None) -> Path:
    """This machine's results file: <out dir, default bench/results>/<device slug>, without suffix."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = slug(device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}-cores")
    return Path(out_dir or RESULTS_DIR) / name


def write_results(config) -> tuple[Path, str]:
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rows = [{**r} for r in ROWS]
    speedups(rows)
    path = results_path(config.getoption("--bench-out"))
    path.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(env, rows)
    # whole files or none: a part killed by its time limit mid-write must not spoil the next part's
    # read, and leaves a temporary that the next write removes
    remove_stale_temporaries(path.parent)
    json_text = json.dumps({"environment": env, "results": rows}, indent=1) + "\n"
    write_all_atomically({path.with_suffix(".json"): lambda f: f.write(json_text.encode()),
                          path.with_suffix(".md"): lambda f: f.write(table.encode())})
    return path, table


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    path, table = write_results(session.config)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        for line in table.splitlines():
            reporter.write_line(line)
        reporter.write_line(f"written: {path}.json and .md")
