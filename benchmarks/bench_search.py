"""Optuna search of freeze depth k, gamma, lr and strategy on BreastMNIST, with pruning.

A 20-trial :class:`~skrtl.TransferSearchCV` over
:class:`~skrtl.FineTuneClassifier` (embedded ImageNet EfficientNet-Lite0, 28 px
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

    python benchmarks/bench_search.py            # full run (within 10 minutes on 2 cores)
    python benchmarks/bench_search.py --quick    # smoke run (4 trials)

Results: ``results/search.json`` (schema in ``_common.py``): one row of ``section`` "search"
(the outcome), one of ``section`` "trial" per trial.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from _common import Benchmark, Stopwatch, bench_parser, flat_summary, load_medmnist_splits, pooled


def load_breastmnist(n_train: int, seed: int):
    splits = load_medmnist_splits("breastmnist")
    X, y = pooled(splits, "train", "val")
    X_test, y_test = splits["test"]
    if n_train < len(X):
        from sklearn.model_selection import train_test_split

        X, _, y, _ = train_test_split(X, y, train_size=n_train, stratify=y, random_state=seed)
    return X, y, X_test, y_test


def summarise(rows) -> dict:
    """The result's ``summary``: trials, epochs saved by pruning, AUCs and wall time."""
    metrics = [
        "epochs_run",
        "epochs_without_pruning",
        "fraction_epochs_saved",
        "best_cv_auc",
        "test_auc",
        "search_seconds",
        "refit_seconds",
        "total_seconds",
        "within_10_minutes",
    ]
    summary = {}
    for row in (r for r in rows if r["section"] == "search"):
        summary.update({f"n_trials.{k}": v for k, v in row["n_trials"].items()})
        summary.update(flat_summary([row], keys=[], metrics=metrics))
        numeric = {k: v for k, v in row["best_params"].items() if not isinstance(v, str)}
        summary.update({f"best_params.{k}": v for k, v in numeric.items()})
    return summary


def main(argv=None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--n-train", type=int, default=780)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=96, help="network input size (px)")
    parser.add_argument("--cv", type=int, default=2)
    parser.add_argument("--budget", type=float, default=500.0, help="search timeout (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plots", action="store_true", help="write PNG plots to /tmp")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_trials, args.n_train, args.epochs, args.budget = 4, 120, 2, 120.0
    bench = Benchmark("search", issue=7, args=args)

    from sklearn.metrics import roc_auc_score

    from skrtl import FineTuneClassifier, TransferSearchCV

    X, y, X_test, y_test = load_breastmnist(args.n_train, args.seed)

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
    with Stopwatch() as sw:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            search.fit(X, y)
        search_time = sw.seconds - search.refit_time_
        test_auc = float(roc_auc_score(y_test, search.predict_proba(X_test)[:, 1]))
    total_time = sw.seconds

    res = search.cv_results_
    trials = []
    for i in range(len(res["number"])):
        trials.append(
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
    outcome = {
        "n_search": int(len(y)),
        "n_test": int(len(y_test)),
        "n_trials": {k: int(v) for k, v in search.n_trials_.items()},
        "epochs_run": search.epochs_run_,
        "epochs_without_pruning": search.epochs_unpruned_,
        "fraction_epochs_saved": round(search.pruned_epoch_fraction_, 4),
        "best_params": {
            k: (round(v, 6) if isinstance(v, float) else v) for k, v in search.best_params_.items()
        },
        "best_cv_auc": round(search.best_score_, 4),
        "test_auc": round(test_auc, 4),
        "search_seconds": round(search_time, 1),
        "refit_seconds": round(search.refit_time_, 1),
        "total_seconds": round(total_time, 1),
        "within_10_minutes": bool(total_time <= 600),
    }

    print()
    print(f"{'trial':>5} {'state':>9} {'cv_auc':>7} {'epochs':>7}  params")
    for r in trials:
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
        print(f"{key:>24}: {outcome[key]}")

    rows = [{"section": "search", **outcome}] + [{"section": "trial", **t} for t in trials]
    config = {
        "data": "BreastMNIST (MedMNIST v2, 28 px): stratified subsample of train+val for the "
        "search, official test split for the final AUC",
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
        "n_train": args.n_train,
        "epochs": args.epochs,
        "input_size": args.input_size,
        "budget_seconds": args.budget,
        "seed": args.seed,
        "reference_test_auc": "MedMNIST v2 paper, ResNet-18 (28 px, 100 epochs on all 546 "
        "train images): 0.901",
    }
    bench.write(config=config, results=rows, summary=summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
