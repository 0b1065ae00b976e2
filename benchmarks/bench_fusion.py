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

from skrtl._radiomics import RadiomicsFeatures

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA_DIR = Path(os.environ.get("SKRTL_DATA_DIR", HERE.parent / ".." / "shared" / "data"))
REFERENCE = {"MedMNIST v2 ResNet-18 (28)": 0.901, "Google AutoML Vision": 0.919}


def load(quick: bool, seed: int):
    path = DATA_DIR / "breastmnist.npz"
    if not path.is_file():
        return None
    with np.load(path) as d:
        X_tr = np.concatenate([d["train_images"], d["val_images"]])
        y_tr = np.concatenate([d["train_labels"], d["val_labels"]]).ravel()
        X_te, y_te = d["test_images"], d["test_labels"].ravel()
    if quick:
        rng = np.random.default_rng(seed)
        i_tr = rng.choice(len(y_tr), 120, replace=False)
        i_te = rng.choice(len(y_te), 60, replace=False)
        X_tr, y_tr, X_te, y_te = X_tr[i_tr], y_tr[i_tr], X_te[i_te], y_te[i_te]
    return X_tr, y_tr, X_te, y_te


def deep_features(
    images: np.ndarray, quick: bool, precision: str = "auto"
) -> tuple[np.ndarray, list[str], str]:
    try:
        from skrtl._features import PretrainedCNNFeatures

        ext = PretrainedCNNFeatures(
            input_size=64 if quick else 224, batch_size=32, precision=precision
        )
        feats = ext.fit_transform(images)
        source = f"skrtl PretrainedCNNFeatures (precision {ext.precision_})"
        return feats, list(ext.get_feature_names_out()), source
    except ImportError:  # fallback: minimal pooled features straight from the backbone
        import torch

        from skrtl._backbone import backbone_data_config, load_backbone
        from skrtl._imaging import scale_intensity, to_network_tensor

        model = load_backbone().eval()
        cfg = backbone_data_config(model)
        imgs = [scale_intensity(im.astype(np.float32), method="uint8") for im in images]
        out = []
        with torch.inference_mode():
            for s in range(0, len(imgs), 32):
                x, _ = to_network_tensor(
                    imgs[s : s + 32],
                    size=64 if quick else 224,
                    in_chans=3,
                    mean=cfg["mean"],
                    std=cfg["std"],
                )
                out.append(model(x).numpy())
        feats = np.concatenate(out)
        names = [f"cnn_{i:04d}" for i in range(feats.shape[1])]
        return feats, names, "load_backbone + global average pooling (fallback)"


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision", default="auto", help="precision of PretrainedCNNFeatures (default auto)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fusion.json")
    args = parser.parse_args(argv)
    if args.quick and args.out == RESULTS / "fusion.json":  # keep the full results
        args.out = RESULTS / "quick" / "fusion.json"
    data = load(args.quick, args.seed)
    if data is None:
        print(f"breastmnist.npz not found under {DATA_DIR} (set SKRTL_DATA_DIR); nothing to do")
        return 0
    start = time.perf_counter()
    X_tr, y_tr, X_te, y_te = data
    images = np.concatenate([X_tr, X_te])
    n_tr = len(y_tr)
    timings = {}

    t0 = time.perf_counter()
    deep, deep_names, deep_source = deep_features(images, args.quick, args.precision)
    timings["deep_extraction_s"] = round(time.perf_counter() - t0, 1)
    feats = {"deep": deep}
    names = {"deep": deep_names}
    n_rad = {}
    for mask in ("whole", "otsu"):
        t0 = time.perf_counter()
        rad, rad_names = radiomics_features(images, mask, args.quick)
        timings[f"radiomics_{mask}_extraction_s"] = round(time.perf_counter() - t0, 1)
        feats[f"radiomics-{mask}"] = rad
        feats[f"fusion-{mask}"] = np.hstack([deep, rad])
        rad_names = [f"rad_{n}" for n in rad_names]
        names[f"radiomics-{mask}"] = rad_names
        names[f"fusion-{mask}"] = deep_names + rad_names
        n_rad[mask] = {
            "n_features": len(rad_names),
            "n_failed_images": int(np.isnan(rad).all(axis=1).sum()),
        }

    test_scores, results = {}, {}
    for name, F in feats.items():
        t0 = time.perf_counter()
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
            "head_seconds": round(time.perf_counter() - t0, 1),
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
    boots = bootstrap(y_te, test_scores, 200 if args.quick else 2000, args.seed)
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
    total = time.perf_counter() - start

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
    print(f"total {total:.0f} s")

    out = {
        "benchmark": "fusion",
        "data": "breastmnist.npz (train+val for training, official test split)",
        "quick": args.quick,
        "seed": args.seed,
        "seconds": round(total, 1),
        "hardware": f"{os.cpu_count()}-core CPU (1-min load average "
        f"{os.getloadavg()[0]:.1f} at the end), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "n_train": n_tr,
        "n_test": int(len(y_te)),
        "deep_features": deep_source,
        "radiomics": n_rad,
        "timings": timings,
        "results": results,
        "paired_bootstrap_test_auc": paired,
        "reference_test_auc": REFERENCE,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
