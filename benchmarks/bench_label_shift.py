"""Label-shift adaptation on real data with induced prior shift.

Data: BreastMNIST and PneumoniaMNIST (binary; all MedMNIST splits pooled, then a stratified 60 %
source / 40 % target-pool split, so that only the prior differs) and scikit-learn's bundled
``digits`` (10 classes, 50/50 split, multi-class Dirichlet shifts). Features are simple on
purpose (flattened pixels -> PCA fitted on source images -> standardise -> logistic
regression), so the benchmark does not depend on the CNN feature transformer.

Target: the target pool resampled (with replacement) to several prevalences of the positive
class (binary) or to Dirichlet-drawn priors (digits). For each target set every method
is adapted on the unlabelled target images and scored on them:

* ``unadapted``     calibrated (BCTS) source posteriors, no prior adjustment;
* ``EM``            EM on uncalibrated probabilities (Saerens et al. 2002);
* ``EM+TS``         EM after temperature scaling;
* ``EM+BCTS``       EM after bias-corrected temperature scaling (Alexandari et al. 2020);
* ``BBSE-hard`` / ``BBSE-soft`` (Lipton et al. 2018) with BCTS-calibrated probabilities;
* ``oracle``        BCTS posteriors adjusted to the true target prior (upper reference).

Reported: mean absolute error of the estimated priors (|pi_hat - pi| averaged over classes),
log-loss and accuracy, and their change against ``unadapted``, averaged over targets. The EM of
the ``abstention`` package (Alexandari et al.'s code) is run on the same calibrated inputs as a
cross-check when it is installed (both run to a tolerance of 1e-10 on the same calibrated
inputs, so the reported difference measures the implementations, not their stopping rules).

Usage::

    python benchmarks/bench_label_shift.py            # full run
    python benchmarks/bench_label_shift.py --quick    # smoke run

Results: ``results/label_shift.json`` (schema in ``_common.py``): rows of ``section`` "method"
(one per data set and method, averaged over the target sets), "dataset" and "total".
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
from _common import Benchmark, Stopwatch, bench_parser, flat_summary, load_medmnist_splits, pooled
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl import LabelShiftAdapter, LabelShiftWarning, adjust_posteriors, em_prior_estimate

METHODS = ["unadapted", "EM", "EM+TS", "EM+BCTS", "BBSE-hard", "BBSE-soft", "oracle"]
# method -> (calibration, prior_estimation)
CONFIGS = {
    "EM": (None, "em"),
    "EM+TS": ("ts", "em"),
    "EM+BCTS": ("bcts", "em"),
    "BBSE-hard": ("bcts", "bbse-hard"),
    "BBSE-soft": ("bcts", "bbse-soft"),
}


def load_pooled_medmnist(name: str, seed: int):
    """All splits pooled, then a stratified 60/40 source / target-pool split.

    MedMNIST's official test split differs from train by more than the class prior (a model
    fitted on PneumoniaMNIST train over-estimates the share of pneumonia in the test split), so
    a pure label-shift benchmark re-splits the pooled images at random.
    """
    splits = load_medmnist_splits(name, missing="skip")
    if splits is None:
        return None
    X, y = pooled(splits, "train", "val", "test")
    X = X.reshape(len(X), -1).astype(np.float32) / 255.0
    return train_test_split(X, y, test_size=0.4, stratify=y, random_state=seed)


def load_digits_split(seed: int):
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.5, stratify=y, random_state=seed)


def pca_features(X_src, X_test, n_components: int, seed: int):
    """Unsupervised image features: PCA fitted on the source images only."""
    pca = make_pipeline(
        StandardScaler(),
        PCA(n_components=n_components, svd_solver="randomized", random_state=seed),
    ).fit(X_src)
    return pca.transform(X_src), pca.transform(X_test)


def model():
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1))


def target_priors_list(k: int, quick: bool, rng: np.random.Generator) -> list[np.ndarray]:
    if k == 2:
        prevalences = (
            [0.1, 0.5, 0.9] if quick else [0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95]
        )
        return [np.array([1 - p, p]) for p in prevalences]
    alphas = [1.0] if quick else [0.5, 1.0, 5.0]
    n_per = 2 if quick else 4
    return [rng.dirichlet(np.full(k, a)) for a in alphas for _ in range(n_per)]


def resample(y: np.ndarray, priors: np.ndarray, n: int, rng) -> np.ndarray:
    counts = rng.multinomial(n, priors)
    idx = [rng.choice(np.flatnonzero(y == c), size=m, replace=True) for c, m in enumerate(counts)]
    return rng.permutation(np.concatenate(idx))


def abstention_em(cal_target, cal_source):
    """abstention's EM on the same calibrated inputs; None when the package is missing."""
    try:
        from abstention.label_shift import EMImbalanceAdapter
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        func = EMImbalanceAdapter(tolerance=1e-10, max_iterations=100_000)(
            tofit_initial_posterior_probs=cal_target, valid_posterior_probs=cal_source
        )
    return func.multipliers * cal_source.mean(axis=0)


def run_dataset(name, data, *, n_components, n_target, repeats, quick, seed, progress):
    X_src, X_test, y_src, y_test = data
    X_src, X_test = pca_features(X_src, X_test, n_components, seed)
    k = int(y_src.max()) + 1
    rng = np.random.default_rng(seed)
    with Stopwatch() as sw:
        adapters = {
            method: LabelShiftAdapter(
                model(), calibration=cal, prior_estimation=est, cv=5, random_state=seed
            ).fit(X_src, y_src)
            for method, (cal, est) in CONFIGS.items()
        }
        bcts = adapters["EM+BCTS"]
    fit_s = sw.seconds
    base_test = bcts.predict_proba(X_test)  # calibrated source posteriors (not adapted)
    src_acc = accuracy_score(y_test, base_test.argmax(axis=1))

    rows = []
    abst_diff = []
    for priors in target_priors_list(k, quick, rng):
        for _ in range(repeats):
            idx = resample(y_test, priors, n_target, rng)
            yt = y_test[idx]
            true = np.bincount(yt, minlength=k) / len(yt)
            base = base_test[idx]
            results = {"unadapted": (bcts.source_priors_, base)}
            for method, ada in adapters.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", LabelShiftWarning)
                    ada.adapt(X_test[idx])
                results[method] = (ada.target_priors_, ada.predict_proba(X_test[idx]))
            results["oracle"] = (true, adjust_posteriors(base, bcts.source_priors_, true))
            ref = abstention_em(base, bcts.held_out_proba_)
            if ref is not None:  # same inputs, both run to a tight tolerance
                ours = em_prior_estimate(base, bcts.source_priors_, tol=1e-10, max_iter=100_000)
                abst_diff.append(float(np.max(np.abs(ref - ours))))
            for method in METHODS:
                est, proba = results[method]
                rows.append(
                    {
                        "method": method,
                        "target_prior": priors.tolist(),
                        "prior_mae": float(np.mean(np.abs(est - true))),
                        "log_loss": float(log_loss(yt, proba, labels=np.arange(k))),
                        "accuracy": float(accuracy_score(yt, proba.argmax(axis=1))),
                    }
                )
            progress.update(1)
    summary = {}
    base_rows = [r for r in rows if r["method"] == "unadapted"]
    for method in METHODS:
        mr = [r for r in rows if r["method"] == method]
        summary[method] = {
            "prior_mae": float(np.mean([r["prior_mae"] for r in mr])),
            "log_loss": float(np.mean([r["log_loss"] for r in mr])),
            "accuracy": float(np.mean([r["accuracy"] for r in mr])),
            "delta_log_loss": float(
                np.mean([r["log_loss"] - b["log_loss"] for r, b in zip(mr, base_rows)])
            ),
            "delta_accuracy": float(
                np.mean([r["accuracy"] - b["accuracy"] for r, b in zip(mr, base_rows)])
            ),
        }
    info = {
        "n_source": int(len(y_src)),
        "n_test_pool": int(len(y_test)),
        "n_classes": k,
        "n_target": n_target,
        "n_targets": len(base_rows),
        "source_test_accuracy_bcts": float(src_acc),
        "fit_seconds": round(fit_s, 2),
        "abstention_em_max_abs_diff": max(abst_diff) if abst_diff else None,
    }
    return {"info": info, "summary": summary, "rows": rows}


def print_table(name, res):
    info = res["info"]
    print(
        f"\n{name}: {info['n_classes']} classes, source n={info['n_source']}, "
        f"{info['n_targets']} target sets of n={info['n_target']} from a test pool of "
        f"{info['n_test_pool']}; fit {info['fit_seconds']} s"
    )
    header = (
        f"{'method':<10} {'prior MAE':>9} {'log-loss':>9} {'d logloss':>10} {'acc':>7} "
        f"{'d acc':>7}"
    )
    print(header)
    print("-" * len(header))
    for method, s in res["summary"].items():
        print(
            f"{method:<10} {s['prior_mae']:>9.4f} {s['log_loss']:>9.4f} "
            f"{s['delta_log_loss']:>+10.4f} {s['accuracy']:>7.4f} {s['delta_accuracy']:>+7.4f}"
        )
    if info["abstention_em_max_abs_diff"] is not None:
        diff = info["abstention_em_max_abs_diff"]
        print(f"abstention EM agreement (max |diff| of priors): {diff:.2e}")


def summarise(rows) -> dict:
    """The result's ``summary``: prior error and change of log-loss / accuracy per method."""
    summary = flat_summary(
        rows,
        section="method",
        keys=["dataset", "method"],
        metrics=["prior_mae", "delta_log_loss", "delta_accuracy"],
        ndigits=4,
    )
    diff = ["abstention_em_max_abs_diff"]
    summary.update(flat_summary(rows, section="dataset", keys=["dataset"], metrics=diff))
    summary.update(flat_summary(rows, section="total", keys=["section"], metrics=["seconds"]))
    return summary


def main(argv=None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)
    bench = Benchmark("label_shift", issue=6, args=args)
    from tqdm.auto import tqdm

    total = Stopwatch()
    repeats = 2 if args.quick else 10
    datasets = []
    for name in ("breastmnist", "pneumoniamnist"):
        data = load_pooled_medmnist(name, args.seed)
        if data is not None:
            datasets.append((name, data, 30, 300))
    datasets.append(("digits", load_digits_split(args.seed), 30, 500))

    results = {}
    for name, data, n_comp, n_target in datasets:
        k = int(data[2].max()) + 1
        n_sets = len(target_priors_list(k, args.quick, np.random.default_rng(0))) * repeats
        with tqdm(total=n_sets, desc=name, disable=args.verbose == 0, leave=False) as bar:
            results[name] = run_dataset(
                name,
                data,
                n_components=n_comp,
                n_target=n_target,
                repeats=repeats,
                quick=args.quick,
                seed=args.seed,
                progress=bar,
            )
        print_table(name, results[name])

    print(f"\ntotal {total.stop():.0f} s")
    rows = []
    for name, r in results.items():
        rows += [
            {"section": "method", "dataset": name, "method": m, **s}
            for m, s in r["summary"].items()
        ]
        rows.append({"section": "dataset", "dataset": name, **r["info"]})
    rows.append({"section": "total", "seconds": round(total.seconds, 1)})
    config = {
        "datasets": [d[0] for d in datasets],
        "seed": args.seed,
        "repeats_per_prior": repeats,
        "features": "flattened pixels -> PCA (fitted on source) -> StandardScaler -> "
        "LogisticRegression(C=0.1)",
        "n_components": {d[0]: d[2] for d in datasets},
        "n_target": {d[0]: d[3] for d in datasets},
    }
    bench.write(config=config, results=rows, summary=summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
