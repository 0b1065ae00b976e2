"""Several worker processes on one Optuna study through a real PostgreSQL server (issue 19).

A throwaway local PostgreSQL server (``skrtl.utils.throwaway_postgres``; Debian's postgresql
package) holds the study. The same budget of trials is run by one worker process, then by
``k`` worker processes at once (one torch thread each), all pointing at the server's URL; the
study must hold every trial of every worker, and the wall time shows the scale-out.

Usage::

    python benchmarks/bench_search_distributed.py          # 12 trials, 1 vs 2 workers
    python benchmarks/bench_search_distributed.py --quick  # 4 trials
"""

from __future__ import annotations

import subprocess
import sys
import time

from _common import DATA_DIR, Benchmark, bench_parser

_WORKER = r"""
import sys
import numpy as np
import optuna
from skrtl import FineTuneClassifier, TransferSearchCV
from skrtl.datasets import load_medmnist
url, name, n_trials, seed, data, n = sys.argv[1:7]
X, y = load_medmnist(data, split="train")
X, y = X[: int(n)], y[: int(n)]
clf = FineTuneClassifier(input_size=32, max_epochs=3, n_estimators=1, random_state=0)
space = {
    "freeze_depth": optuna.distributions.IntDistribution(3, 8),
    "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
}
TransferSearchCV(clf, param_distributions=space, n_trials=int(n_trials), cv=2,
                 scoring="roc_auc", random_state=int(seed), storage=url, study_name=name,
                 load_if_exists=True, pruner=None, refit=False).fit(X, y)
"""


def _run(url, name, n_workers, n_trials, data, n_images):
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                url,
                name,
                str(n_trials // n_workers),
                str(seed),
                str(data),
                str(n_images),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        for seed in range(n_workers)
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(err[-3000:])
    return time.perf_counter() - t0


def summarise(rows):
    out = {f"workers{r['n_workers']}.seconds": r["seconds"] for r in rows}
    out.update({f"workers{r['n_workers']}.trials_in_study": r["trials"] for r in rows})
    if len(rows) == 2:
        out["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
        out["every_trial_stored"] = all(r["trials"] == r["expected"] for r in rows)
    return out


def main(argv=None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    bench = Benchmark("search_distributed", issue=19, args=args)
    import optuna

    from skrtl.utils import find_postgres_bin, throwaway_postgres

    if find_postgres_bin() is None:
        sys.exit("PostgreSQL server binaries not found (apt-get install postgresql)")
    data = DATA_DIR / "breastmnist.npz"
    n_trials, n_images = (4, 80) if bench.quick else (12, 200)
    rows = []
    with throwaway_postgres() as url:
        for k in (1, args.workers):
            name = f"bench-{k}-workers"
            seconds = _run(url, name, k, n_trials, data, n_images)
            study = optuna.load_study(study_name=name, storage=url)
            trials = study.get_trials(deepcopy=False)
            workers = {t.user_attrs.get("worker") for t in trials}
            rows.append({"n_workers": k, "seconds": seconds, "trials": len(trials),
                         "expected": n_trials, "distinct_workers": len(workers)})  # fmt: skip
            print(f"{k} worker(s): {seconds:6.1f} s, {len(trials)} trials from "
                  f"{len(workers)} processes", flush=True)  # fmt: skip
    bench.write(
        config={"n_trials": n_trials, "n_images": n_images, "cv": 2, "max_epochs": 3},
        results=rows,
        summary=summarise(rows),
        notes=["workers run at once, one torch thread each; the study lives in PostgreSQL"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
