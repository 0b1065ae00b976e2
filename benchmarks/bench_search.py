"""Optuna search of freeze depth k, gamma, lr and strategy on BreastMNIST, with pruning.

A 20-trial :class:`~skrtl._search.TransferSearchCV` over
:class:`~skrtl._finetune.FineTuneClassifier` (embedded ImageNet EfficientNet-Lite0, 28 px
images resized to 32 px, grayscale) with 2-fold cross-validated ROC AUC, the default
fold-aware median pruner, TPE sampler with a fixed seed, then a refit of the best
configuration on the whole search set and its ROC AUC on the official BreastMNIST test
split (156 images, never seen by the search).

To fit a 20-trial search into 10 minutes on a shared 2-core CPU:

* the search set is a stratified subsample of the pooled train + val splits (``--n-train``);
* 3 epochs per fit, no augmentation (so the frozen prefix of the network is computed once
  per fit), no early stopping (so "epochs saved by pruning" is exact);
* the freeze depth is searched over ``k = 5 .. 9`` of the ``L = 10`` transfer layers (plus
  the ``linear_probe`` strategy). Shallower ``k`` fine-tunes the expensive early stages and
  costs several minutes per fit on this CPU; with a GPU use the default space
  (``param_distributions=None``, ``k = 0 .. 9``);
* ``timeout`` stops starting new trials after ``--budget`` seconds, so the benchmark ends
  in time even when the machine is busier than expected (the JSON reports how many trials
  ran).

Reported: trials complete / pruned, epochs run vs. epochs a search without pruning would
have run (the pruned trials' remaining epochs and folds), the fraction saved, best
parameters, best cross-validated AUC, test AUC of the refit model and wall time.

Usage::

    python benchmarks/bench_search.py            # full run (20 s idle .. 10 min busy, 2 cores)
    python benchmarks/bench_search.py --quick    # smoke run (4 trials, 1 minute or two)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA_DIR = Path(os.environ.get("SKRTL_DATA_DIR", HERE.parent.parent / "shared" / "data"))


def load_breastmnist(n_train: int, seed: int):
    path = DATA_DIR / "breastmnist.npz"
    if not path.is_file():
        return None
    with np.load(path) as d:
        X = np.concatenate([d["train_images"], d["val_images"]])
        y = np.concatenate([d["train_labels"], d["val_labels"]]).ravel()
        X_test, y_test = d["test_images"], d["test_labels"].ravel()
    if n_train < len(X):
        from sklearn.model_selection import train_test_split

        X, _, y, _ = train_test_split(X, y, train_size=n_train, stratify=y, random_state=seed)
    return X, y, X_test, y_test


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--n-train", type=int, default=780)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=96, help="network input size (px)")
    parser.add_argument("--cv", type=int, default=2)
    parser.add_argument("--budget", type=float, default=500.0, help="search timeout (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plots", action="store_true", help="write PNG plots to /tmp")
    parser.add_argument("--out", type=Path, default=RESULTS / "search.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_trials, args.n_train, args.epochs, args.budget = 4, 120, 2, 120.0
        if args.out == RESULTS / "search.json":  # a smoke run keeps the full results
            args.out = RESULTS / "quick" / "search.json"

    try:
        from skrtl._finetune import FineTuneClassifier
    except ImportError:
        print("skrtl._finetune.FineTuneClassifier is not available: nothing to benchmark.")
        return 1
    from sklearn.metrics import roc_auc_score

    from skrtl._search import TransferSearchCV

    data = load_breastmnist(args.n_train, args.seed)
    if data is None:
        print(f"breastmnist.npz not found in {DATA_DIR}; set SKRTL_DATA_DIR.")
        return 1
    X, y, X_test, y_test = data

    def space(trial):
        strategy = trial.suggest_categorical("strategy", ["finetune", "linear_probe"])
        params = {"strategy": strategy, "lr": trial.suggest_float("lr", 1e-4, 3e-2, log=True)}
        if strategy == "finetune":
            params["freeze_depth"] = trial.suggest_int("freeze_depth", 5, 9)
            params["gamma"] = trial.suggest_float("gamma", 0.1, 1.0, log=True)
        return params

    est = FineTuneClassifier(
        input_size=args.input_size,
        max_epochs=args.epochs,
        batch_size=32,
        augment=False,
        early_stopping=False,
        validation_fraction=0.2,
        n_estimators=1,  # one network per trial and fold (the recorded results)
        tta=False,
        device="cpu",
        random_state=args.seed,
    )
    search = TransferSearchCV(
        est,
        param_distributions=space,
        n_trials=args.n_trials,
        timeout=args.budget,
        cv=args.cv,
        scoring="roc_auc",
        pruner="median",
        random_state=args.seed,
        plots_dir=Path("/tmp/skrtl_bench_search_plots") if args.plots else None,
        verbose=1,
    )
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        search.fit(X, y)
    search_time = time.perf_counter() - t0 - search.refit_time_
    test_auc = float(roc_auc_score(y_test, search.predict_proba(X_test)[:, 1]))
    total_time = time.perf_counter() - t0

    res = search.cv_results_
    rows = []
    for i in range(len(res["number"])):
        rows.append(
            {
                "trial": int(res["number"][i]),
                "state": str(res["state"][i]),
                "params": {
                    k: (float(v) if isinstance(v, float) else v)
                    for k, v in res["params"][i].items()
                },
                "cv_auc": None
                if np.isnan(res["mean_test_score"][i])
                else round(float(res["mean_test_score"][i]), 4),
                "epochs_run": int(res["epochs_run"][i]),
                "epochs_unpruned": int(res["epochs_unpruned"][i]),
            }
        )
    summary = {
        "benchmark": "bench_search",
        "data": "BreastMNIST (MedMNIST v2, 28 px): stratified subsample of train+val for the "
        "search, official test split for the final AUC",
        "n_search": int(len(y)),
        "n_test": int(len(y_test)),
        "estimator": "FineTuneClassifier(tf_efficientnet_lite0 ImageNet, "
        f"input_size={args.input_size}, "
        f"max_epochs={args.epochs}, augment=False, early_stopping=False, "
        "validation_fraction=0.2)",
        "space": "strategy {finetune, linear_probe}; lr log [1e-4, 3e-2]; finetune only: "
        "freeze_depth int [5, 9] (L=10), gamma log [0.1, 1]",
        "cv": args.cv,
        "scoring": "roc_auc",
        "pruner": "median (CVMedianPruner: 5 startup trials, 1 warm-up epoch per fold)",
        "n_trials_requested": args.n_trials,
        "n_trials": {k: int(v) for k, v in search.n_trials_.items()},
        "epochs_run": search.epochs_run_,
        "epochs_without_pruning": search.epochs_unpruned_,
        "fraction_epochs_saved": round(search.pruned_epoch_fraction_, 4),
        "best_params": {
            k: (round(v, 6) if isinstance(v, float) else v) for k, v in search.best_params_.items()
        },
        "best_cv_auc": round(search.best_score_, 4),
        "test_auc": round(test_auc, 4),
        "reference_test_auc": "MedMNIST v2 paper, ResNet-18 (28 px, 100 epochs on all 546 "
        "train images): 0.901",
        "search_seconds": round(search_time, 1),
        "refit_seconds": round(search.refit_time_, 1),
        "total_seconds": round(total_time, 1),
        "within_10_minutes": bool(total_time <= 600),
        "machine": f"shared 2-core CPU ({platform.processor() or platform.machine()}), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, other jobs running",
        "load_average_1min_start_end": [
            load_start,
            os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        ],
        "quick": bool(args.quick),
        "trials": rows,
    }

    print()
    print(f"{'trial':>5} {'state':>9} {'cv_auc':>7} {'epochs':>7}  params")
    for r in rows:
        auc = "-" if r["cv_auc"] is None else f"{r['cv_auc']:.3f}"
        print(
            f"{r['trial']:>5} {r['state']:>9} {auc:>7} "
            f"{r['epochs_run']:>3}/{r['epochs_unpruned']:<3}  {r['params']}"
        )
    print()
    for key in (
        "n_trials",
        "epochs_run",
        "epochs_without_pruning",
        "fraction_epochs_saved",
        "best_params",
        "best_cv_auc",
        "test_auc",
        "search_seconds",
        "total_seconds",
    ):
        print(f"{key:>24}: {summary[key]}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
