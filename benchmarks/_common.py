"""Shared harness of the benchmark scripts: data, machine info, command line, timing, results.

Every ``bench_<name>.py`` script uses this module for its plumbing, so that what differs between
the scripts is only what they measure. A script looks like this::

    from _common import Benchmark, bench_parser, load_medmnist_splits, pooled

    def main(argv=None):
        parser = bench_parser(__doc__)  # --quick and --out, add your own options
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(argv)
        bench = Benchmark("name", issue=9, args=args)  # records the machine at the start
        splits = load_medmnist_splits("breastmnist")  # {"train": (X, y), "val": ..., "test": ...}
        X, y = pooled(splits, "train", "val")
        ...
        bench.write(config={...}, results=rows, summary=summarise(rows), notes=[...])

Conventions: each script defines ``summarise(rows) -> dict``, the flat ``summary`` of its
result rows (``_legacy.py`` reuses it for old result files); rows of different kinds carry a
``section`` key; ``--quick`` shrinks every size so that a run takes a minute or two and
checks the plumbing, not the numbers.

API
---
``DATA_DIR``
    The data folder: ``$SKRTL_DATA_DIR``, else ``<repo>/../shared/data``.
``load_medmnist_splits(name, *, splits=..., missing="exit")``
    The splits of ``DATA_DIR/<name>.npz`` read through :func:`skrtl.datasets.load_medmnist`:
    ``{split: (images, labels)}``. A missing file ends the script with a message
    (``missing="exit"``), or prints it and returns ``None`` (``missing="skip"``).
``pooled(splits, *names)``
    The named splits concatenated: ``(images, labels)``.
``bench_parser(doc)``
    An ``argparse.ArgumentParser`` with ``--quick`` (smoke profile: tiny sizes) and ``--out``.
``Benchmark(name, *, issue, args)``
    One run: records :func:`machine_info` at the start; ``.quick``, ``.profile`` and ``.out``
    (``results/<name>.json``, or ``results/quick/<name>.json`` for ``--quick``);
    ``.write(config=, results=, summary=, notes=)`` writes the result (call it as often as
    you like, e.g. after each section; a quick run never overwrites a full result).
``machine_info()``
    CPU model and cores, torch threads, ``OMP_NUM_THREADS``, load average, package versions,
    git commit.
``package_version(dist)``
    The installed version of a distribution, or ``None``.
``Stopwatch``
    ``with Stopwatch() as sw: ...`` then ``sw.seconds``; or ``sw = Stopwatch()`` ...
    ``sw.stop()`` (returns the seconds).
``alternate(funcs, repeats)``
    Times several functions side by side (each once per round, ``repeats`` rounds), so that a
    busy machine affects them alike: ``(seconds, last_outputs)``, ``seconds[key]`` a list with
    one entry per round. Use ``min`` (best of k) for rates and per-round quotients for ratios.
``flat_summary(rows, keys=, metrics=, section=None)``
    ``{"<row keys>.<metric>": value}`` from result rows (of one ``section``), for the
    ``summary`` field.
``read_result(path)``
    A result file in the schema below; files written before this harness are converted on
    read (``_legacy.py``), keeping every measured number.

Result schema (JSON, one file per run)::

    {
      "benchmark": "fusion",         # the script's name, bench_<name>.py
      "issue": 9,                    # the issue that set the benchmark's targets
      "profile": "full",             # or "quick" (smoke run: tiny sizes, not a measurement)
      "machine": {...},              # machine_info() at the start, load average at the end
      "config": {...},               # what was run: sizes, seeds, settings, references
      "results": [{...}, ...],       # the measured rows (a "section" key where kinds differ)
      "summary": {"metric": 0.9},    # flat metric name -> number (bool for a target)
      "notes": ["..."]               # free text: caveats, what a number means
    }

``run_all.py`` prints one Markdown table per result file from its ``summary``.

Importing this module puts the repository root on ``sys.path`` (first, unless it is there
already), so that a benchmark measures the checkout it lives in, not an installed skrtl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
QUICK_RESULTS = RESULTS / "quick"
DATA_DIR = Path(os.environ.get("SKRTL_DATA_DIR") or REPO.parent / "shared" / "data")
PROFILES = ("quick", "full")
SPLITS = ("train", "val", "test")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# -- data -------------------------------------------------------------------------------------
def load_medmnist_splits(
    name: str = "breastmnist", *, splits: Sequence[str] = SPLITS, missing: str = "exit"
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Read the splits of ``DATA_DIR/<name>.npz`` with :func:`skrtl.datasets.load_medmnist`.

    Parameters
    ----------
    name : str
        File stem of the MedMNIST data set, e.g. ``"breastmnist"``.
    splits : sequence of {"train", "val", "test"}
    missing : {"exit", "skip"}
        A missing file ends the script with a message, or prints it and returns ``None``.

    Returns
    -------
    dict or None
        ``{split: (images, labels)}``: raw ``uint8`` images, labels flattened to 1-D.
    """
    if missing not in ("exit", "skip"):
        raise ValueError(f"missing must be 'exit' or 'skip', got {missing!r}.")
    from skrtl.datasets import load_medmnist

    path = DATA_DIR / f"{name}.npz"
    if not path.is_file():
        message = f"{path.name} not found in {DATA_DIR} (set SKRTL_DATA_DIR)"
        if missing == "exit":
            sys.exit(message)
        print(f"{message}; skipped", flush=True)
        return None
    return {split: load_medmnist(path, split=split) for split in splits}


def pooled(splits: Mapping[str, tuple[np.ndarray, np.ndarray]], *names: str):
    """The named splits concatenated, in the order given: ``(images, labels)``."""
    images = np.concatenate([splits[n][0] for n in names])
    labels = np.concatenate([splits[n][1] for n in names])
    return images, labels


# -- machine ----------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(dist: str) -> str | None:
    """Installed version of a distribution, or ``None``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=10"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def load_average() -> float | None:
    """The 1-minute load average, or ``None`` where the platform has none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    """What the timings depend on: CPU, cores, threads, load and package versions."""
    import torch

    import skrtl
    from skrtl.utils import bf16_supported

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        # the vector units the CPU kernels use (e.g. AVX2, AVX512) and whether bf16 is fast
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_kernels": bf16_supported(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "cores_available": cores,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1min_start": load_average(),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": {
            "skrtl": skrtl.__version__,
            "torch": torch.__version__,
            "timm": package_version("timm"),
            "scikit-learn": package_version("scikit-learn"),
            "numpy": np.__version__,
        },
        "git": _git_commit(),
    }


# -- command line and results -----------------------------------------------------------------
def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """Command line with the options every benchmark has: ``--quick`` and ``--out``."""
    parser = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0] if doc else None,
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run with tiny sizes (not a measurement)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result JSON (default results/<name>.json, results/quick/<name>.json for --quick)",
    )
    return parser


def _profile_of(data: dict) -> str:
    if "profile" in data:
        return data["profile"]
    return "quick" if data.get("quick") else "full"  # files written before this harness


class Benchmark:
    """One run of a benchmark: its name, profile, output path and machine.

    Parameters
    ----------
    name : str
        The script's name (``bench_<name>.py``) and the default file stem of its result.
    issue : int
        The issue whose targets the benchmark measures.
    args : argparse.Namespace
        Parsed :func:`bench_parser` options (``quick``, ``out``).
    """

    def __init__(self, name: str, *, issue: int, args: argparse.Namespace) -> None:
        self.name = name
        self.issue = issue
        self.quick = bool(args.quick)
        self.profile = "quick" if self.quick else "full"
        default = (QUICK_RESULTS if self.quick else RESULTS) / f"{name}.json"
        self.out = Path(args.out) if args.out is not None else default
        if self.quick and self.out.resolve().parent == RESULTS.resolve():
            sys.exit(
                f"--quick writes under {QUICK_RESULTS}, not next to the full results; got "
                f"--out {str(self.out)!r}. Drop --out or choose another folder."
            )
        self.machine = machine_info()

    def write(
        self,
        *,
        config: Mapping,
        results: Sequence[Mapping],
        summary: Mapping,
        notes: Iterable[str] = (),
    ) -> Path:
        """Write the result JSON to ``self.out`` (again) and return its path."""
        if self.quick and self.out.is_file():
            try:
                existing = json.loads(self.out.read_text())
            except (OSError, json.JSONDecodeError):
                existing = {}
            if _profile_of(existing) == "full":
                raise RuntimeError(
                    f"{self.out} holds a full result; a --quick run does not overwrite it. "
                    "Pass another --out."
                )
        machine = dict(self.machine, load_average_1min_end=load_average())
        data = {
            "benchmark": self.name,
            "issue": self.issue,
            "profile": self.profile,
            "machine": machine,
            "config": dict(config),
            "results": [dict(r) for r in results],
            "summary": dict(summary),
            "notes": list(notes),
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {self.out}", flush=True)
        return self.out


def flat_summary(
    rows: Iterable[Mapping],
    *,
    keys: Sequence[str],
    metrics: Sequence[str],
    section: str | None = None,
    ndigits: int | None = None,
) -> dict:
    """``{"<values of keys>.<metric>": value}`` for the numeric metrics of each row.

    Only rows of ``section`` count when it is given; rows without all of ``keys`` are passed
    over, and so are metrics a row lacks or holds as ``None``; ``ndigits`` rounds the floats.
    """
    out = {}
    for row in rows:
        if (section is not None and row.get("section") != section) or any(
            k not in row for k in keys
        ):
            continue
        prefix = ".".join(str(row[k]) for k in keys)
        for metric in metrics:
            value = row.get(metric)
            if isinstance(value, bool | int | float):
                if ndigits is not None and isinstance(value, float):
                    value = round(value, ndigits)
                out[f"{prefix}.{metric}" if prefix else metric] = value
    return out


def read_result(path: str | os.PathLike) -> dict:
    """Read a result file in the harness schema, converting the shapes written before it."""
    path = Path(path)
    data = json.loads(path.read_text())
    if "profile" not in data:
        from _legacy import upgrade

        data = upgrade(data, path.stem)
    return data


# -- timing -----------------------------------------------------------------------------------
class Stopwatch:
    """Wall time: of a ``with`` block, or from creation to :meth:`stop`.

    ``with Stopwatch() as sw: ...`` then ``sw.seconds``; or ``sw = Stopwatch()`` ...
    ``seconds = sw.stop()``. Before it stops, ``seconds`` is the time so far.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._stop: float | None = None

    @property
    def seconds(self) -> float:
        end = self._stop if self._stop is not None else time.perf_counter()
        return end - self._start

    def stop(self) -> float:
        """Stop the watch (again) and return the seconds since it started."""
        self._stop = time.perf_counter()
        return self.seconds

    def __enter__(self) -> Stopwatch:
        self._start, self._stop = time.perf_counter(), None
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def alternate(
    funcs: Mapping[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Time functions side by side: ``repeats`` rounds, each function once per round.

    Returns
    -------
    seconds : dict of str to list of float
        The wall time of each call, one entry per round.
    outputs : dict of str to object
        What each function returned in the last round.
    """
    seconds: dict[str, list[float]] = {key: [] for key in funcs}
    outputs: dict[str, object] = {}
    for _ in range(repeats):
        for key, func in funcs.items():
            start = time.perf_counter()
            outputs[key] = func()
            seconds[key].append(time.perf_counter() - start)
    return seconds, outputs
