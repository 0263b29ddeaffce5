"""How a benchmark run moved against an earlier one of the same device: `make bench-compare`.

    python -m bench.compare [NEW.json] [--against REV | OLD.json]

NEW is this machine's results file by default (bench/results/<device>.json, as `make bench` wrote
it); the earlier run is, by default, the version of that file committed at HEAD, so after a change
and a `make bench` this shows what the change did. Rows are matched by kind, workload, variant,
batch and precision. A change counts only when the two medians differ by more than the larger of
the two rows' inter-quartile ranges; within that it is noise.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.conftest import results_path
from ddpm import cli


class CompareError(Exception):
    pass


def parse(text: str, name: str) -> dict:
    try:
        results = json.loads(text)
        results["environment"]["device"], results["results"][:0]
    except (ValueError, KeyError, TypeError) as e:
        raise CompareError(f"{name} is not a results file of bench/ ({type(e).__name__}: {e})") from None
    return results


def read_results(source: str, new_path: Path) -> dict:
    """A results file by path, or new_path's version at a git revision."""
    if Path(source).is_file():
        return parse(Path(source).read_text(), source)
    path = new_path.resolve()
    run = subprocess.run(["git", "show", f"{source}:./{path.name}"], cwd=path.parent, capture_output=True, text=True)
    if run.returncode != 0:
        why = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "git failed"
        raise CompareError(f"{source} is neither a results file nor a git revision holding {new_path} ({why}); "
                           f"pass --against OLD.json")
    return parse(run.stdout, f"{new_path} at {source}")


def row_key(row: dict) -> tuple:
    return row["kind"], row.get("workload"), row.get("variant"), row.get("batch"), row.get("precision")


def compare(old: dict, new: dict) -> list[dict]:
    """One line per timed row present in both runs: the medians, their ratio and whether it is noise."""
    if old["environment"]["device"] != new["environment"]["device"]:
        raise CompareError(f"the runs are of two devices ({old['environment']['device']} and "
                           f"{new['environment']['device']}): compare runs of one device")
    before = {row_key(r): r for r in old["results"] if "median_ms" in r}
    lines = []
    for r in new["results"]:
        o = before.get(row_key(r))
        if o is None or "median_ms" not in r:
            continue
        noise = max(o.get("spread_ms", 0.0), r.get("spread_ms", 0.0))
        change = r["median_ms"] - o["median_ms"]
        verdict = "" if abs(change) <= noise else ("slower" if change > 0 else "faster")
        lines.append({"key": row_key(r), "old_ms": o["median_ms"], "new_ms": r["median_ms"],
                      "time_ratio": r["median_ms"] / o["median_ms"], "verdict": verdict,
                      "old_speedup": o.get("speedup_vs_eager"), "new_speedup": r.get("speedup_vs_eager")})
    return lines


def markdown(old: dict, new: dict, lines: list[dict]) -> str:
    def run(env):
        return f"commit {env['commit']} ({env['date']}, torch {env['torch']})"
    out = [f"# {new['environment']['device']}: {run(new['environment'])} against {run(old['environment'])}", "",
           "| kind | workload | variant | batch | precision | before ms | now ms | now / before | "
           "speed-up vs eager, before → now | |", "|" + "---|" * 10]
    for line in lines:
        kind, workload, variant, batch, precision = line["key"]
        pair = (line["old_speedup"], line["new_speedup"])
        speedups = "" if pair == (None, None) else " → ".join("–" if s is None else f"{s:.3g}" for s in pair)
        out.append(f"| {kind} | {workload} | {variant} | {batch or ''} | {precision or ''} | {line['old_ms']:.4g} | "
                   f"{line['new_ms']:.4g} | {line['time_ratio']:.3f} | {speedups} | {line['verdict']} |")
    moved = sum(bool(line["verdict"]) for line in lines)
    out += ["", f"{len(lines)} rows in both runs; {moved} moved by more than their spread."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("new", nargs="?", help="a results .json (default: this machine's, in bench/results)")
    parser.add_argument("--against", default="HEAD",
                        help="an earlier results .json, or a git revision of NEW (default: %(default)s)")
    args = parser.parse_args(argv)
    new_path = Path(args.new) if args.new else results_path().with_suffix(".json")
    try:
        if not new_path.is_file():
            raise CompareError(f"no results file {new_path}; run `make bench` first or name one")
        new = parse(new_path.read_text(), str(new_path))
        old = read_results(args.against, new_path)
        print(markdown(old, new, compare(old, new)), end="")
    except CompareError as e:
        print(f"bench.compare: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
