"""Run every skrtl benchmark and summarise the results in ``SUMMARY.md``.

Usage::

    python benchmarks/run_all.py                   # full runs (tens of minutes on 2 CPU cores)
    python benchmarks/run_all.py --quick           # smoke run of each
    python benchmarks/run_all.py --only features finetune
    python benchmarks/run_all.py --summary-only    # summarise results/*.json, run nothing

Each ``bench_<name>.py`` script prints its own tables and writes ``results/<name>.json``
(``results/quick/<name>.json`` with ``--quick``) in the schema of ``_common.py``. This runner
calls them one after the other (so that their timings do not compete for the cores), then
writes one Markdown table per result file, from its ``summary``, to ``SUMMARY.md`` in the same
folder. Result files written before the shared harness are converted on read.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, QUICK_RESULTS, RESULTS, read_result


def _scripts(only: list[str] | None) -> list[Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in only]
    return scripts


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _machine_line(machine: dict) -> str:
    if machine.get("description"):  # results written before the harness
        return str(machine["description"])
    versions = machine.get("versions", {})
    parts = [
        f"{machine.get('cpu')} ({machine.get('cores_available')} cores)",
        f"torch threads {machine.get('torch_threads')}",
        f"OMP_NUM_THREADS={machine.get('omp_num_threads')}",
        f"load {machine.get('load_average_1min_start')} -> {machine.get('load_average_1min_end')}",
        ", ".join(f"{k} {v}" for k, v in versions.items() if v),
    ]
    if machine.get("git"):
        parts.append(f"git {machine['git']}")
    if machine.get("started_utc"):
        parts.append(str(machine["started_utc"]))
    return "; ".join(parts)


def summarise(folder: Path = RESULTS) -> str:
    """The Markdown summary of the result files in ``folder``: one table per file."""
    lines = ["# Benchmark summary", ""]
    for path in sorted(folder.glob("*.json")):
        try:
            data = read_result(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # say so, go on
            lines += [f"## {path.stem}", "", f"unreadable: {type(exc).__name__}: {exc}", ""]
            continue
        title = data["benchmark"] if data["benchmark"] == path.stem else path.stem
        lines += [
            f"## {title} (issue {data.get('issue')}, {data.get('profile')})",
            "",
            f"{path.name}; {_machine_line(data.get('machine', {}))}",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {key} | {_format(val)} |" for key, val in data["summary"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of each benchmark")
    parser.add_argument("--only", nargs="*", help="benchmark names, e.g. features finetune")
    parser.add_argument(
        "--summary-only", action="store_true", help="summarise the result files, run nothing"
    )
    args = parser.parse_args(argv)
    folder = QUICK_RESULTS if args.quick else RESULTS
    failures = []
    for script in [] if args.summary_only else _scripts(args.only):
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"\n=== {script.name} {'(quick)' if args.quick else ''}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=HERE.parent)
        print(f"=== {script.name}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s")
        if proc.returncode:
            failures.append(script.name)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise(folder)
    (folder / "SUMMARY.md").write_text(summary)
    print("\n" + summary)
    if failures:
        print("failed:", ", ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
