"""Development check of survival-model variants on Lung1, on other fold seeds (issue 21).

Not the reported benchmark: ``bench_survival.py`` reports the nested 5 x 5-fold results on its
own folds (seed 0). This script looks at candidate changes of its best family, the random
survival forest on the ``make_survival_fusion`` groups (clinical variables + k selected
radiomic features), with **fixed settings** (no inner CV), on a 5 x 5-fold repetition with
another fold seed (``--seed``, default 1; the same 145 patients, so not independent data). A
variant is worth a full nested run only if it beats the current family clearly here.

Variants (Harrell's C, mean and standard deviation over the 25 test folds):

* ``fusion-rsf``: the current family (1000 trees, ``max_features="sqrt"``), k = 2, 3, 5, 10, 20
  selected radiomic features, minimum leaf sizes 10, 15, 25, ``max_features`` 0.5 and all;
* ``cluster-rsf``: the forest on the cluster medoids (``redundancy`` |r| >= 0.9 or 0.8, one
  medoid per cluster of correlated radiomic features) instead of the k best features;
* ``fusion-est``, ``cluster-est``: scikit-survival's extremely randomised survival trees in
  place of the forest;
* ``cgb``: scikit-survival's component-wise gradient boosting (a sparse linear Cox model) on
  all radiomic features, on 20 selected ones and on the cluster medoids;
* ``+ gender, histology``: the clinical Cox model (``clinical`` of ``bench_survival.py``), the
  forest (k = 5, 10) and the fusion Cox model (k = 10, penalizer 1) with the clinical group
  extended by gender and histology (indicators of adenocarcinoma, squamous cell and large
  cell carcinoma; "nos" and missing are the reference), against the same with the four
  clinical variables of the report.

Results: ``results/survival_variants.json`` (schema in ``_common.py``), one row per variant.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_survival_variants.py --n-jobs 2
    OMP_NUM_THREADS=1 python benchmarks/bench_survival_variants.py --quick
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd
from _common import Benchmark, bench_parser
from bench_survival import CLINICAL, cox_on, load, lung1_path
from sklearn.base import clone
from sklearn.model_selection import RepeatedStratifiedKFold

from skrtl import concordance_index, make_survival_fusion

#: the clinical columns the report does not use (added by :func:`load_extra`)
EXTRA_CLINICAL = ["female", "histology_adeno", "histology_squamous", "histology_large_cell"]
HISTOLOGY = {
    "histology_adeno": "adenocarcinoma",
    "histology_squamous": "squamous cell carcinoma",
    "histology_large_cell": "large cell",
}


def load_extra(path, X: pd.DataFrame) -> pd.DataFrame:
    """``X`` with gender and histology indicators (``EXTRA_CLINICAL``) added."""
    df = pd.read_csv(path)
    extra = {"female": (df["gender"] == "female").astype(float)}
    histology = df["Histology"].fillna("unknown")
    extra.update({col: (histology == name).astype(float) for col, name in HISTOLOGY.items()})
    return pd.concat([X, pd.DataFrame(extra, index=X.index)], axis=1)


def variants(radiomic: list[str], *, seed: int, quick: bool) -> dict:
    """``{name: unfitted model}`` of every variant (a few with ``quick``)."""
    from sksurv.ensemble import (
        ComponentwiseGradientBoostingSurvivalAnalysis,
        ExtraSurvivalTrees,
        RandomSurvivalForest,
    )

    groups = {"clinical": CLINICAL, "radiomics": radiomic}
    trees = 30 if quick else 1000

    def forest(leaf, cls=RandomSurvivalForest, max_features="sqrt"):
        return cls(
            n_estimators=trees,
            max_features=max_features,
            min_samples_leaf=leaf,
            random_state=seed,
            n_jobs=1,
        )

    def fusion(k, estimator, redundancy=None):
        extra = {} if redundancy is None else {"redundancy": {"radiomics": redundancy}}
        return make_survival_fusion(groups, k={"radiomics": k}, estimator=estimator, **extra)

    def cgb(n=300, lr=0.1):
        return ComponentwiseGradientBoostingSurvivalAnalysis(
            n_estimators=n, learning_rate=lr, subsample=0.8, random_state=seed
        )

    out = {}
    for k in (2, 3, 5, 10, 20):
        for leaf in (10, 15, 25):
            out[f"fusion-rsf k={k} leaf={leaf}"] = fusion(k, forest(leaf))
    for k in (5, 10):
        for mf in (0.5, None):
            out[f"fusion-rsf k={k} leaf=15 max_features={mf}"] = fusion(
                k, forest(15, max_features=mf)
            )
    for k in (5, 10, 20):
        out[f"cluster-rsf k={k} leaf=15 |r|>=0.9"] = fusion(k, forest(15), 0.9)
    out["cluster-rsf k=10 leaf=15 |r|>=0.8"] = fusion(10, forest(15), 0.8)
    out["fusion-est k=10 leaf=15"] = fusion(10, forest(15, ExtraSurvivalTrees))
    out["cluster-est k=10 leaf=15 |r|>=0.9"] = fusion(10, forest(15, ExtraSurvivalTrees), 0.9)
    for n in (100, 300, 1000):
        for lr in (0.05, 0.1):
            out[f"cgb all n={n} lr={lr}"] = fusion("all", cgb(n, lr))
    out["cgb k=20 n=300 lr=0.1"] = fusion(20, cgb())
    out["cgb cluster |r|>=0.9 n=300 lr=0.1"] = fusion("all", cgb(), 0.9)
    for tag, clinical in (("", CLINICAL), (" + gender, histology", CLINICAL + EXTRA_CLINICAL)):
        with_groups = {"clinical": clinical, "radiomics": radiomic}
        out[f"clinical Cox{tag}"] = cox_on(clinical, penalizer=0.01)
        for k in (5, 10):
            out[f"fusion-rsf k={k} leaf=15{tag}"] = make_survival_fusion(
                with_groups, k={"radiomics": k}, estimator=forest(15)
            )
        out[f"fusion-cox k=10 penalizer=1{tag}"] = make_survival_fusion(
            with_groups, k={"radiomics": 10}, penalizer=1.0
        )
    if quick:
        out = dict(list(out.items())[:2])
    return out


def _score_fold(models: dict, X, y, train, test) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = {}
        for name, model in models.items():
            fitted = clone(model).fit(X.iloc[train], y[train])
            scores[name] = concordance_index(y[test], fitted.predict(X.iloc[test]))
    return scores


def main(argv=None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seed", type=int, default=1, help="fold seed (the report uses 0)")
    parser.add_argument("--n-jobs", type=int, default=1, help="outer folds run in parallel")
    args = parser.parse_args(argv)
    path = lung1_path()
    if path is None:
        return 0
    from joblib import Parallel, delayed

    bench = Benchmark("survival_variants", issue=21, args=args)
    X, y, radiomic = load(path)
    X = load_extra(path, X)
    models = variants(radiomic, seed=args.seed, quick=bench.quick)
    n_splits, n_repeats = (3, 1) if bench.quick else (5, 5)
    cv = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=args.seed)
    t0 = time.perf_counter()
    folds = Parallel(n_jobs=args.n_jobs)(
        delayed(_score_fold)(models, X, y, train, test) for train, test in cv.split(X, y["event"])
    )
    seconds = time.perf_counter() - t0
    rows = []
    for name in models:
        c = np.array([f[name] for f in folds])
        rows.append(
            {
                "section": "variant",
                "model": name,
                "harrell_c": round(float(c.mean()), 4),
                "harrell_c_sd": round(float(c.std()), 4),
                "n_folds": len(c),
            }
        )
        print(f"{name:40s} {c.mean():.4f} +- {c.std():.3f}", flush=True)
    best = max(rows, key=lambda r: r["harrell_c"])
    summary = {
        "best_variant": best["model"],
        "best_harrell_c": best["harrell_c"],
        "current_family_k10_leaf15": next(
            (r["harrell_c"] for r in rows if r["model"] == "fusion-rsf k=10 leaf=15"), None
        ),
        "seconds": round(seconds, 1),
    }
    bench.write(
        config={"fold_seed": args.seed, "cv": f"{n_repeats} x {n_splits}-fold", "fixed": True},
        results=rows,
        summary=summary,
        notes=[
            "Development folds (another fold seed than bench_survival.py's report); fixed "
            "settings, no inner CV: a screen of candidate changes, not a result."
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
