"""Peak memory of CNN features on a cohort of files: 50 vs 400 cases, loaded lazily.

A cohort of ``N`` distinct NIfTI volumes (``.nii.gz``, int16, 64 x 256 x 256 voxels, spacing
2.5 x 0.8 x 0.8 mm, a smooth texture with noise and a spherical lesion) and their masks is
written to a temporary folder with a cohort CSV. For each cohort size a **fresh process**
reads the CSV with :func:`skrtl.read_cohort` and runs
``PretrainedCNNFeatures(mode="2.5d", input_size=32).fit(X).transform(X)`` on the file frame,
recording its peak resident memory (``ru_maxrss``), its resident memory after ``fit`` (the
backbone loaded, no case read yet) and the time of ``transform``. If cases are loaded one batch
at a time, the peak does not grow with ``N``; holding the cohort in memory would take
``N x 16 MiB`` (float32), which the result lists for comparison. The bounded cache of decoded
cases (:func:`skrtl.case_cache_info`, 256 MiB by default) is part of the measured peak.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_cohort.py          # 50 and 400 cases (~6 min)
    python benchmarks/bench_cohort.py --quick                    # 5 and 20 small cases
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import Benchmark, bench_parser

SHAPE = (64, 256, 256)
SPACING = (2.5, 0.8, 0.8)  # array order (z, y, x), mm


def _rss_mib() -> float:
    """Current resident memory of this process (MiB), from /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:  # pragma: no cover - no /proc
        pass
    return float("nan")


def write_cohort(folder: Path, n: int, shape, seed: int = 0) -> Path:
    """``n`` distinct volumes + masks and ``cohort.csv`` in ``folder``."""
    import pandas as pd
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    base = 40 * np.sin(x / 9.0) * np.cos(y / 13.0) + 20 * np.sin(z / 5.0)
    rows = []
    for i in range(n):
        c = np.array(shape) / 2 + rng.uniform(-0.15, 0.15, 3) * np.array(shape)
        r = rng.uniform(4, 8)
        lesion = ((z - c[0]) * SPACING[0]) ** 2 + ((y - c[1]) * SPACING[1]) ** 2
        lesion = lesion + ((x - c[2]) * SPACING[2]) ** 2 <= (r * 2.0) ** 2
        vol = base + 60.0 * lesion + rng.integers(-3, 4, shape)
        img = sitk.GetImageFromArray(vol.astype(np.int16))
        img.SetSpacing(tuple(float(s) for s in SPACING[::-1]))
        msk = sitk.GetImageFromArray(lesion.astype(np.uint8))
        msk.CopyInformation(img)
        sitk.WriteImage(img, str(folder / f"case{i:04d}.nii.gz"), useCompression=True)
        sitk.WriteImage(msk, str(folder / f"case{i:04d}_mask.nii.gz"), useCompression=True)
        rows.append(
            {
                "id": f"case{i:04d}",
                "image": f"case{i:04d}.nii.gz",
                "mask": f"case{i:04d}_mask.nii.gz",
                "site": "AB"[i % 2],
            }
        )
    csv = folder / "cohort.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def worker(csv: str, n: int, input_size: int, batch_size: int) -> dict:
    """Run in a fresh process: features of the first ``n`` cases; memory and time."""
    from skrtl import PretrainedCNNFeatures, case_cache_info, read_cohort

    X = read_cohort(csv, id="id").iloc[:n]
    fe = PretrainedCNNFeatures(
        mode="2.5d", input_size=input_size, batch_size=batch_size, cache=False, precision="fp32"
    )
    fe.fit(X)
    after_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    rss_fit = _rss_mib()
    t0 = time.perf_counter()
    F = fe.transform(X)
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "n_cases": n,
        "features_shape": list(F.shape),
        "features_finite": bool(np.isfinite(F).all()),
        "rss_after_fit_mib": round(rss_fit, 1),
        "peak_rss_before_transform_mib": round(after_fit, 1),
        "peak_rss_mib": round(peak, 1),
        "transform_seconds": round(sec, 2),
        "seconds_per_case": round(sec / n, 4),
        "case_cache": case_cache_info(),
    }


def summarise(rows) -> dict:
    by_n = {r["n_cases"]: r for r in rows if r.get("section") == "peak_rss"}
    out = {f"{n}.peak_rss_mib": r["peak_rss_mib"] for n, r in sorted(by_n.items())}
    out.update({f"{n}.seconds_per_case": r["seconds_per_case"] for n, r in sorted(by_n.items())})
    if len(by_n) >= 2:
        small, large = min(by_n), max(by_n)
        growth = by_n[large]["peak_rss_mib"] - by_n[small]["peak_rss_mib"]
        out["peak_growth_mib"] = round(growth, 1)
        out["peak_ratio"] = round(by_n[large]["peak_rss_mib"] / by_n[small]["peak_rss_mib"], 3)
        # lazy loading: the peak grows by less than the size of two volumes
        one_volume = 4 * int(np.prod(by_n[large]["volume_shape"])) / 2**20
        out["target_peak_independent_of_n"] = bool(growth < 2 * one_volume)
    return out


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep", type=Path, default=None, help="write the cohort here, keep it")
    parser.add_argument("--worker", nargs=2, metavar=("CSV", "N"), help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.worker:
        res = worker(args.worker[0], int(args.worker[1]), args.input_size, args.batch_size)
        print("RESULT " + json.dumps(res), flush=True)
        return
    bench = Benchmark("cohort", issue=14, args=args)
    sizes = args.sizes or ([5, 20] if bench.quick else [50, 400])
    shape = (16, 64, 64) if bench.quick else SHAPE
    folder = args.keep or Path(tempfile.mkdtemp(prefix="skrtl_bench_cohort_"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        t0 = time.perf_counter()
        csv = write_cohort(folder, max(sizes), shape)
        write_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in folder.glob("*.nii.gz")) / 2**20
        print(f"wrote {max(sizes)} cases ({disk:.0f} MiB) in {write_s:.0f} s", flush=True)
        for n in sizes:
            cmd = [sys.executable, __file__, "--worker", str(csv), str(n)]
            cmd += ["--input-size", str(args.input_size), "--batch-size", str(args.batch_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"worker for n={n} failed:\n{proc.stdout}\n{proc.stderr}")
            res = json.loads(line[-1][len("RESULT ") :])
            res.update(
                section="peak_rss",
                volume_shape=list(shape),
                in_memory_cohort_mib=round(n * 4 * int(np.prod(shape)) / 2**20, 1),
            )
            print(res, flush=True)
            rows.append(res)
            bench.write(
                config={
                    "sizes": sizes,
                    "volume_shape": list(shape),
                    "spacing_mm": list(SPACING),
                    "format": "NIfTI .nii.gz, int16 image, uint8 mask",
                    "estimator": "PretrainedCNNFeatures(mode='2.5d', cache=False, "
                    f"precision='fp32', input_size={args.input_size}, "
                    f"batch_size={args.batch_size})",
                    "disk_mib": round(disk, 1),
                    "write_seconds": round(write_s, 1),
                },
                results=rows,
                summary=summarise(rows),
                notes=[
                    "Each size runs in a fresh process; peak_rss_mib is its ru_maxrss (backbone "
                    "and libraries included), rss_after_fit_mib its resident memory before "
                    "the first case is read.",
                    "in_memory_cohort_mib: what the cohort would take loaded as float32.",
                ],
            )
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
