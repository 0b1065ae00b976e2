"""Sanity checks of saliency maps (issue 18): model randomisation and lesion localisation.

Two checks of :func:`skrtl.explain`, on models trained on training data only and maps of
held-out test images:

* **Model randomisation** (Adebayo et al. 2018, "Sanity checks for saliency maps") on
  BreastMNIST: the maps of a fine-tuned network (Grad-CAM, Grad-CAM++, occlusion) and of a
  linear probe (class activation map) are compared with those of copies whose layers are
  re-initialised from the output down, cascading and independently; reported is the Spearman
  rank correlation with the trained maps (median over the test images). A method passes when
  it drops well below 1 once the top layers are random.
* **Lesion localisation** on the lesion phantom (``skrtl.datasets.make_lesion_phantom``), where
  the class is in the lesion's texture and margin: the share of the (positive) saliency inside
  the lesion mask next to the mask's share of the image (what a map spread evenly would get).
  Networks see the whole image; the probe is run with whole-image pooling (the fair check)
  and with masked pooling (where the map lies inside the mask by construction).

Usage::

    python benchmarks/bench_saliency.py          # BreastMNIST 624 + phantom 400 images
    python benchmarks/bench_saliency.py --quick  # tiny sizes, checks the plumbing
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
from _common import Benchmark, bench_parser, flat_summary, load_medmnist_splits, pooled


def summarise(rows: list[dict]) -> dict:
    out = flat_summary(
        rows,
        keys=["data", "model", "method", "randomization", "layer"],
        metrics=["spearman_median"],
        section="randomization",
        ndigits=3,
    )
    out.update(
        flat_summary(
            rows,
            keys=["model", "method", "images"],
            metrics=["share_in_mask", "mask_fraction", "ratio", "share_above_fraction"],
            section="lesion",
            ndigits=3,
        )
    )
    out.update(
        flat_summary(
            rows, keys=["model", "method"], metrics=["sec_per_image"], section="timing", ndigits=3
        )
    )
    return out


def _finetune(size, epochs, seed):
    from skrtl import FineTuneClassifier

    return FineTuneClassifier(
        input_size=size, n_estimators=1, max_epochs=epochs, random_state=seed, verbose=0
    )


def _probe(size, mask_pooling=True):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from skrtl import PretrainedCNNFeatures

    return make_pipeline(
        PretrainedCNNFeatures(input_size=size, mask_pooling=mask_pooling),
        StandardScaler(),
        LogisticRegression(C=0.01, max_iter=5000),
    )


def _auc(model, X, y) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, model.predict_proba(X)[:, 1]))


def _randomization_rows(data, model_name, model, X, plans):
    """Rows of ``randomization_test`` for each ``(method, cascade, n_images, n_layers)``."""
    from skrtl import randomization_test

    rows = []
    for method, cascade, n, n_layers in plans:
        t0 = time.perf_counter()
        res = randomization_test(
            model, X.iloc[:n], method=method, cascade=cascade, n_layers=n_layers
        )
        sec = time.perf_counter() - t0
        kind = "cascading" if cascade else "independent"
        table = res.summary()
        for rec in table.to_dict("records"):
            rows.append(
                {
                    "section": "randomization",
                    "data": data,
                    "model": model_name,
                    "method": method,
                    "randomization": kind,
                    "layer": rec["layer"],
                    "step": rec["step"],
                    "spearman_median": rec["spearman_median"],
                    "spearman_q25": rec["spearman_q25"],
                    "spearman_q75": rec["spearman_q75"],
                    "abs_spearman_median": rec["abs_spearman_median"],
                    "n_images": rec["n_samples"],
                    "seconds": sec,
                }
            )
        shown = table.iloc[sorted({0, min(1, len(table) - 1), len(table) - 1})]
        print(
            f"  {model_name:8s} {method:9s} {kind:11s} median Spearman: "
            + ", ".join(f"{r.layer} {r.spearman_median:+.2f}" for r in shown.itertuples())
            + f"  ({sec:.0f} s)",
            flush=True,
        )
    return rows


def _lesion_rows(model_name, model, X, y, *, method, images, target, layer=None):
    from skrtl import explain

    t0 = time.perf_counter()
    maps = explain(model, X, method=method, target=target, layer=layer)
    sec = time.perf_counter() - t0
    share, frac = maps.mask_share(), maps.mask_fraction()
    ok = np.isfinite(share)
    row = {
        "section": "lesion",
        "model": model_name,
        "method": method,
        "images": images,
        "target": "predicted class" if target is None else f"class {target}",
        "n_images": int(ok.sum()),
        "share_in_mask": float(np.mean(share[ok])),
        "share_in_mask_median": float(np.median(share[ok])),
        "mask_fraction": float(np.mean(frac[ok])),
        "ratio": float(np.mean(share[ok]) / np.mean(frac[ok])),
        "share_above_fraction": float(np.mean(share[ok] > frac[ok])),
        "n_constant_maps": int((~ok).sum()),
        "seconds": sec,
    }
    print(
        f"  {model_name:22s} {method:9s} {images:10s} share in lesion {row['share_in_mask']:.3f}"
        f" vs lesion fraction {row['mask_fraction']:.3f} (x{row['ratio']:.2f}; above for "
        f"{row['share_above_fraction']:.0%} of {row['n_images']})",
        flush=True,
    )
    timing = {
        "section": "timing",
        "model": model_name,
        "method": method,
        "sec_per_image": sec / max(1, len(X)),
        "n_images": len(X),
    }
    return [row, timing]


def main(argv=None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    bench = Benchmark("saliency", issue=18, args=args)
    quick = bench.quick
    warnings.filterwarnings("ignore", category=UserWarning)
    ft_size, probe_size = (64, 64) if quick else (96, 224)
    epochs = 2 if quick else 15
    n_rand, n_occ = (6, 2) if quick else (32, 8)
    config = {
        "finetune": {"input_size": ft_size, "n_estimators": 1, "max_epochs": epochs},
        "probe": {"input_size": probe_size, "scaler": True, "C": 0.01},
        "randomization_images": n_rand,
        "occlusion_images": n_occ,
        "occlusion_randomized_layers": 4,
        "seed": args.seed,
    }
    rows: list[dict] = []
    notes = [
        "Spearman rank correlation of each test image's map with the trained model's map, "
        "median over images; step k of 'cascading' randomises the top k layers, of "
        "'independent' only the k-th layer from the top (the target class stays the trained "
        "model's prediction). A constant map counts as correlation 0.",
        "share_in_mask: share of the positive part of each map inside the lesion mask, mean "
        "over test images; mask_fraction: the mask's share of the image; ratio: their "
        "quotient; share_above_fraction: share of images whose map beats its mask fraction.",
    ]

    # ---------------------------------------------------------------- BreastMNIST
    splits = load_medmnist_splits("breastmnist", missing="skip")
    if splits is not None:
        from skrtl import make_image_frame

        X_tr, y_tr = pooled(splits, "train", "val")
        X_te, y_te = splits["test"]
        if quick:
            X_tr, y_tr, X_te, y_te = X_tr[:80], y_tr[:80], X_te[:12], y_te[:12]
        F_tr, F_te = make_image_frame(list(X_tr)), make_image_frame(list(X_te))
        print(f"BreastMNIST: {len(y_tr)} train, {len(y_te)} test", flush=True)
        t0 = time.perf_counter()
        ft = _finetune(ft_size, epochs, args.seed).fit(F_tr, y_tr)
        probe = _probe(probe_size).fit(F_tr, y_tr)
        config["breastmnist"] = {
            "n_train": len(y_tr),
            "n_test": len(y_te),
            "finetune_test_auc": _auc(ft, F_te, y_te),
            "probe_test_auc": _auc(probe, F_te, y_te),
            "fit_seconds": time.perf_counter() - t0,
        }
        print(f"  test AUC: fine-tune {config['breastmnist']['finetune_test_auc']:.3f}, probe "
              f"{config['breastmnist']['probe_test_auc']:.3f}", flush=True)  # fmt: skip
        plans = [
            ("gradcam", True, n_rand, None),
            ("gradcam", False, n_rand, None),
            ("gradcam++", True, n_rand, None),
            ("occlusion", True, n_occ, 4),
        ]
        rows += _randomization_rows("breastmnist", "finetune", ft, F_te, plans)
        plans = [("cam", True, n_rand, None), ("cam", False, n_rand, None)]
        rows += _randomization_rows("breastmnist", "probe", probe, F_te, plans)
        bench.write(config=config, results=rows, summary=summarise(rows), notes=notes)

    # ---------------------------------------------------------------- lesion phantom
    from skrtl.datasets import make_lesion_phantom

    n = 80 if quick else 400
    ph = make_lesion_phantom(n, image_size=64, n_sites=3, prevalence=0.5, random_state=args.seed)
    rng = np.random.default_rng(args.seed)
    test = np.zeros(n, dtype=bool)
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(ph.target == c))
        test[idx[: len(idx) // 4]] = True
    X, y = ph.frame, ph.target
    Xtr, ytr, Xte, yte = X[~test], y[~test], X[test], y[test]
    print(f"lesion phantom: {len(ytr)} train, {len(yte)} test", flush=True)
    ft = _finetune(ft_size, epochs, args.seed).fit(Xtr, ytr)
    probe_whole = _probe(probe_size, mask_pooling=False).fit(Xtr, ytr)
    probe_mask = _probe(probe_size, mask_pooling=True).fit(Xtr, ytr)
    config["phantom"] = {
        "n_train": int(len(ytr)),
        "n_test": int(len(yte)),
        "image_size": 64,
        "finetune_test_auc": _auc(ft, Xte, yte),
        "probe_whole_image_test_auc": _auc(probe_whole, Xte, yte),
        "probe_masked_test_auc": _auc(probe_mask, Xte, yte),
    }
    print(f"  test AUC: fine-tune {config['phantom']['finetune_test_auc']:.3f}, probe (whole "
          f"image) {config['phantom']['probe_whole_image_test_auc']:.3f}, probe (masked) "
          f"{config['phantom']['probe_masked_test_auc']:.3f}", flush=True)  # fmt: skip
    malignant = Xte.iloc[np.flatnonzero(yte == 1)]
    n_occ_ph = 4 if quick else 40
    n_score = 2 if quick else 12
    for images, frame, target in (("malignant", malignant, 1), ("all", Xte, None)):
        for method in ("gradcam", "gradcam++"):
            rows += _lesion_rows("finetune", ft, frame, None, method=method, images=images,
                                 target=target)  # fmt: skip
        rows += _lesion_rows("finetune", ft, frame.iloc[:n_occ_ph], None, method="occlusion",
                             images=images, target=target)  # fmt: skip
        rows += _lesion_rows("probe (whole image)", probe_whole, frame, None, method="cam",
                             images=images, target=target)  # fmt: skip
        rows += _lesion_rows("probe (masked)", probe_mask, frame, None, method="cam",
                             images=images, target=target)  # fmt: skip
    rows += _lesion_rows("finetune", ft, malignant.iloc[:n_score], None, method="scorecam",
                         images="malignant", target=1, layer="blocks.5")  # fmt: skip
    rows += _randomization_rows("phantom", "finetune", ft, Xte, [("gradcam", True, n_rand, None)])
    plans = [("cam", True, n_rand, None)]
    rows += _randomization_rows("phantom", "probe", probe_whole, Xte, plans)
    bench.write(config=config, results=rows, summary=summarise(rows), notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
