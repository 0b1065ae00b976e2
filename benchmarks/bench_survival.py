"""Cross-validated survival prediction from real PyRadiomics features (Lung1 NSCLC).

Data: ``lung1_pyradiomics_gtv1_survival.csv.gz`` in the shared data folder -- 1218 PyRadiomics
features (original, LoG, wavelet) of the primary tumour of 145 NSCLC-Radiomics (Lung1)
patients with overall survival (days) and death indicator (129 events), plus clinical
variables (see the data README).

Models, all evaluated on the *same* repeated stratified (by event) K-fold splits; every step
(imputation, scaling, feature selection, Cox fit, hyper-parameter search) is fitted inside the
training folds only:

* ``clinical``: Cox model on age + overall stage (I=1, II=2, IIIa=3, IIIb=4), median imputation;
* ``radiomics``: VarianceThreshold -> StandardScaler -> SelectKBestSurvival(k=10, univariate
  Cox score test) -> CoxPHSurvival(penalizer=0.1);
* ``radiomics-tuned``: the same with ``k`` and ``penalizer`` chosen by an inner 3-fold
  GridSearchCV on Harrell's C (nested cross-validation);
* ``clinical+radiomics``: clinical variables kept, radiomics reduced by the same selection.

Reported: Harrell's C and Uno's IPCW C (censoring distribution of the training folds,
truncated at 2 years) per model, mean and standard deviation over folds, and the paired
per-fold difference against ``clinical``. A Kaplan-Meier plot of out-of-fold predicted risk
groups (split at the training-fold median risk) is written to
``results/survival_km.png``.

Usage::

    python benchmarks/bench_survival.py            # 5 x 5-fold CV
    python benchmarks/bench_survival.py --quick    # 2 x 3-fold, no nested search
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import VarianceThreshold
from sklearn.impute import SimpleImputer
from sklearn.model_selection import GridSearchCV, RepeatedStratifiedKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl._survival import (
    CoxPHSurvival,
    SelectKBestSurvival,
    concordance_index,
    concordance_scorer,
    kaplan_meier,
    make_concordance_scorer,
    make_survival_target,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA_DIR = Path(os.environ.get("SKRTL_DATA_DIR", HERE.parent / ".." / "shared" / "data"))
FILE = "lung1_pyradiomics_gtv1_survival.csv.gz"
STAGE = {"I": 1.0, "II": 2.0, "IIIa": 3.0, "IIIb": 4.0}
CLINICAL = ["age", "stage"]
TAU = 730.0  # Uno's C truncated at 2 years (days)


def load(path: Path):
    df = pd.read_csv(path)
    radiomic = [c for c in df.columns if c.startswith(("original_", "log-", "wavelet-"))]
    X = df[radiomic].astype(float)
    X.insert(0, "stage", df["Overall.Stage"].map(STAGE))
    X.insert(0, "age", df["age"].astype(float))
    y = make_survival_target(df["deadstatus.event"], df["Survival.time"])
    return X, y, radiomic


def _radiomics_steps(k, penalizer):
    return [
        VarianceThreshold(),
        StandardScaler(),
        SelectKBestSurvival(k=k),
        CoxPHSurvival(penalizer=penalizer),
    ]


def make_models(radiomic: list[str], *, quick: bool, seed: int) -> dict:
    clinical = make_pipeline(
        ColumnTransformer([("clin", SimpleImputer(strategy="median"), CLINICAL)]),
        StandardScaler(),
        CoxPHSurvival(penalizer=0.01),
    )
    radiomics = make_pipeline(
        ColumnTransformer([("rad", "passthrough", radiomic)]), *_radiomics_steps(10, 0.1)
    )
    combined = make_pipeline(
        ColumnTransformer(
            [
                ("clin", SimpleImputer(strategy="median"), CLINICAL),
                (
                    "rad",
                    make_pipeline(
                        VarianceThreshold(), StandardScaler(), SelectKBestSurvival(k=10)
                    ),
                    radiomic,
                ),
            ]
        ),
        StandardScaler(),
        CoxPHSurvival(penalizer=0.1),
    )
    models = {"clinical": clinical, "radiomics": radiomics, "clinical+radiomics": combined}
    if not quick:
        models["radiomics-tuned"] = GridSearchCV(
            radiomics,
            {
                "selectkbestsurvival__k": [5, 10, 20, 50],
                "coxphsurvival__penalizer": [0.1, 1.0],
            },
            cv=EventStratifiedKFold(3, shuffle=True, random_state=seed),
            scoring=concordance_scorer,
        )
    return models


class EventStratifiedKFold(StratifiedKFold):
    """StratifiedKFold on the event indicator of a structured survival target."""

    def split(self, X, y, groups=None):
        return super().split(X, np.asarray(y["event"]), groups)


def fit_predict(model, X, y, train, test):
    from sklearn.base import clone

    est = clone(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X.iloc[train], y[train])
    return est, est.predict(X.iloc[test]), est.predict(X.iloc[train])


def plot_km(groups: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines.statistics import logrank_test

    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), sharey=True)
    axes = np.atleast_1d(axes)
    pvalues = {}
    for ax, (name, (times, event, high)) in zip(axes, groups.items()):
        for flag, label, color in (
            (False, "low risk", "tab:blue"),
            (True, "high risk", "tab:red"),
        ):
            sel = high == flag
            t, s = kaplan_meier(times[sel], event[sel])
            ax.step(
                np.r_[0, t / 365.25],
                np.r_[1, s],
                where="post",
                color=color,
                label=f"{label} (n={sel.sum()})",
            )
        p = logrank_test(
            times[high], times[~high], event_observed_A=event[high], event_observed_B=event[~high]
        ).p_value
        pvalues[name] = float(p)
        ax.set_title(f"{name}: log-rank p = {p:.2g}")
        ax.set_xlabel("years")
        ax.legend(loc="upper right")
    axes[0].set_ylabel("overall survival")
    fig.suptitle("Lung1: out-of-fold predicted risk groups (training-fold median split)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return pvalues


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)
    path = DATA_DIR / FILE
    if not path.is_file():
        print(f"{FILE} not found under {DATA_DIR} (set SKRTL_DATA_DIR); nothing to do")
        return 0
    from tqdm.auto import tqdm

    start = time.perf_counter()
    X, y, radiomic = load(path)
    n_splits, n_repeats = (3, 2) if args.quick else (5, 5)
    cv = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=args.seed)
    splits = list(cv.split(X, y["event"]))
    models = make_models(radiomic, quick=args.quick, seed=args.seed)
    uno = make_concordance_scorer("uno", tau=TAU)

    scores = {name: {"harrell": [], "uno": []} for name in models}
    oof = {name: {"risk": np.zeros(len(y)), "high": np.zeros(len(y), bool)} for name in models}
    selected: dict[str, int] = {}
    seconds = dict.fromkeys(models, 0.0)
    bar = tqdm(total=len(splits) * len(models), disable=args.verbose == 0, leave=False)
    for fold, (train, test) in enumerate(splits):
        for name, model in models.items():
            t0 = time.perf_counter()
            est, risk, risk_train = fit_predict(model, X, y, train, test)
            seconds[name] += time.perf_counter() - t0
            scores[name]["harrell"].append(concordance_index(y[test], risk))
            scores[name]["uno"].append(uno(est, X.iloc[test], y[test]))
            if fold < n_splits:  # first repetition: out-of-fold risk groups for the KM plot
                oof[name]["risk"][test] = risk
                oof[name]["high"][test] = risk > np.median(risk_train)
            if name == "radiomics":
                sel = est[:-1].get_feature_names_out()
                for f in sel:
                    selected[str(f)] = selected.get(str(f), 0) + 1
            bar.update(1)
    bar.close()

    base = np.asarray(scores["clinical"]["harrell"])
    summary = {}
    for name, sc in scores.items():
        h, u = np.asarray(sc["harrell"]), np.asarray(sc["uno"])
        diff = h - base
        summary[name] = {
            "harrell_mean": round(float(h.mean()), 4),
            "harrell_std": round(float(h.std(ddof=1)), 4),
            "uno_tau2y_mean": round(float(u.mean()), 4),
            "uno_tau2y_std": round(float(u.std(ddof=1)), 4),
            "harrell_minus_clinical_mean": round(float(diff.mean()), 4),
            "harrell_minus_clinical_std": round(float(diff.std(ddof=1)), 4),
            "folds_better_than_clinical": int((diff > 0).sum()),
            "fit_seconds_total": round(seconds[name], 1),
        }
    RESULTS.mkdir(exist_ok=True)
    km_models = ["clinical", "radiomics", "clinical+radiomics"]
    pvalues = plot_km(
        {m: (y["time"], y["event"], oof[m]["high"]) for m in km_models},
        RESULTS / "survival_km.png",
    )
    oof_c = {m: round(float(concordance_index(y, oof[m]["risk"])), 4) for m in km_models}

    print(
        f"\nLung1 ({len(y)} patients, {int(y['event'].sum())} events, {len(radiomic)} radiomic "
        f"features): {n_repeats} x {n_splits}-fold stratified CV, same folds for every model"
    )
    header = (
        f"{'model':<20} {'Harrell C':>12} {'Uno C (2y)':>12} {'C - clinical':>14} "
        f"{'folds >':>8} {'fit s':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, s in summary.items():
        print(
            f"{name:<20} {s['harrell_mean']:>6.3f}±{s['harrell_std']:<5.3f} "
            f"{s['uno_tau2y_mean']:>6.3f}±{s['uno_tau2y_std']:<5.3f} "
            f"{s['harrell_minus_clinical_mean']:>+7.3f}±{s['harrell_minus_clinical_std']:<6.3f} "
            f"{s['folds_better_than_clinical']:>4}/{len(splits):<3} {s['fit_seconds_total']:>7.1f}"
        )
    print(f"KM plot: {RESULTS / 'survival_km.png'}; log-rank p (high vs low risk): {pvalues}")
    top = sorted(selected.items(), key=lambda kv: -kv[1])[:10]
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")

    out = {
        "benchmark": "survival",
        "data": FILE,
        "quick": args.quick,
        "seed": args.seed,
        "seconds": round(total, 1),
        "hardware": f"shared {os.cpu_count()}-core CPU (other jobs running), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "n_patients": int(len(y)),
        "n_events": int(y["event"].sum()),
        "n_radiomic_features": len(radiomic),
        "cv": f"{n_repeats} x {n_splits}-fold, stratified by event, seed {args.seed}",
        "uno_tau_days": TAU,
        "summary": summary,
        "out_of_fold_first_repeat": {
            "harrell": oof_c,
            "km_logrank_p_high_vs_low": {k: float(f"{v:.4g}") for k, v in pvalues.items()},
            "km_plot": "results/survival_km.png",
        },
        "most_selected_features_radiomics": dict(top),
        "per_fold_harrell": {k: [round(v, 4) for v in s["harrell"]] for k, s in scores.items()},
    }
    # a smoke run never overwrites the full results
    path = RESULTS / "quick" / "survival.json" if args.quick else RESULTS / "survival.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
