"""Time and peak memory of the shift diagnostics on CNN-sized feature matrices (issue 15).

``diagnose_shift`` and ``mmd_test`` (rbf and laplacian kernels) on 1000 source + 1000 target
samples of 1280 features (the width of lite0's pooled features). Each case runs in its own
subprocess so that its peak resident memory (``ru_maxrss``) is its own. The memory target: a
few kernel matrices, never an ``(n, n, n_features)`` array (which would be 38 GiB here).

Usage::

    python benchmarks/bench_diagnostics.py          # 1000 + 1000 x 1280
    python benchmarks/bench_diagnostics.py --quick  # 200 + 200 x 256
"""

from __future__ import annotations

import json
import subprocess
import sys

from _common import Benchmark, bench_parser

_CHILD = r"""
import json, resource, sys, time
import numpy as np
from skrtl import diagnose_shift, mmd_test
n, d, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
Xs = rng.normal(size=(n, d)).astype(np.float64)
Xt = rng.normal(0.1, 1.0, size=(n, d))
ys = rng.integers(0, 2, n)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if case == "diagnose_shift":
    diag = diagnose_shift(Xs, ys, Xt, n_permutations=200, n_bootstrap=50, random_state=0)
    extra = {"covariate_shift": bool(diag.covariate_shift)}
else:
    res = mmd_test(Xs, Xt, kernel=case.split(":")[1], n_permutations=200, random_state=0)
    extra = {"p_value": res.p_value}
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak / 1024,
                  "rss_increase_mib": (peak - base) / 1024, **extra}))
"""

CASES = ("mmd_test:rbf", "mmd_test:laplacian", "diagnose_shift")


def summarise(rows: list[dict]) -> dict:
    out = {}
    for row in rows:
        key = row["case"].replace(":", "_")
        out[f"{key}.seconds"] = row["seconds"]
        out[f"{key}.rss_increase_mib"] = row["rss_increase_mib"]
    kernel_mib = rows[0]["kernel_matrix_mib"] if rows else None
    out["kernel_matrix_mib"] = kernel_mib
    if rows:
        worst = max(r["rss_increase_mib"] for r in rows)
        out["memory_bounded_by_20_kernel_matrices"] = bool(worst <= 20 * kernel_mib)
    return out


def main(argv=None) -> int:
    parser = bench_parser(__doc__)
    args = parser.parse_args(argv)
    bench = Benchmark("diagnostics", issue=15, args=args)
    n, d = (200, 256) if bench.quick else (1000, 1280)
    kernel_mib = (2 * n) ** 2 * 8 / 2**20
    rows = []
    for case in CASES:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(n), str(d), case],
            capture_output=True,
            text=True,
            check=True,
        )
        row = {"case": case, "n_source": n, "n_target": n, "n_features": d}
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        row["kernel_matrix_mib"] = kernel_mib
        rows.append(row)
        print(
            f"{case:22s} {row['seconds']:7.2f} s  +{row['rss_increase_mib']:7.1f} MiB "
            f"(one kernel matrix: {kernel_mib:.1f} MiB)",
            flush=True,
        )
    bench.write(
        config={"n_source": n, "n_target": n, "n_features": d, "n_permutations": 200},
        results=rows,
        summary=summarise(rows),
        notes=["peak RSS increase over the process after imports and data, per case"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
