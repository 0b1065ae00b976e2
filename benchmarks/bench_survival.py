"""Cross-validated survival prediction on Lung1 (NSCLC-Radiomics): clinical, radiomics, fusion,
with the model family chosen inside the nested cross-validation.

Data: ``lung1_pyradiomics_gtv1_survival.csv.gz`` in the shared data folder -- 1218 PyRadiomics
features (original, LoG, wavelet) of the primary tumour of 145 NSCLC-Radiomics (Lung1)
patients, overall survival in days and death indicator (129 events), and clinical variables
(see the data README).

Protocol: 5 x 5-fold cross-validation stratified on the event indicator; **the same folds for
every model**. Everything that is learnt -- imputation, scaling, redundancy reduction, feature
selection, the model, every hyper-parameter **and the model family** -- is fitted on the outer
training fold only. In each outer training fold an inner 3 x 5-fold cross-validation
(stratified on the event, Harrell's C; ``--inner-repeats``) scores every configuration of every
family below; each family's best configuration gives that family's nested row, and ``selected``
takes the best of *all* candidates (every configuration of every family and the ensembles of
the family winners). The outer test fold is scored once, after that choice. ``selected`` is the
honest number: the family rows are each honest on their own, but picking the best family row
afterwards, by its outer score, is not.

Fixed models (no tuning):

* ``clinical``: Cox on age, T stage, N stage and overall stage (I=1, II=2, IIIa=3, IIIb=4),
  median imputation;
* ``volume``: Cox on the tumour volume alone (``original_shape_VoxelVolume``);
* ``aerts4``: Cox on the closest PyRadiomics names of Aerts et al.'s (2014) four-feature
  signature (see ``AERTS``);
* ``radiomics``: VarianceThreshold -> StandardScaler -> SelectKBestSurvival(k=10) ->
  CoxPHSurvival(penalizer=0.1);
* ``null``: the training Kaplan-Meier curve for everyone (reference for the Brier score).

Families tuned by the inner CV (grid in ``FAMILIES``):

* ``radiomics-nested``: the ``radiomics`` pipeline, k and penalty tuned;
* ``fusion-cox``: ``make_survival_fusion`` of the clinical variables (all kept) and the
  radiomics (k selected) into one penalized Cox model;
* ``fusion-rsf``: the same feature groups into scikit-survival's RandomSurvivalForest (1000
  trees, ``max_features="sqrt"``);
* ``fusion-gbs``: the same groups (k = 20) into scikit-survival's gradient-boosted Cox trees;
* ``coxnet``: elastic-net Cox (scikit-survival's CoxnetSurvivalAnalysis) on the clinical
  variables (unpenalized) and all radiomic features, the penalty a fraction of the training
  fold's smallest all-zero penalty;
* ``cluster-cox``: ``fusion-cox`` with redundancy reduction first (one medoid per cluster of
  radiomic features with Spearman ``|r| >= 0.9``, ``CorrelationClusterSelector``);
* ``cluster-coxnet``: the elastic-net Cox on the clinical variables and the cluster medoids;
* ``ensemble``: ``SurvivalEnsemble`` (training-percentile average) of the fusion-cox and
  fusion-rsf winners; ``ensemble-coxnet-rsf``: of the coxnet and fusion-rsf winners;
  ``ensemble-all``: of the winners of all seven families.

Reported per model, mean and standard deviation over the 25 test folds: Harrell's C, Uno's C
(training censoring, tau = 2 years), the mean cumulative/dynamic AUC at 1, 2 and 3 years, the
Brier score at 2 years and the integrated Brier score over 3 months to 3 years (IPCW with the
training censoring, computed by scikit-survival), and the paired difference in Harrell's C
against ``clinical``. Kaplan-Meier curves of out-of-fold risk tertiles (cut points from the
training-fold risks) go to ``survival_km.png``, a 2-year calibration plot to
``survival_calibration.png``, next to the result file.

Results: ``results/survival.json`` (schema in ``_common.py``): rows of ``section`` "model"
(metrics per model, per-fold Harrell C), "nested_cv_choice" (the configurations chosen per
family and by ``selected``), "inner_cv" (mean inner-CV C of the winners), "failed_fits",
"out_of_fold_first_repeat" and "total".

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_survival.py               # 5 x 5-fold
    OMP_NUM_THREADS=1 python benchmarks/bench_survival.py --n-jobs 2    # outer folds in parallel
    OMP_NUM_THREADS=1 python benchmarks/bench_survival.py --quick       # 2 x 3-fold smoke run
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from _common import DATA_DIR, Benchmark, Stopwatch, bench_parser, flat_summary
from sklearn.base import BaseEstimator, clone
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import VarianceThreshold
from sklearn.frozen import FrozenEstimator
from sklearn.impute import SimpleImputer
from sklearn.model_selection import ParameterGrid, RepeatedStratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl import (
    CoxPHSurvival,
    KaplanMeierDisplay,
    SelectKBestSurvival,
    SurvivalCalibrationDisplay,
    SurvivalEnsemble,
    brier_score,
    concordance_index,
    integrated_brier_score,
    kaplan_meier,
    make_survival_fusion,
    make_survival_target,
    survival_function_at,
    time_dependent_auc,
)

# ---------------------------------------------------------------------------- data
FILE = "lung1_pyradiomics_gtv1_survival.csv.gz"
STAGE = {"I": 1.0, "II": 2.0, "IIIa": 3.0, "IIIb": 4.0}
CLINICAL = ["age", "t_stage", "n_stage", "stage"]
VOLUME = "original_shape_VoxelVolume"
#: Aerts et al. (2014) signature -> closest PyRadiomics feature. Their "Statistics Energy" is
#: first-order energy; "Shape Compactness" has no PyRadiomics feature (Compactness1/2 were
#: removed) and Sphericity is its monotone equivalent ((36 pi V^2 / A^3)^(1/3)); the two
#: grey-level non-uniformities are of the run-length matrix (GLRLM), the second on the HLH
#: wavelet band.
AERTS = {
    "statistics energy": "original_firstorder_Energy",
    "shape compactness": "original_shape_Sphericity",
    "grey-level non-uniformity (RLGL)": "original_glrlm_GrayLevelNonUniformity",
    "wavelet HLH grey-level non-uniformity (RLGL)": "wavelet-HLH_glrlm_GrayLevelNonUniformity",
}
TAU = 730.0  # Uno's C truncated at 2 years (days)
AUC_TIMES = np.array([365.0, 730.0, 1095.0])
BRIER_TIME = 730.0
IBS_TIMES = np.linspace(91.0, 1095.0, 34)  # 3 months to 3 years, monthly


def lung1_path() -> Path | None:
    """The Lung1 file, or None (saying so) when the shared data are absent."""
    path = DATA_DIR / FILE
    if not path.is_file():
        print(f"{FILE} not found under {DATA_DIR} (set SKRTL_DATA_DIR); nothing to do")
        return None
    return path


def load(path: Path):
    df = pd.read_csv(path)
    radiomic = [c for c in df.columns if c.startswith(("original_", "log-", "wavelet-"))]
    clinical = pd.DataFrame(
        {
            "age": df["age"].astype(float),
            "t_stage": df["clinical.T.Stage"].astype(float),
            "n_stage": df["Clinical.N.Stage"].astype(float),
            "stage": df["Overall.Stage"].map(STAGE),
        }
    )
    X = pd.concat([clinical, df[radiomic].astype(float)], axis=1)
    y = make_survival_target(df["deadstatus.event"], df["Survival.time"])
    return X, y, radiomic


class RepeatedEventStratifiedKFold(RepeatedStratifiedKFold):
    """RepeatedStratifiedKFold on the event indicator of a structured survival target."""

    def split(self, X, y, groups=None):
        return super().split(X, np.asarray(y["event"]), groups)


# ---------------------------------------------------------------------------- models
def cox_on(columns, *, penalizer):
    """Cox model on ``columns``: median imputation, standard scaling, ``penalizer``."""
    return make_pipeline(
        ColumnTransformer([("x", SimpleImputer(strategy="median"), columns)]),
        StandardScaler(),
        CoxPHSurvival(penalizer=penalizer),
    )


def _radiomics_pipeline(radiomic):
    return make_pipeline(
        ColumnTransformer([("rad", "passthrough", radiomic)]),
        VarianceThreshold(),
        StandardScaler(),
        SelectKBestSurvival(k=10),
        CoxPHSurvival(penalizer=0.1),
    )


def fixed_models(radiomic: list[str]) -> dict:
    """The models without hyper-parameters to tune."""
    return {
        "clinical": cox_on(CLINICAL, penalizer=0.01),
        "volume": cox_on([VOLUME], penalizer=0.0),
        "aerts4": cox_on(list(AERTS.values()), penalizer=0.0),
        "radiomics": _radiomics_pipeline(radiomic),
    }


class ClinicalFreeCoxnet(BaseEstimator):
    """Elastic-net Cox whose first ``n_free`` columns (the clinical variables) are unpenalized.

    scikit-survival's CoxnetSurvivalAnalysis fitted along its penalty path from the smallest
    penalty that zeroes every penalized coefficient down to ``alpha_min_ratio`` times it; the
    model at the end of the path predicts. ``penalty_factor`` must match the columns, which
    the redundancy reduction makes data-dependent, so it is built in ``fit``.
    """

    def __init__(self, *, n_free=4, l1_ratio=0.5, alpha_min_ratio=0.1, n_alphas=20):
        self.n_free = n_free
        self.l1_ratio = l1_ratio
        self.alpha_min_ratio = alpha_min_ratio
        self.n_alphas = n_alphas

    def fit(self, X, y):
        from sksurv.linear_model import CoxnetSurvivalAnalysis

        X = np.asarray(X, dtype=float)
        factor = np.ones(X.shape[1])
        factor[: self.n_free] = 0.0
        self.model_ = CoxnetSurvivalAnalysis(
            l1_ratio=self.l1_ratio,
            n_alphas=self.n_alphas,
            alpha_min_ratio=self.alpha_min_ratio,
            penalty_factor=factor,
            fit_baseline_model=True,
            max_iter=100_000,
        ).fit(X, y)
        self.survival_train_ = y
        self.n_selected_ = int((self.model_.coef_[:, -1] != 0).sum())
        return self

    def predict(self, X):
        return self.model_.predict(np.asarray(X, dtype=float))

    def predict_survival_function(self, X):
        return self.model_.predict_survival_function(np.asarray(X, dtype=float))


def families(radiomic: list[str], *, quick: bool, seed: int, memory) -> dict:
    """``{family: (base estimator, parameter grid)}``, in the order of the result table."""
    from sksurv.ensemble import GradientBoostingSurvivalAnalysis, RandomSurvivalForest

    groups = {"clinical": CLINICAL, "radiomics": radiomic}
    rsf = RandomSurvivalForest(
        n_estimators=50 if quick else 1000, max_features="sqrt", random_state=seed, n_jobs=1
    )
    gbs = GradientBoostingSurvivalAnalysis(
        learning_rate=0.05, subsample=0.8, max_features="sqrt", random_state=seed
    )
    ratios = [0.5, 0.3, 0.2, 0.1, 0.05]

    def clustered(estimator=None, **kw):  # the cluster fit is cached across configurations
        model = make_survival_fusion(
            groups, k={"radiomics": 10}, redundancy={"radiomics": 0.9}, estimator=estimator, **kw
        )
        return model.set_params(features__radiomics__memory=memory)

    return {
        "radiomics-nested": (
            _radiomics_pipeline(radiomic),
            {"selectkbestsurvival__k": [5, 10, 20, 50], "coxphsurvival__penalizer": [0.1, 1.0]},
        ),
        "fusion-cox": (
            make_survival_fusion(groups, k={"radiomics": 10}, penalizer=0.1),
            {
                "features__radiomics__select__k": [3, 5, 10, 20],
                "model__penalizer": [0.1, 1.0, 10.0],
            },
        ),
        "fusion-rsf": (
            make_survival_fusion(groups, k={"radiomics": 10}, estimator=rsf),
            {
                "features__radiomics__select__k": [5, 10, 20],
                "model__min_samples_leaf": [10, 15, 20],
            },
        ),
        "fusion-gbs": (
            make_survival_fusion(groups, k={"radiomics": 20}, estimator=gbs),
            {"model__n_estimators": [100, 300], "model__max_depth": [1, 2]},
        ),
        "coxnet": (
            make_survival_fusion(
                groups, k={"radiomics": "all"}, estimator=ClinicalFreeCoxnet(n_free=len(CLINICAL))
            ),
            {"model__l1_ratio": [0.5, 0.9], "model__alpha_min_ratio": ratios},
        ),
        "cluster-cox": (
            clustered(penalizer=0.1),
            {"features__radiomics__select__k": [5, 10, 20], "model__penalizer": [0.1, 1.0]},
        ),
        "cluster-coxnet": (
            clustered(ClinicalFreeCoxnet(n_free=len(CLINICAL))).set_params(
                features__radiomics__select__k="all"
            ),
            {"model__alpha_min_ratio": ratios},
        ),
    }


#: Ensembles of family winners: {name: member families}.
ENSEMBLES = {
    "ensemble": ["fusion-cox", "fusion-rsf"],
    "ensemble-coxnet-rsf": ["coxnet", "fusion-rsf"],
    "ensemble-all": [
        "radiomics-nested",
        "fusion-cox",
        "fusion-rsf",
        "fusion-gbs",
        "coxnet",
        "cluster-cox",
        "cluster-coxnet",
    ],
}
SELECTED = "selected"


def _ensemble(members: dict) -> SurvivalEnsemble:
    """A rank-average ensemble of already fitted members (fitting it learns only the scale)."""
    return SurvivalEnsemble(
        [(name, FrozenEstimator(est)) for name, est in members.items()], combine="rank"
    )


def _config_name(params: dict) -> str:
    return json.dumps({k.split("__")[-1]: v for k, v in params.items()}, sort_keys=True)


def nested_selection(fams: dict, X, y, inner, *, quick: bool):
    """Inner-CV choice of every family's configuration, of the ensembles and of the overall
    winner, all on the training data ``(X, y)``.

    Returns
    -------
    choice : dict
        ``{family or ensemble: config name}`` and ``{"selected": candidate name}``.
    inner_scores : dict
        Mean inner-CV Harrell C of each family winner, each ensemble and ``selected``.
    configs : dict
        ``{family: {config name: unfitted estimator}}``.
    failures : list of str
        Configurations whose fit or scoring raised in some inner fold (scored NaN there).
    """
    splits = list(inner.split(X, y))
    configs, fitted, scores, failures = {}, {}, {}, []
    for fam, (base, grid) in fams.items():
        if quick:  # smoke run: first grid value only
            grid = {k: v[:1] for k, v in grid.items()}
        configs[fam] = {_config_name(p): clone(base).set_params(**p) for p in ParameterGrid(grid)}
        for name, est in configs[fam].items():
            fold_scores, models = [], []
            for tr, te in splits:
                try:
                    model = clone(est).fit(X.iloc[tr], y[tr])
                    fold_scores.append(concordance_index(y[te], model.predict(X.iloc[te])))
                except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
                    failures.append(f"{fam} {name}: {type(exc).__name__}: {exc}"[:300])
                    model = None
                    fold_scores.append(np.nan)
                models.append(model)
            fitted[fam, name] = models
            scores[fam, name] = float(np.mean(fold_scores))  # NaN if any fold failed
    choice, inner_scores = {}, {}
    for fam in fams:
        names = list(configs[fam])
        means = np.array([scores[fam, n] for n in names])
        best = names[int(np.nanargmax(means))]  # first best, like GridSearchCV
        choice[fam], inner_scores[fam] = best, scores[fam, best]
    for ens, members in ENSEMBLES.items():
        fold_scores = []
        for f, (tr, te) in enumerate(splits):
            fold_models = {m: fitted[m, choice[m]][f] for m in members}
            model = _ensemble(fold_models).fit(X.iloc[tr], y[tr])
            fold_scores.append(concordance_index(y[te], model.predict(X.iloc[te])))
        inner_scores[ens] = float(np.mean(fold_scores))
        choice[ens] = "+".join(members)
    candidates = {(fam, n): scores[fam, n] for fam in fams for n in configs[fam]}
    candidates.update({(ens, choice[ens]): inner_scores[ens] for ens in ENSEMBLES})
    keys = list(candidates)
    winner = keys[int(np.nanargmax([candidates[k] for k in keys]))]
    choice[SELECTED] = f"{winner[0]} {winner[1]}"
    inner_scores[SELECTED] = candidates[winner]
    choice["_selected_family"] = winner[0]
    return choice, inner_scores, configs, failures


def run_outer_fold(fold, train, test, X, y, radiomic, *, quick, seed, memory_dir, inner_repeats):
    """Fit and score every model on one outer fold; returns its results."""
    from joblib import Memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="No features were selected")
        Xtr, Xte, ytr, yte = X.iloc[train], X.iloc[test], y[train], y[test]
        memory = Memory(memory_dir, verbose=0)
        fams = families(radiomic, quick=quick, seed=seed, memory=memory)
        inner = RepeatedEventStratifiedKFold(
            n_splits=3 if quick else 5, n_repeats=inner_repeats, random_state=seed
        )
        seconds = {}
        fitted = {}
        for name, model in fixed_models(radiomic).items():
            t0 = time.perf_counter()
            fitted[name] = clone(model).fit(Xtr, ytr)
            seconds[name] = time.perf_counter() - t0
        fitted["null"] = NullModel().fit(Xtr, ytr)
        t0 = time.perf_counter()
        choice, inner_scores, configs, failures = nested_selection(
            fams, Xtr, ytr, inner, quick=quick
        )
        seconds["inner_cv"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for fam in fams:
            fitted[fam] = clone(configs[fam][choice[fam]]).fit(Xtr, ytr)
        for ens, members in ENSEMBLES.items():
            fitted[ens] = _ensemble({m: fitted[m] for m in members}).fit(Xtr, ytr)
        fitted[SELECTED] = fitted[choice["_selected_family"]]
        seconds["refit"] = time.perf_counter() - t0
        results, train_risks = {}, {}
        for name, est in fitted.items():
            results[name], risk = evaluate(est, Xte, yte, ytr)
            train_risks[name] = (np.asarray(est.predict(Xtr), dtype=float), risk)
        surv_2y = {
            name: survival_function_at(fitted[name], Xte, [BRIER_TIME])[:, 0]
            for name in CAL_MODELS
        }
    return {
        "fold": fold,
        "test": test,
        "results": results,
        "choice": choice,
        "inner_scores": inner_scores,
        "failures": failures,
        "seconds": seconds,
        "risks": {m: train_risks[m] for m in KM_MODELS},
        "surv_2y": surv_2y,
    }


class NullModel:
    """Training Kaplan-Meier curve for everyone: C = 0.5, the Brier reference."""

    def fit(self, X, y):
        self.times_, self.surv_ = kaplan_meier(y["time"], y["event"])
        self.survival_train_ = y
        return self

    def predict(self, X):
        return np.zeros(len(X))

    def predict_survival_function(self, X, times):
        idx = np.searchsorted(self.times_, np.asarray(times), side="right") - 1
        s = np.where(idx >= 0, self.surv_[np.clip(idx, 0, None)], 1.0)
        return np.tile(s, (len(X), 1))


# ---------------------------------------------------------------------------- evaluation
def _percentile(train_risk: np.ndarray, risk: np.ndarray) -> np.ndarray:
    ref = np.sort(train_risk)
    return (np.searchsorted(ref, risk, "left") + np.searchsorted(ref, risk, "right")) / (
        2.0 * ref.size
    )


def evaluate(est, X_test, y_test, y_train) -> tuple[dict, np.ndarray]:
    risk = np.asarray(est.predict(X_test), dtype=float)
    out = {
        "harrell": concordance_index(y_test, risk),
        "uno": concordance_index(y_test, risk, method="uno", y_train=y_train, tau=TAU),
    }
    try:
        out["auc_1_3y"] = time_dependent_auc(y_train, y_test, risk, AUC_TIMES)[1]
    except ValueError:
        out["auc_1_3y"] = float("nan")
    for key, times, metric in (
        ("brier_2y", [BRIER_TIME], lambda s: brier_score(y_train, y_test, s, [BRIER_TIME])[0]),
        ("ibs_3m_3y", IBS_TIMES, lambda s: integrated_brier_score(y_train, y_test, s, IBS_TIMES)),
    ):
        try:  # a test fold whose follow-up does not cover the times: NaN, counted
            out[key] = float(metric(survival_function_at(est, X_test, times)))
        except ValueError:
            out[key] = float("nan")
    return out, risk


def plot_km(oof: dict, y, path: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(oof), figsize=(6.0 * len(oof), 5.4), sharey=True)
    pvalues = {}
    for ax, (name, pct) in zip(np.atleast_1d(axes), oof.items()):
        disp = KaplanMeierDisplay.from_predictions(
            y,
            pct,
            cut_points=[1 / 3, 2 / 3],
            group_labels=["low", "middle", "high"],
            name=name,
            ax=ax,
            time_scale=365.25,
        )
        pvalues[name] = disp.logrank_p
    fig.suptitle("Lung1: out-of-fold predicted risk tertiles (cut points from the training folds)")
    fig.subplots_adjust(bottom=0.32, wspace=0.25, left=0.08)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return pvalues


def plot_calibration(oof_surv: dict, y, path: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    errors = {}
    for name, surv in oof_surv.items():
        disp = SurvivalCalibrationDisplay.from_predictions(
            y, surv, horizon=BRIER_TIME, n_groups=5, name=name, ax=ax, time_label="2 years"
        )
        errors[name] = disp.calibration_error
    ax.set_title("Lung1: 2-year calibration, out-of-fold (risk quintiles)")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return errors


MODEL_METRICS = ["harrell", "uno", "auc_1_3y", "brier_2y", "ibs_3m_3y"]
GOAL_HARRELL = 0.66  # issue 21: the best skrtl pipeline, by nested CV
FIXED = ["null", "clinical", "volume", "aerts4", "radiomics"]
KM_MODELS = ["clinical", "radiomics", SELECTED]
CAL_MODELS = ["fusion-cox", SELECTED]


def summarise(rows) -> dict:
    """The result's ``summary``: mean metrics per model, the goal, risk-group p, seconds.

    The goal is judged on the row flagged ``skrtl_best``: ``selected`` (family chosen by the
    inner CV); results written before it flagged the tuned fusion rows.
    """
    metrics = [f"{m}_mean" for m in MODEL_METRICS]
    metrics += ["harrell_minus_clinical_mean", "folds_better_than_clinical"]
    summary = flat_summary(rows, section="model", keys=["model"], metrics=metrics)
    best = max(
        (r["harrell_mean"] for r in rows if r.get("section") == "model" and r.get("skrtl_best")),
        default=None,
    )
    if best is not None:
        summary["best_skrtl_pipeline.harrell_mean"] = best
        summary[f"best_skrtl_pipeline.harrell_ge_{GOAL_HARRELL}"] = bool(best >= GOAL_HARRELL)
    oof = ["km_logrank_p_tertiles", "calibration_2y_mean_abs_error"]
    summary.update(
        flat_summary(rows, section="out_of_fold_first_repeat", keys=["model"], metrics=oof)
    )
    summary.update(flat_summary(rows, section="inner_cv", keys=["model"], metrics=["inner_c"]))
    summary.update(flat_summary(rows, section="total", keys=["section"], metrics=["seconds"]))
    return summary


def _model_rows(order, scores, seconds) -> list[dict]:
    base = np.array([s["harrell"] for s in scores["clinical"]])
    rows = []
    for name in order:
        table = pd.DataFrame(scores[name])
        diff = table["harrell"].to_numpy() - base
        row = {"section": "model", "model": name}
        for metric in MODEL_METRICS:
            vals = table[metric].to_numpy(dtype=float)
            row[f"{metric}_mean"] = round(float(np.nanmean(vals)), 4)
            row[f"{metric}_std"] = round(float(np.nanstd(vals, ddof=1)), 4)
            row[f"{metric}_failed_folds"] = int(np.isnan(vals).sum())
        row["harrell_minus_clinical_mean"] = round(float(diff.mean()), 4)
        row["harrell_minus_clinical_std"] = round(float(diff.std(ddof=1)), 4)
        row["folds_better_than_clinical"] = int((diff > 0).sum())
        row["fit_seconds_total"] = round(seconds.get(name, 0.0), 1)
        row["skrtl_best"] = name == SELECTED
        row["per_fold_harrell"] = [round(float(v), 4) for v in table["harrell"]]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-jobs", type=int, default=1, help="outer folds run in parallel")
    parser.add_argument(
        "--inner-repeats",
        type=int,
        default=3,
        help="repetitions of the inner 5-fold CV that scores every configuration (default 3)",
    )
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)
    path = lung1_path()
    if path is None:
        return 0
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    bench = Benchmark("survival", issue=21, args=args)
    total = Stopwatch()
    X, y, radiomic = load(path)
    n_splits, n_repeats = (3, 2) if bench.quick else (5, 5)
    cv = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=args.seed)
    splits = list(cv.split(X, y["event"]))
    fam_names = list(families(radiomic, quick=True, seed=0, memory=None))
    order = FIXED + fam_names + list(ENSEMBLES) + [SELECTED]
    with tempfile.TemporaryDirectory(prefix="skrtl_bench_survival_") as memory_dir:
        jobs = (
            delayed(run_outer_fold)(
                fold, train, test, X, y, radiomic,
                quick=bench.quick, seed=args.seed, memory_dir=memory_dir,
                inner_repeats=1 if bench.quick else args.inner_repeats,
            )
            for fold, (train, test) in enumerate(splits)
        )  # fmt: skip
        outs = []
        bar = tqdm(total=len(splits), disable=args.verbose == 0, leave=False)
        for out in Parallel(n_jobs=args.n_jobs, return_as="generator")(jobs):
            outs.append(out)
            bar.update(1)
        bar.close()
    outs.sort(key=lambda o: o["fold"])
    scores = {n: [o["results"][n] for o in outs] for n in order}
    seconds = {}
    for o in outs:
        for key, value in o["seconds"].items():
            seconds[key] = seconds.get(key, 0.0) + value
    oof_pct = {m: np.zeros(len(y)) for m in KM_MODELS}
    oof_surv = {m: np.zeros(len(y)) for m in CAL_MODELS}
    for o in outs[:n_splits]:  # first repetition: out-of-fold risk groups and calibration
        for m in KM_MODELS:
            train_risk, risk = o["risks"][m]
            oof_pct[m][o["test"]] = _percentile(train_risk, risk)
        for m in CAL_MODELS:
            oof_surv[m][o["test"]] = o["surv_2y"][m]

    rows = _model_rows(order, scores, seconds)
    choice_counts = {
        name: pd.Series([o["choice"][name] for o in outs]).value_counts().to_dict()
        for name in fam_names + [SELECTED]
    }
    family_counts = pd.Series([o["choice"]["_selected_family"] for o in outs]).value_counts()
    rows += [
        {"section": "nested_cv_choice", "model": name, "params": params, "n_folds": int(n)}
        for name, counts in choice_counts.items()
        for params, n in counts.items()
    ]
    rows += [
        {"section": "selected_family", "family": fam, "n_folds": int(n)}
        for fam, n in family_counts.items()
    ]
    rows += [
        {
            "section": "inner_cv",
            "model": name,
            "inner_c": round(float(np.mean([o["inner_scores"][name] for o in outs])), 4),
        }
        for name in fam_names + list(ENSEMBLES) + [SELECTED]
    ]
    failures = [f"fold {o['fold']}: {msg}" for o in outs for msg in o["failures"]]
    rows += [{"section": "failed_fits", "message": msg} for msg in failures]
    km_path = bench.out.with_name("survival_km.png")
    cal_path = bench.out.with_name("survival_calibration.png")
    km_path.parent.mkdir(parents=True, exist_ok=True)
    pvalues = plot_km(oof_pct, y, km_path)
    cal_err = plot_calibration(oof_surv, y, cal_path)
    rows += [
        {
            "section": "out_of_fold_first_repeat",
            "model": m,
            "km_logrank_p_tertiles": float(f"{pvalues[m]:.3g}") if m in pvalues else None,
            "calibration_2y_mean_abs_error": round(cal_err[m], 4) if m in cal_err else None,
        }
        for m in dict.fromkeys(KM_MODELS + CAL_MODELS)
    ]
    rows.append(
        {
            "section": "total",
            "seconds": round(total.stop(), 1),
            "inner_cv_seconds": round(seconds.get("inner_cv", 0.0), 1),
            "n_jobs": args.n_jobs,
        }
    )

    print(
        f"\nLung1 ({len(y)} patients, {int(y['event'].sum())} events, {len(radiomic)} radiomic "
        f"features): {n_repeats} x {n_splits}-fold stratified CV, same folds for every model, "
        "hyper-parameters and family by inner CV"
    )
    header = (
        f"{'model':<20} {'Harrell C':>12} {'Uno C 2y':>12} {'tdAUC 1-3y':>12} "
        f"{'Brier 2y':>12} {'IBS 3m-3y':>12} {'C-clin':>7} {'>clin':>6}"
    )
    print(header)
    print("-" * len(header))
    for s in (r for r in rows if r["section"] == "model"):
        cells = [f"{s[f'{m}_mean']:>6.3f}±{s[f'{m}_std']:<5.3f}" for m in MODEL_METRICS]
        print(
            f"{s['model']:<20} {' '.join(cells)} {s['harrell_minus_clinical_mean']:>+7.3f} "
            f"{s['folds_better_than_clinical']:>3}/{len(splits):<2}"
        )
    print(f"KM plot {km_path}: log-rank p (tertiles) {pvalues}")
    print(f"calibration plot {cal_path}: mean |predicted - observed| at 2 y {cal_err}")
    print(f"selected family per outer fold: {family_counts.to_dict()}")
    for r in (r for r in rows if r["section"] == "inner_cv"):
        print(f"inner-CV C of the winner, {r['model']}: {r['inner_c']:.3f}")
    if failures:
        print(f"{len(failures)} failed inner fits (scored NaN), e.g. {failures[0]}")
    print(f"total {rows[-1]['seconds']:.0f} s")

    config = {
        "data": FILE,
        "seed": args.seed,
        "n_patients": int(len(y)),
        "n_events": int(y["event"].sum()),
        "n_radiomic_features": len(radiomic),
        "cv": f"{n_repeats} x {n_splits}-fold, stratified by event, seed {args.seed}",
        "nested": f"inner {1 if bench.quick else args.inner_repeats} x "
        f"{3 if bench.quick else 5}-fold CV (Harrell C) inside each outer "
        "training fold scores every configuration of every family; 'selected' takes the best "
        "of all of them and of the ensembles of family winners",
        "grids": {
            fam: {k.split("__")[-1]: v for k, v in grid.items()}
            for fam, (_, grid) in families(radiomic, quick=False, seed=0, memory=None).items()
        },
        "ensembles": ENSEMBLES,
        "clinical_columns": {
            "age": "age",
            "t_stage": "clinical.T.Stage",
            "n_stage": "Clinical.N.Stage",
            "stage": "Overall.Stage (I=1, II=2, IIIa=3, IIIb=4)",
        },
        "aerts_features": AERTS,
        "uno_tau_days": TAU,
        "auc_times_days": AUC_TIMES.tolist(),
        "brier_time_days": BRIER_TIME,
        "ibs_times_days": [float(IBS_TIMES[0]), float(IBS_TIMES[-1]), len(IBS_TIMES)],
        "goal_harrell": GOAL_HARRELL,
        "n_jobs": args.n_jobs,
    }
    notes = [
        "IPCW metrics (Uno C, time-dependent AUC, Brier) use the Kaplan-Meier censoring "
        "distribution of the outer training fold (scikit-survival).",
        "'selected' is the honest headline: its family and hyper-parameters are chosen by the "
        "inner CV of each outer training fold. Choosing the best family row afterwards by its "
        "outer score would be optimistic.",
        "Ensemble members are the family winners of the same inner CV (their inner-CV score "
        "is computed from the members' inner-fold fits).",
        f"Kaplan-Meier plot: {km_path.name}; calibration plot: {cal_path.name}.",
    ]
    bench.write(config=config, results=rows, summary=summarise(rows), notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
