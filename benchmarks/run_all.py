"""Run every skrtl benchmark and write ``benchmarks/results/*.json`` plus ``SUMMARY.md``.

Usage::

    python benchmarks/run_all.py            # full runs (tens of minutes on 2 CPU cores)
    python benchmarks/run_all.py --quick    # smoke run of each
    python benchmarks/run_all.py --only features finetune

Each ``bench_<name>.py`` script prints its own table and writes ``results/<name>.json``; this
runner calls them one after the other (so their timings do not compete for the cores), then
collects the JSON files into one summary table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _scripts(only: list[str] | None) -> list[Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in only]
    return scripts


def _flatten(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, dict):
        for key, val in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), val, out)
    elif isinstance(obj, int | float | str | bool) or obj is None:
        out[prefix] = obj


def summarise() -> str:
    """Build the Markdown summary table from ``results/*.json``."""
    lines = ["# Benchmark summary", "", "| benchmark | metric | value |", "|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        flat: dict = {}
        _flatten("", data.get("summary", data), flat)
        for key, val in flat.items():
            if isinstance(val, float):
                val = f"{val:.4g}"
            lines.append(f"| {path.stem} | {key} | {val} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of each benchmark")
    parser.add_argument("--only", nargs="*", help="benchmark names, e.g. features finetune")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    failures = []
    for script in _scripts(args.only):
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"\n=== {script.name} {'(quick)' if args.quick else ''}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=HERE.parent)
        print(f"=== {script.name}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s")
        if proc.returncode:
            failures.append(script.name)
    summary = summarise()
    (RESULTS / "SUMMARY.md").write_text(summary)
    print("\n" + summary)
    if failures:
        print("failed:", ", ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
