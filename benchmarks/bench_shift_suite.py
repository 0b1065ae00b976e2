"""Harmonization on a grid of simulated scanner shifts, and the automatic choice among them.

Every 2-D MedMNIST data set in the data folder (BreastMNIST: ultrasound, PneumoniaMNIST:
chest X-ray) x every 2-D shift of :func:`skrtl.datasets.simulate_scanner` (the 15 single
shifts, relative amounts, plus the scanner profiles of the data set's modality and the
modality-free ``legacy_scanner``) x severities 1, 3 and 5.

Protocol (one "cell" per data set, shift and severity): the linear probe
(:class:`skrtl.PretrainedCNNFeatures` ``tf_efficientnet_lite0`` at ``--input-size`` px ->
``StandardScaler`` -> ``LogisticRegression(C=0.05)``) is trained on the train split (the
source site, at most ``--n-train`` images, a stratified random subsample); the target site is
the evaluation split seen through the simulated scanner. :class:`skrtl.AutoHarmonizer` is
fitted on the labelled source images and the *unlabelled* target images with its default
candidates, scores the others for comparison (``compare``) and keeps every one
(``keep_candidates=True``). The target labels are used only to score:

* ``auc_clean``: the probe on the uncorrupted evaluation split (no shift);
* ``auc_none``: the probe on the shifted split, no adaptation;
* ``auc[<candidate>]``: each harmonizer (AdaBN with each ``source_stats``, histogram
  matching, ComBat with the target site, skada CORAL and subspace alignment);
* ``auc_auto``: the candidate the selector chose without target labels;
* ``auc_oracle``: the best candidate by target AUC (reference only: it uses the labels).

``lost = auc_clean - auc_none``; the recovered fraction of a method is ``(auc - auc_none) /
lost`` on the cells that lose more than 0.02 AUC. Goals (issue 16): on no cell is the
automatic choice worse than no adaptation by more than 0.01 AUC; over the lossy cells it
recovers on average at least 40 % of the lost AUC.

Splits:

* ``--split traincv``: the development grid on which the current rule was chosen. The
  official train split of each data set is cut (stratified, seeded) into a source part and a
  held-out target part (``TRAINCV_TARGET`` images: 200 of BreastMNIST's 546, 400 of
  PneumoniaMNIST's 4708, whose source part is then subsampled with ``--n-train 600``); the
  target part is corrupted with seeds of its own. It never touches the validation or test
  split.
* ``--split val``: the first development grid (the validation split; only 78 BreastMNIST
  images), on which the first rule was chosen.
* ``--split test`` (default): the test split. ``results/shift_suite.json`` is the grid on
  which the first rule was reported (seen, so no rule may be tuned on it);
  ``--seed-offset N`` (N != 0) corrupts the test split with other seeds: a fresh test grid
  (``results/shift_suite_fresh.json``), run once with the current rule fixed.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_shift_suite.py --split traincv --n-train 600
    OMP_NUM_THREADS=1 python benchmarks/bench_shift_suite.py --seed-offset 5000  # fresh test
    OMP_NUM_THREADS=1 python benchmarks/bench_shift_suite.py --split val   # first dev grid
    python benchmarks/bench_shift_suite.py --quick                         # smoke run
    # data sets in parallel, then one result file (and the docs tables)
    python benchmarks/bench_shift_suite.py --datasets breastmnist --out a.json
    python benchmarks/bench_shift_suite.py --datasets pneumoniamnist --out b.json
    python benchmarks/bench_shift_suite.py --merge a.json b.json
    python benchmarks/bench_shift_suite.py --table results/shift_suite.json

Use ``OMP_NUM_THREADS=1`` on a shared CPU: multi-threaded BLAS (the logistic regressions and
CORAL's eigendecompositions) was many times slower than single-threaded there.

Results: ``results/shift_suite.json`` (``shift_suite_fresh.json`` with a seed offset,
``shift_suite_traincv.json`` for ``--split traincv``, ``shift_suite_dev.json`` for ``--split
val``; schema in ``_common.py``): one row of ``section`` "cell" per cell (with every
candidate's unsupervised criteria), "clean" rows (the selector on the uncorrupted split,
which should choose "none"), "harmonizer" rows (per harmonizer over the grid) and "total".
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from _common import (
    DATA_DIR,
    Benchmark,
    Stopwatch,
    bench_parser,
    flat_summary,
    load_medmnist_splits,
)
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl import AutoHarmonizer, HarmonizationWarning, PretrainedCNNFeatures, make_image_frame
from skrtl.datasets import list_scanner_shifts, simulate_scanner
from skrtl.utils import derive_seed

DATASETS = {"breastmnist": "us", "pneumoniamnist": "xray"}
CANDIDATES = [
    "none",
    "consensus",
    "adabn",
    "adabn_recompute",
    "histogram",
    "combat",
    "coral",
    "subspace_alignment",
]
LOSSY = 0.02  # a cell "loses" when the shift costs more than this AUC
MAX_HARM = 0.01  # goal: the automatic choice never below no adaptation by more than this
GOAL_RECOVERED = 0.40
SEVERITIES = (1, 3, 5)
# the seeds of the corruptions: the reported grid and the development grids differ
SEEDS = {"test": 0, "val": 1000, "traincv": 2000}
# --split traincv: the official train split cut into a source part and a held-out target part
# (stratified, seeded); at most this many target images per data set
TRAINCV_TARGET = {"breastmnist": 200, "pneumoniamnist": 400}
RESULT_NAMES = {"test": "shift_suite", "val": "shift_suite_dev", "traincv": "shift_suite_traincv"}


def result_name(split: str, seed_offset: int) -> str:
    """Result file stem: a test grid with other corruption seeds is a fresh grid."""
    if split == "test" and seed_offset:  # the first fresh grid kept its name
        return "shift_suite_fresh" if seed_offset == 5000 else f"shift_suite_fresh{seed_offset}"
    return RESULT_NAMES[split]


def traincv_split(y, n_target, seed):
    """Source and held-out target rows of the train split (stratified, seeded)."""
    rng = np.random.default_rng(seed)
    target = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        k = int(round(n_target * rows.size / len(y)))
        target.append(rng.choice(rows, min(k, rows.size - 2), replace=False))
    target = np.sort(np.concatenate(target))
    source = np.setdiff1d(np.arange(len(y)), target)
    return source, target


def shift_kinds(modality: str) -> list[str]:
    """The 2-D single shifts, then the profiles of ``modality`` and the modality-free ones."""
    table = list_scanner_shifts()
    table = table[~table["volumes_only"]]
    single = table[table["type"] == "shift"]["name"].tolist()
    profiles = table[(table["type"] == "profile") & table["modality"].isin([modality, "any"])][
        "name"
    ].tolist()
    return single + profiles


def stratified_subsample(y, n, seed):
    if n is None or n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        k = max(1, int(round(n * rows.size / len(y))))
        keep.append(rng.choice(rows, min(k, rows.size), replace=False))
    return np.sort(np.concatenate(keep))


def make_probe(input_size):
    features = PretrainedCNNFeatures(input_size=input_size, intensity="uint8", batch_size=64)
    estimator = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=5000))
    return features, estimator


def recovered(auc, auc_none, lost):
    return float((auc - auc_none) / lost) if lost > LOSSY else None


def run_cell(dataset, kind, severity, seed, source, y_source, X_eval, y_eval, args, dump):
    features, estimator = make_probe(args.input_size)
    target_images = (
        X_eval if severity == 0 else simulate_scanner(X_eval, kind, severity, random_state=seed)
    )
    target = make_image_frame(target_images, sites=["B"] * len(target_images))
    auto = AutoHarmonizer(
        features,
        estimator,
        compare=[c for c in CANDIDATES if c != "none"],  # scored and kept, chosen by the rule
        keep_candidates=True,
        random_state=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HarmonizationWarning)
        auto.fit(source, y_source, X_target=target)
    aucs, probas = {}, {}
    for name in auto.candidates_:
        proba = auto.predict_proba(target, candidate=name)[:, 1]
        probas[name] = proba.astype(np.float32)
        aucs[name] = float(roc_auc_score(y_eval, proba))
    if args.save_proba is not None:  # target probabilities per candidate, for offline analysis
        args.save_proba.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            args.save_proba / f"{dataset}_{kind}_{severity}.npz", y=y_eval, **probas
        )
    table = auto.scores_
    criteria = {}
    for name, row in table.iterrows():
        criteria[name] = {
            k: (v.item() if hasattr(v, "item") else v) for k, v in row.items() if v == v
        }
    if dump is not None:  # features of the network-level candidates, for offline analysis
        net = [
            c
            for c in auto.candidates_
            if c in ("none", "adabn", "adabn_recompute", "adabn_keep", "histogram")
        ]
        arrays = {f"T_{c}": auto.transform(target, candidate=c).astype(np.float32) for c in net}
        np.savez_compressed(dump / f"{dataset}_{kind}_{severity}.npz", y=y_eval, **arrays)
        src = dump / f"{dataset}_source.npz"
        if not src.exists():
            arrays = {
                f"S_{c}": auto.transform(source, candidate=c).astype(np.float32) for c in net
            }
            np.savez_compressed(src, y=y_source, **arrays)
    oracle = max(aucs, key=aucs.get)
    return {
        "choice": auto.choice_,
        "reason": auto.reason_,
        "auc": aucs,
        "auc_none": aucs["none"],
        "auc_auto": aucs[auto.choice_],
        "oracle": oracle,
        "auc_oracle": aucs[oracle],
        "criteria": criteria,
        "warned": sorted({str(w.message)[:200] for w in caught}),
    }


def summarise(rows) -> dict:
    """The result's ``summary``: goal numbers, then per harmonizer over the lossy cells."""
    cells = [r for r in rows if r.get("section") == "cell"]
    summary: dict = {"n_cells": len(cells)}
    if not cells:
        return summary
    lossy = [r for r in cells if r["lost"] > LOSSY]
    deltas = [r["auc_auto"] - r["auc_none"] for r in cells]
    summary["n_lossy_cells"] = len(lossy)
    summary["auto.worst_delta_vs_none"] = round(float(min(deltas)), 4)
    summary["auto.n_cells_worse_than_none_by_0.01"] = int(sum(d < -MAX_HARM for d in deltas))
    if lossy:
        for key in ("auto", "oracle"):
            rec = [r[f"recovered_{key}"] for r in lossy]
            summary[f"{key}.mean_recovered_lossy"] = round(float(np.mean(rec)), 4)
        summary["goal_never_worse_by_0.01"] = bool(min(deltas) >= -MAX_HARM)
        summary["goal_recover_40pct"] = bool(
            summary["auto.mean_recovered_lossy"] >= GOAL_RECOVERED
        )
    summary.update(
        flat_summary(
            rows,
            section="harmonizer",
            keys=["method"],
            metrics=["mean_recovered_lossy", "n_cells_worse_by_0.01", "mean_delta"],
            ndigits=4,
        )
    )
    summary.update(flat_summary(rows, section="total", keys=[], metrics=["seconds"]))
    return summary


def harmonizer_rows(cells):
    lossy = [r for r in cells if r["lost"] > LOSSY]
    out = []
    for method in [*CANDIDATES, "auto", "oracle"]:
        key = {"auto": "auc_auto", "oracle": "auc_oracle"}.get(method)

        def auc_of(r, method=method, key=key):
            return r[key] if key else r["auc"].get(method, np.nan)

        deltas = np.array([auc_of(r) - r["auc_none"] for r in cells])
        rec = [recovered(auc_of(r), r["auc_none"], r["lost"]) for r in lossy]
        rec = [v for v in rec if v is not None and np.isfinite(v)]
        out.append(
            {
                "section": "harmonizer",
                "method": method,
                "mean_delta": float(np.nanmean(deltas)),
                "worst_delta": float(np.nanmin(deltas)),
                "n_cells_worse_by_0.01": int(np.sum(deltas < -MAX_HARM)),
                "n_cells_better_by_0.01": int(np.sum(deltas > MAX_HARM)),
                "mean_recovered_lossy": float(np.mean(rec)) if rec else None,
                "n_chosen": int(sum(r["choice"] == method for r in cells))
                if method in CANDIDATES
                else None,
            }
        )
    return out


def print_cell(r):
    auc = r["auc"]
    rec = r["recovered_auto"]
    print(
        f"{r['dataset']:<15} {r['kind']:<24} {r['severity']}  clean {r['auc_clean']:.3f}  "
        f"none {r['auc_none']:.3f}  "
        + " ".join(f"{k[:8]} {v:.3f}" for k, v in auc.items() if k != "none")
        + f"  | auto={r['choice']} {r['auc_auto']:.3f} ({r['auc_auto'] - r['auc_none']:+.3f}"
        + (f", rec {rec:.2f}" if rec is not None else "")
        + f")  oracle={r['oracle']} {r['auc_oracle']:.3f}  [{r['seconds']:.0f} s]",
        flush=True,
    )


SHORT = {
    "none": "none",
    "consensus": "consensus",
    "adabn": "AdaBN",
    "adabn_recompute": "AdaBN-rec",
    "histogram": "hist",
    "combat": "ComBat",
    "coral": "CORAL",
    "subspace_alignment": "SA",
}


def _deltas(cells, name) -> str:
    return " / ".join(
        f"{c['auc'][name] - c['auc_none']:+.2f}" if name in c["auc"] else "fail" for c in cells
    )


def markdown_tables(path) -> str:
    """The docs tables: per harmonizer over the grid, then per data set and shift."""
    import json

    data = json.loads(Path(path).read_text())
    rows = data["results"]
    cells = [r for r in rows if r.get("section") == "cell"]
    out = [
        "| method | mean ΔAUC vs none | cells worse by > 0.01 | cells better by > 0.01 | "
        "mean recovered (lossy cells) | chosen on |",
        "|---|---|---|---|---|---|",
    ]
    for h in harmonizer_rows(cells):
        rec = h["mean_recovered_lossy"]
        chosen = "" if h["n_chosen"] is None else str(h["n_chosen"])
        name = {"auto": "**AutoHarmonizer**", "oracle": "oracle (target labels)"}.get(
            h["method"], HARMONIZER_CANDIDATES_DOC.get(h["method"], h["method"])
        )
        out.append(
            f"| {name} | {h['mean_delta']:+.3f} | {h['n_cells_worse_by_0.01']} | "
            f"{h['n_cells_better_by_0.01']} | {'' if rec is None else f'{rec:.2f}'} | {chosen} |"
        )
    for dataset in dict.fromkeys(r["dataset"] for r in cells):
        mine = [r for r in cells if r["dataset"] == dataset]
        clean = mine[0]["auc_clean"]
        out += [
            "",
            f"**{dataset}** (clean AUC {clean:.3f}); each entry: severity "
            + " / ".join(str(v) for v in sorted({c["severity"] for c in mine}))
            + "; ΔAUC = AUC - AUC without adaptation; fail: the candidate failed on that cell.",
            "",
            "| shift | lost AUC | AdaBN Δ | ComBat Δ | consensus Δ | hist Δ | CORAL Δ "
            "| auto: choice Δ |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for kind in dict.fromkeys(c["kind"] for c in mine):
            by = [c for c in sorted(mine, key=lambda c: c["severity"]) if c["kind"] == kind]
            lost = " / ".join(f"{c['lost']:+.2f}" for c in by)
            deltas = [
                _deltas(by, name)
                for name in ("adabn", "combat", "consensus", "histogram", "coral")
            ]
            auto = " / ".join(
                f"{SHORT.get(c['choice'], c['choice'])} {c['auc_auto'] - c['auc_none']:+.2f}"
                for c in by
            )
            out.append(f"| `{kind}` | {lost} | " + " | ".join(deltas) + f" | {auto} |")
    return "\n".join(out)


HARMONIZER_CANDIDATES_DOC = {
    "none": "no adaptation",
    "consensus": "consensus (AdaBN + ComBat)",
    "adabn": "AdaBN (`match`)",
    "adabn_recompute": "AdaBN (`recompute`)",
    "histogram": "histogram matching",
    "combat": "ComBat (features)",
    "coral": "CORAL (skada)",
    "subspace_alignment": "subspace alignment (skada)",
}


def merge(args):
    """One result file from runs of the same split over different data sets."""
    import json

    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    splits = {p["config"]["split"] for p in parts}
    if len(splits) != 1:
        raise SystemExit(f"--merge: the runs are of different splits {sorted(splits)!r}")
    split = splits.pop()
    offsets = {p["config"].get("seed_offset", 0) for p in parts}
    if len(offsets) != 1:
        raise SystemExit(f"--merge: the runs have different seed offsets {sorted(offsets)!r}")
    bench = Benchmark(result_name(split, offsets.pop()), issue=16, args=args)
    config = dict(parts[0]["config"])
    config["datasets"] = [d for p in parts for d in p["config"]["datasets"]]
    config["n_eval_max"] = {
        d: p["config"]["n_eval_max"] for p in parts for d in p["config"]["datasets"]
    }
    config["merged_from"] = [str(f) for f in args.merge]
    keep = ("cell", "clean", "failed")
    rows = [r for p in parts for r in p["results"] if r.get("section") in keep]
    seconds = sum(r["seconds"] for p in parts for r in p["results"] if r.get("section") == "total")
    cells = [r for r in rows if r.get("section") == "cell"]
    out = rows + harmonizer_rows(cells) + [{"section": "total", "seconds": seconds}]
    bench.write(
        config=config,
        results=out,
        summary=summarise(out),
        notes=[n for n in parts[0]["notes"]] + ["merged from runs over separate data sets"],
    )
    print(json.dumps(summarise(out), indent=1))


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument(
        "--split",
        choices=["test", "val", "traincv"],
        default="test",
        help="evaluation split: test (reported), val (first development grid) or traincv "
        "(development grid cut from the train split: never touches val or test)",
    )
    ap.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="added to the corruption seeds (a non-zero offset on --split test is a fresh "
        "test grid, results/shift_suite_fresh.json)",
    )
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--kinds", nargs="+", default=None, help="shifts (default: all 2-D)")
    ap.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES))
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=800, help="at most this many train images")
    ap.add_argument(
        "--n-eval",
        type=int,
        default=None,
        help="at most this many evaluation images (default: all for test, 256 for val, "
        "TRAINCV_TARGET held-out train images for traincv)",
    )
    ap.add_argument("--dump", type=Path, default=None, help="save target features per cell")
    ap.add_argument(
        "--save-proba",
        type=Path,
        default=None,
        help="save each candidate's target probabilities per cell (npz) in this folder",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="combine the results of runs over different data sets (e.g. run in parallel) "
        "into one result file, recomputing the summary; runs nothing",
    )
    ap.add_argument(
        "--table",
        type=Path,
        default=None,
        help="print the markdown tables of docs/benchmarks.md from a result file; runs nothing",
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args)
    if args.table:
        return print(markdown_tables(args.table))
    if args.n_eval is None and args.split == "val":
        args.n_eval = 256
    bench = Benchmark(result_name(args.split, args.seed_offset), issue=16, args=args)
    if args.quick:
        args.datasets, args.severities = args.datasets[:1], [3]
        args.kinds = args.kinds or ["blur", "gamma"]
        args.n_train, args.n_eval, args.input_size = 200, 100, 32
    if args.dump is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
    total = Stopwatch()
    rows: list[dict] = []
    config = {
        "split": args.split,
        "seed": SEEDS[args.split] + args.seed_offset,
        "seed_offset": args.seed_offset,
        "datasets": args.datasets,
        "severities": args.severities,
        "input_size": args.input_size,
        "n_train_max": args.n_train,
        "n_eval_max": args.n_eval,
        "candidates": CANDIDATES,
        "probe": "PretrainedCNNFeatures(tf_efficientnet_lite0, intensity='uint8') -> "
        "StandardScaler -> LogisticRegression(C=0.05)",
        "selector": "AutoHarmonizer(random_state=0), default rules",
        "lossy_threshold": LOSSY,
        "data_dir": str(DATA_DIR),
    }

    def write():
        cells = [r for r in rows if r.get("section") == "cell"]
        out = [r for r in rows if r.get("section") != "harmonizer"]
        out += harmonizer_rows(cells) if cells else []
        bench.write(
            config=config,
            results=out,
            summary=summarise(out + [{"section": "total", "seconds": total.seconds}]),
            notes=[
                "target labels are used only to score (auc_*), never by the selector",
                "recovered fractions over the cells that lose more than 0.02 AUC",
                f"evaluation split: {args.split}; corruption seeds derived from "
                f"{SEEDS[args.split] + args.seed_offset}",
            ],
        )

    for dataset in args.datasets:
        if args.split == "traincv":
            splits = load_medmnist_splits(dataset, splits=["train"], missing="skip")
            if splits is None:
                continue
            X_all, y_all = splits["train"]
            n_target = args.n_eval or TRAINCV_TARGET[dataset]
            src, tgt = traincv_split(y_all, n_target, derive_seed(SEEDS["traincv"], dataset))
            X_ev, y_ev = X_all[tgt], y_all[tgt]
            X_tr, y_tr = X_all[src], y_all[src]
        else:
            splits = load_medmnist_splits(dataset, splits=["train", args.split], missing="skip")
            if splits is None:
                continue
            X_tr, y_tr = splits["train"]
            X_ev, y_ev = splits[args.split]
        keep = stratified_subsample(y_tr, args.n_train, derive_seed(0, "train", dataset))
        X_tr, y_tr = X_tr[keep], y_tr[keep]
        if args.split != "traincv" and args.n_eval is not None and args.n_eval < len(y_ev):
            ev = stratified_subsample(y_ev, args.n_eval, derive_seed(0, "eval", dataset))
            X_ev, y_ev = X_ev[ev], y_ev[ev]
        source = make_image_frame(X_tr, sites=["A"] * len(X_tr))
        features, estimator = make_probe(args.input_size)
        clean = make_pipeline(clone(features), clone(estimator)).fit(X_tr, y_tr)
        auc_clean = float(roc_auc_score(y_ev, clean.predict_proba(X_ev)[:, 1]))
        print(
            f"== {dataset}: {len(y_tr)} train, {len(y_ev)} {args.split}, clean AUC "
            f"{auc_clean:.3f}",
            flush=True,
        )
        kinds = args.kinds or shift_kinds(DATASETS[dataset])
        plan = [("clean", 0)] + [(k, s) for k in kinds for s in args.severities]
        for kind, severity in plan:
            seed = derive_seed(SEEDS[args.split] + args.seed_offset, dataset, kind, severity)
            sw = Stopwatch()
            try:
                res = run_cell(
                    dataset, kind, severity, seed, source, y_tr, X_ev, y_ev, args, args.dump
                )
            except Exception as exc:  # report the failing cell and go on
                print(f"{dataset} {kind} {severity}: FAILED {type(exc).__name__}: {exc}")
                rows.append(
                    {
                        "section": "failed",
                        "dataset": dataset,
                        "kind": kind,
                        "severity": severity,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
                write()
                continue
            lost = auc_clean - res["auc_none"]
            row = {
                "section": "cell" if severity else "clean",
                "dataset": dataset,
                "kind": kind,
                "severity": severity,
                "auc_clean": auc_clean,
                "lost": lost,
                **res,
                "recovered_auto": recovered(res["auc_auto"], res["auc_none"], lost),
                "recovered_oracle": recovered(res["auc_oracle"], res["auc_none"], lost),
                "seconds": sw.stop(),
            }
            rows.append(row)
            print_cell(row)
            write()
    rows.append({"section": "total", "seconds": total.stop()})
    write()
    cells = [r for r in rows if r.get("section") == "cell"]
    for h in harmonizer_rows(cells):
        rec = h["mean_recovered_lossy"]
        print(
            f"{h['method']:<20} mean delta {h['mean_delta']:+.3f}  worst {h['worst_delta']:+.3f}"
            f"  worse>0.01 on {h['n_cells_worse_by_0.01']:>3}  better>0.01 on "
            f"{h['n_cells_better_by_0.01']:>3}  recovered "
            + (f"{rec:.2f}" if rec is not None else "n/a")
        )
    print(summarise(rows))


if __name__ == "__main__":
    main()
