"""Deep + handcrafted radiomics fusion vs each alone on BreastMNIST (real ultrasound images).

Data: ``breastmnist.npz`` in the shared data folder (28 x 28 breast ultrasound, 0 = malignant,
1 = normal/benign; official train+val = 624 images for training, test = 156). No lesion
masks are available, so the handcrafted features use either the whole image or an automatic
Otsu-threshold foreground mask as region of interest.

Feature sets:

* ``deep``: ``PretrainedCNNFeatures`` (ImageNet EfficientNet-Lite0, global average pooling of
  the last stage, 1280 features, images upsampled to 224 px);
* ``radiomics``: ``RadiomicsFeatures`` (PyRadiomics first order, shape2D, GLCM, GLRLM, GLSZM,
  GLDM, NGTDM on the original, LoG sigma 1 and 2 px and wavelet images; bin width 8 grey
  levels), ``whole``-image or ``otsu`` mask;
* ``fusion``: both side by side (``FeatureUnion``; early fusion), and ``late-fusion``: the
  mean of the deep and the radiomics model's predicted probabilities.

Both extractors are per-image and unsupervised (nothing is learnt from other images), so their
features are computed once for all images and the *learnt* part -- imputation, variance
filter, scaling, univariate selection (``SelectKBest``, k in {20, 100, all}) and logistic
regression (C in {0.01, 0.1, 1}) -- is tuned by 5-fold CV on the training images only
(identical to putting the extractors inside the pipeline, but each image is processed once).
Reported: test AUC with 95 % bootstrap interval and the paired bootstrap difference of the
fusion against each single source; plus the mean AUC of 3 x 5-fold CV on all 780 images with
a fixed head (k=all, C=0.1).

Usage::

    python benchmarks/bench_fusion.py            # full run
    python benchmarks/bench_fusion.py --quick    # 120 train / 60 test images, no filters

Results: ``results/fusion.json`` (schema in ``_common.py``): rows of ``section``
"extraction", "feature_set", "paired_bootstrap" and "total".
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
from _common import Benchmark, Stopwatch, bench_parser, flat_summary, load_medmnist_splits, pooled
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectKBest, VarianceThreshold, f_classif
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import (
    GridSearchCV,
    RepeatedStratifiedKFold,
    StratifiedKFold,
    cross_val_score,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl import PretrainedCNNFeatures, RadiomicsFeatures

REFERENCE = {"MedMNIST v2 ResNet-18 (28)": 0.901, "Google AutoML Vision": 0.919}


def load(quick: bool, seed: int):
    splits = load_medmnist_splits("breastmnist")
    X_tr, y_tr = pooled(splits, "train", "val")
    X_te, y_te = splits["test"]
    if quick:
        rng = np.random.default_rng(seed)
        i_tr = rng.choice(len(y_tr), 120, replace=False)
        i_te = rng.choice(len(y_te), 60, replace=False)
        X_tr, y_tr, X_te, y_te = X_tr[i_tr], y_tr[i_tr], X_te[i_te], y_te[i_te]
    return X_tr, y_tr, X_te, y_te


def deep_features(
    images: np.ndarray, quick: bool, precision: str = "auto"
) -> tuple[np.ndarray, list[str], str]:
    ext = PretrainedCNNFeatures(
        input_size=64 if quick else 224, batch_size=32, precision=precision
    )
    feats = ext.fit_transform(images)
    source = f"skrtl PretrainedCNNFeatures (precision {ext.precision_})"
    return feats, list(ext.get_feature_names_out()), source


def radiomics_features(images: np.ndarray, mask: str, quick: bool):
    image_types = None if quick else {"Original": {}, "LoG": {"sigma": [1.0, 2.0]}, "Wavelet": {}}
    ext = RadiomicsFeatures(
        image_types=image_types,
        settings={"binWidth": 8},
        missing_mask=mask,
        errors="nan",
        verbose=0,
    )
    feats = ext.fit_transform(images.astype(np.float32))
    return feats, list(ext.get_feature_names_out())


def head(k="all", C=0.1):
    return make_pipeline(
        SimpleImputer(strategy="median"),
        VarianceThreshold(),
        StandardScaler(),
        SelectKBest(f_classif, k=k),
        LogisticRegression(C=C, max_iter=5000),
    )


def tuned_head(n_features: int, seed: int):
    ks = sorted({min(20, n_features), min(100, n_features)}) + ["all"]
    return GridSearchCV(
        head(),
        {"selectkbest__k": ks, "logisticregression__C": [0.01, 0.1, 1.0]},
        cv=StratifiedKFold(5, shuffle=True, random_state=seed),
        scoring="roc_auc",
        error_score=np.nan,
    )


def bootstrap(y, scores: dict, n_boot: int, seed: int):
    rng = np.random.default_rng(seed)
    n = len(y)
    boots = {name: [] for name in scores}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if len(np.unique(y[idx])) < 2:
            continue
        for name, s in scores.items():
            boots[name].append(roc_auc_score(y[idx], s[idx]))
    return {name: np.asarray(v) for name, v in boots.items()}


def summarise(rows) -> dict:
    """The result's ``summary``: AUCs per feature set, paired differences, seconds."""
    metrics = ["test_auc", "cv_auc_mean", "inner_cv_auc"]
    summary = flat_summary(rows, section="feature_set", keys=["features"], metrics=metrics)
    metrics = ["mean", "p_fusion_not_better"]
    summary.update(
        flat_summary(rows, section="paired_bootstrap", keys=["comparison"], metrics=metrics)
    )
    summary.update(
        flat_summary(rows, section="extraction", keys=["features"], metrics=["seconds"])
    )
    summary.update(flat_summary(rows, section="total", keys=["section"], metrics=["seconds"]))
    return summary


def main(argv=None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision", default="auto", help="precision of PretrainedCNNFeatures (default auto)"
    )
    args = parser.parse_args(argv)
    bench = Benchmark("fusion", issue=9, args=args)
    X_tr, y_tr, X_te, y_te = load(args.quick, args.seed)
    total = Stopwatch()
    images = np.concatenate([X_tr, X_te])
    n_tr = len(y_tr)
    extraction = []

    with Stopwatch() as sw:
        deep, deep_names, deep_source = deep_features(images, args.quick, args.precision)
    extraction.append({"features": "deep", "seconds": round(sw.seconds, 1)})
    feats = {"deep": deep}
    names = {"deep": deep_names}
    for mask in ("whole", "otsu"):
        with Stopwatch() as sw:
            rad, rad_names = radiomics_features(images, mask, args.quick)
        extraction.append(
            {
                "features": f"radiomics-{mask}",
                "seconds": round(sw.seconds, 1),
                "n_features": len(rad_names),
                "n_failed_images": int(np.isnan(rad).all(axis=1).sum()),
            }
        )
        feats[f"radiomics-{mask}"] = rad
        feats[f"fusion-{mask}"] = np.hstack([deep, rad])
        rad_names = [f"rad_{n}" for n in rad_names]
        names[f"radiomics-{mask}"] = rad_names
        names[f"fusion-{mask}"] = deep_names + rad_names

    test_scores, results = {}, {}
    for name, F in feats.items():
        with Stopwatch() as sw:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (ConvergenceWarning, RuntimeWarning, UserWarning))
                grid = tuned_head(F.shape[1], args.seed).fit(F[:n_tr], y_tr)
                proba = grid.predict_proba(F[n_tr:])[:, 1]
                cv = RepeatedStratifiedKFold(
                    n_splits=5, n_repeats=1 if args.quick else 3, random_state=args.seed
                )
                all_y = np.concatenate([y_tr, y_te])
                cv_auc = cross_val_score(head(), F, all_y, cv=cv, scoring="roc_auc")
            test_scores[name] = proba
            sel = grid.best_estimator_[:-1].get_feature_names_out(np.asarray(names[name]))
        results[name] = {
            "n_features": int(F.shape[1]),
            "test_auc": round(float(roc_auc_score(y_te, proba)), 4),
            "cv_auc_mean": round(float(cv_auc.mean()), 4),
            "cv_auc_std": round(float(cv_auc.std(ddof=1)), 4),
            "best_params": {k.split("__")[1]: v for k, v in grid.best_params_.items()},
            "inner_cv_auc": round(float(grid.best_score_), 4),
            "selected_deep_features": int(sum(str(s).startswith("cnn") for s in sel)),
            "selected_radiomics_features": int(sum(str(s).startswith("rad_") for s in sel)),
            "head_seconds": round(sw.seconds, 1),
        }

    for mask in ("whole", "otsu"):  # late fusion: mean of the two single-source probabilities
        proba = 0.5 * (test_scores["deep"] + test_scores[f"radiomics-{mask}"])
        test_scores[f"late-fusion-{mask}"] = proba
        results[f"late-fusion-{mask}"] = {
            "n_features": results["deep"]["n_features"]
            + results[f"radiomics-{mask}"]["n_features"],
            "test_auc": round(float(roc_auc_score(y_te, proba)), 4),
            "cv_auc_mean": None,
            "cv_auc_std": None,
            "best_params": {"k": "-", "C": "-"},
        }
    n_boot = 200 if args.quick else 2000
    boots = bootstrap(y_te, test_scores, n_boot, args.seed)
    for name, b in boots.items():
        lo, hi = np.percentile(b, [2.5, 97.5])
        results[name]["test_auc_ci95"] = [round(float(lo), 4), round(float(hi), 4)]
    paired = {}
    for mask in ("whole", "otsu"):
        for fused, other in (
            (f"fusion-{mask}", "deep"),
            (f"fusion-{mask}", f"radiomics-{mask}"),
            (f"late-fusion-{mask}", "deep"),
        ):
            d = boots[fused] - boots[other]
            lo, hi = np.percentile(d, [2.5, 97.5])
            paired[f"{fused} - {other}"] = {
                "mean": round(float(d.mean()), 4),
                "ci95": [round(float(lo), 4), round(float(hi), 4)],
                "p_fusion_not_better": round(float((d <= 0).mean()), 4),
            }
    total.stop()

    print(f"\nBreastMNIST: {n_tr} train / {len(y_te)} test images; deep features: {deep_source}")
    header = f"{'features':<18} {'n':>5} {'test AUC [95% CI]':>24} {'CV AUC':>13} {'k, C':>12}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        ci = r["test_auc_ci95"]
        bp = r["best_params"]
        kc = f"{bp['k']}, {bp['C']}"
        print(
            f"{name:<18} {r['n_features']:>5} {r['test_auc']:>8.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
            + (
                f"   {r['cv_auc_mean']:.3f}±{r['cv_auc_std']:.3f}"
                if r["cv_auc_mean"] is not None
                else f"{'-':>14}"
            )
            + f" {kc:>12}"
        )
    for key, v in paired.items():
        print(f"{key:<36} dAUC {v['mean']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]")
    print(f"reference (MedMNIST v2 paper, test AUC): {REFERENCE}")
    print(f"total {total.seconds:.0f} s")

    rows = (
        [{"section": "extraction", **e} for e in extraction]
        + [{"section": "feature_set", "features": k, **r} for k, r in results.items()]
        + [{"section": "paired_bootstrap", "comparison": k, **v} for k, v in paired.items()]
        + [{"section": "total", "seconds": round(total.seconds, 1)}]
    )
    config = {
        "data": "breastmnist.npz (train+val for training, official test split)",
        "seed": args.seed,
        "precision": args.precision,
        "n_train": n_tr,
        "n_test": int(len(y_te)),
        "deep_features": deep_source,
        "n_bootstrap": n_boot,
        "reference_test_auc": REFERENCE,
    }
    bench.write(config=config, results=rows, summary=summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
