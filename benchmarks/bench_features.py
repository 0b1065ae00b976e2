"""Pretrained-CNN features: speed, bf16 accuracy, feature cache and memory.

Data: BreastMNIST (``breastmnist.npz``: 28 x 28 uint8 ultrasound images, benign/normal vs
malignant; train 546, val 78, test 156), resized to 224 px for the embedded
``tf_efficientnet_lite0`` backbone.

Measured:

* **speed** -- images per second of a plain fp32 timm loop (batched torch preprocessing, then
  ``model(x)`` under ``torch.no_grad``, batch 32) against ``PretrainedCNNFeatures()`` with its
  default settings (``precision="auto"``: mixed fp32/bf16 on this CPU; whole ``transform``,
  preprocessing included, cache off), ``precision="fp32"``, ``precision="bf16"`` and
  optionally ``compile=True`` (steady state and compilation time). All are timed
  alternately, best of the repeats, so that the shared CPU affects them alike;
* **linear probe** -- BreastMNIST test AUC of ``StandardScaler + LogisticRegression`` on the
  frozen features (C chosen by 5-fold grid search on train+val with fp32 features, the same C
  for the default and the bf16 features): the default's AUC must agree with fp32's within
  0.005, also over the whole C grid. The published reference is ResNet-18 trained end to end
  at 28 px: 0.901 (MedMNIST v2);
* **cache** -- wall time of ``GridSearchCV`` (5 folds x 10 values of C) over the whole pipeline
  ``PretrainedCNNFeatures -> StandardScaler -> LogisticRegression`` with and without the
  content-keyed feature cache;
* **memory** -- peak resident memory of a fresh process extracting features of n and 16 n
  images (cache off): it must not grow with n beyond the output matrix.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_features.py        # full run (10-30 min, 2 cores)
    python benchmarks/bench_features.py --quick                  # smoke run (~1 min)
    python benchmarks/bench_features.py --sections cache,memory --merge   # redo some parts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA_DIR = Path(os.environ.get("SKRTL_DATA_DIR", HERE.parent.parent / "shared" / "data"))
sys.path.insert(0, str(HERE.parent))


def _load():
    path = DATA_DIR / "breastmnist.npz"
    if not path.is_file():
        sys.exit(f"BreastMNIST not found at {path}; set SKRTL_DATA_DIR.")
    d = np.load(path)
    return {k: d[k] for k in d.files}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------
def bench_speed(X, *, repeats: int, with_compile: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from skrtl._backbone import backbone_data_config, load_backbone
    from skrtl._features import PretrainedCNNFeatures

    model = load_backbone()
    cfg = backbone_data_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def plain():
        outs = []
        with torch.no_grad():
            for i in range(0, len(X), 32):
                x = torch.from_numpy(X[i : i + 32].astype(np.float32) / 255.0)[:, None]
                x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
                x = (x.expand(-1, 3, -1, -1) - mean) / std
                outs.append(model(x))
        return torch.cat(outs).numpy()

    variants = {
        "default": PretrainedCNNFeatures(cache=False).fit(X),
        "fp32": PretrainedCNNFeatures(cache=False, precision="fp32").fit(X),
        "bf16": PretrainedCNNFeatures(cache=False, precision="bf16").fit(X),
    }
    out: dict = {
        "n_images": len(X),
        "input_size": 224,
        "batch_size": 32,
        "default_precision": variants["default"].precision_,
    }
    if with_compile:
        variants["compile"] = PretrainedCNNFeatures(cache=False, compile=True).fit(X)
        t = time.perf_counter()
        variants["compile"].transform(X[:32])
        out["compile_warmup_s"] = round(time.perf_counter() - t, 1)
    for est in variants.values():
        est.transform(X[:8])  # build the inference copies
    runs: dict = {"plain_fp32": [], **{k: [] for k in variants}}
    feats = {}
    plain_feats = None
    for _ in range(repeats):
        t = time.perf_counter()
        plain_feats = plain()
        runs["plain_fp32"].append(len(X) / (time.perf_counter() - t))
        for key, est in variants.items():
            t = time.perf_counter()
            feats[key] = est.transform(X)
            runs[key].append(len(X) / (time.perf_counter() - t))
    for key, vals in runs.items():
        out[f"{key}_img_per_s"] = round(max(vals), 1)
        out[f"{key}_img_per_s_runs"] = [round(v, 1) for v in vals]
    for key in variants:
        out[f"speedup_{key}_vs_plain"] = round(max(runs[key]) / max(runs["plain_fp32"]), 2)
        ratios = [d / p for d, p in zip(runs[key], runs["plain_fp32"])]
        out[f"speedup_{key}_vs_plain_paired_median"] = round(float(np.median(ratios)), 2)
        rel = np.linalg.norm(feats[key] - plain_feats) / np.linalg.norm(plain_feats)
        out[f"{key}_vs_plain_feature_rel_diff"] = float(f"{rel:.2g}")
    return out


# --------------------------------------------------------------------------------------------
def bench_probe(data, *, n_train: int | None, n_test: int | None, input_size: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from skrtl._features import PretrainedCNNFeatures

    Xtr = np.concatenate([data["train_images"], data["val_images"]])
    ytr = np.concatenate([data["train_labels"], data["val_labels"]]).ravel()
    Xte, yte = data["test_images"], data["test_labels"].ravel()
    if n_train:
        Xtr, ytr = Xtr[:n_train], ytr[:n_train]
    if n_test:
        Xte, yte = Xte[:n_test], yte[:n_test]
    Cs = np.logspace(-4, 1, 10)
    out: dict = {"n_train": len(Xtr), "n_test": len(Xte), "input_size": input_size}

    def pipe(precision, C=1.0):
        return make_pipeline(
            PretrainedCNNFeatures(input_size=input_size, precision=precision),
            StandardScaler(),
            LogisticRegression(C=C, max_iter=3000),
        )

    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    t = time.perf_counter()
    grid = GridSearchCV(pipe("fp32"), {"logisticregression__C": Cs}, cv=cv, scoring="roc_auc")
    grid.fit(Xtr, ytr)
    out["fp32_grid_search_s"] = round(time.perf_counter() - t, 1)
    best_c = float(grid.best_params_["logisticregression__C"])
    out["best_C"] = best_c
    out["cv_auc_fp32"] = round(float(grid.best_score_), 4)
    aucs = {"fp32": roc_auc_score(yte, grid.predict_proba(Xte)[:, 1])}
    for name, precision in (("default", None), ("bf16", "bf16")):
        p = pipe(precision or "fp32", C=best_c)
        if precision is None:
            p.set_params(pretrainedcnnfeatures=PretrainedCNNFeatures(input_size=input_size))
        t = time.perf_counter()
        p.fit(Xtr, ytr)
        aucs[name] = roc_auc_score(yte, p.predict_proba(Xte)[:, 1])
        out[f"{name}_precision"] = p[0].precision_
        out[f"{name}_fit_predict_s"] = round(time.perf_counter() - t, 1)
    for name, auc in aucs.items():
        out[f"test_auc_{name}"] = round(float(auc), 4)
    out["abs_auc_diff_default"] = round(abs(aucs["default"] - aucs["fp32"]), 4)
    out["abs_auc_diff_bf16"] = round(abs(aucs["bf16"] - aucs["fp32"]), 4)
    # the same comparison over the whole C grid (is a difference systematic?)
    from sklearn.base import clone

    ests = {
        "fp32": PretrainedCNNFeatures(input_size=input_size, precision="fp32"),
        "default": PretrainedCNNFeatures(input_size=input_size),
        "bf16": PretrainedCNNFeatures(input_size=input_size, precision="bf16"),
    }
    F = {k: (e.fit(Xtr).transform(Xtr), e.transform(Xte)) for k, e in ests.items()}
    for k in ("default", "bf16"):
        rel = np.linalg.norm(F[k][1] - F["fp32"][1]) / np.linalg.norm(F["fp32"][1])
        out[f"{k}_feature_rel_diff"] = round(float(rel), 4)
    diffs: dict = {"default": [], "bf16": []}
    for C in Cs:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
        a = {
            k: roc_auc_score(yte, clone(probe).fit(F[k][0], ytr).predict_proba(F[k][1])[:, 1])
            for k in F
        }
        for k in diffs:
            diffs[k].append(a[k] - a["fp32"])
    for k, d in diffs.items():
        out[f"{k}_minus_fp32_auc_over_C_grid"] = [round(float(v), 4) for v in d]
        out[f"{k}_max_abs_auc_diff_over_C_grid"] = round(float(np.max(np.abs(d))), 4)
    out["published_resnet18_28px_test_auc"] = 0.901
    return out


# --------------------------------------------------------------------------------------------
def bench_cache(X, y, *, input_size: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from skrtl._features import PretrainedCNNFeatures, clear_feature_cache

    grid = {"logisticregression__C": np.logspace(-3, 2, 10)}
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    times = {}
    for cache in (False, True):
        clear_feature_cache()
        pipe = make_pipeline(
            PretrainedCNNFeatures(input_size=input_size, cache=cache),
            StandardScaler(),
            LogisticRegression(max_iter=2000),
        )
        t = time.perf_counter()
        GridSearchCV(pipe, grid, cv=cv, scoring="roc_auc").fit(X, y)
        times[cache] = time.perf_counter() - t
    return {
        "n_images": len(X),
        "input_size": input_size,
        "folds": 5,
        "n_settings": 10,
        "no_cache_s": round(times[False], 1),
        "cache_s": round(times[True], 1),
        "speedup": round(times[False] / times[True], 1),
    }


# --------------------------------------------------------------------------------------------
def _memory_probe(n: int, input_size: int) -> None:
    """Run in a fresh process: extract features of n images, print peak RSS (MiB)."""
    from skrtl._features import PretrainedCNNFeatures

    data = _load()
    X = np.resize(data["train_images"], (n,) + data["train_images"].shape[1:])
    fe = PretrainedCNNFeatures(input_size=input_size, cache=False).fit(X[:8])
    fe.transform(X[: fe.batch_size])  # one full batch: the per-batch working memory
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    F = fe.transform(X)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"n": n, "rss_before_mib": before, "peak_mib": peak, "out_mib": F.nbytes / 2**20}
        )
    )


def bench_memory(ns: list[int], input_size: int) -> dict:
    rows = []
    for n in ns:
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-probe", str(n), "--input-size", str(input_size)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    growth = rows[-1]["peak_mib"] - rows[0]["peak_mib"]
    out_growth = rows[-1]["out_mib"] - rows[0]["out_mib"]
    return {
        "runs": [
            {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in rows
        ],
        "peak_growth_mib": round(growth, 1),
        "output_matrix_growth_mib": round(out_growth, 1),
        "note": "peak RSS of a fresh process (rss_before: after one full batch); the growth "
        "between n and 16n images should be about the output-matrix growth (batches are "
        "streamed, no full-data-set tensor)",
    }


# --------------------------------------------------------------------------------------------
SECTIONS = ("speed", "probe", "cache", "memory")


def _summary(results: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    sp, pr = results.get("speed"), results.get("probe")
    ca, me = results.get("cache"), results.get("memory")
    if sp:
        rows += [
            ("plain fp32 timm loop (img/s)", sp["plain_fp32_img_per_s"]),
            (f"defaults, {sp['default_precision']} (img/s)", sp["default_img_per_s"]),
            ("speed-up defaults / plain", sp["speedup_default_vs_plain"]),
            ("precision='fp32' (img/s)", sp["fp32_img_per_s"]),
            ("speed-up fp32 / plain", sp["speedup_fp32_vs_plain"]),
            ("precision='bf16' (img/s)", sp["bf16_img_per_s"]),
            ("speed-up bf16 / plain", sp["speedup_bf16_vs_plain"]),
        ]
        if "compile_img_per_s" in sp:
            rows.append(("compile=True (img/s)", sp["compile_img_per_s"]))
    if pr:
        rows += [
            ("test AUC plain fp32 (C by CV)", pr["test_auc_fp32"]),
            ("test AUC defaults", pr["test_auc_default"]),
            ("test AUC bf16", pr["test_auc_bf16"]),
            ("|AUC diff| defaults", pr["abs_auc_diff_default"]),
            ("|AUC diff| bf16", pr["abs_auc_diff_bf16"]),
            ("max |AUC diff| defaults over 10 C", pr["default_max_abs_auc_diff_over_C_grid"]),
            ("max |AUC diff| bf16 over 10 C", pr["bf16_max_abs_auc_diff_over_C_grid"]),
        ]
    if ca:
        rows += [
            (f"GridSearchCV 5x10, {ca['n_images']} images, no cache (s)", ca["no_cache_s"]),
            ("GridSearchCV 5x10, cache (s)", ca["cache_s"]),
            ("cache speed-up", ca["speedup"]),
        ]
    if me:
        rows += [
            ("peak RSS growth n->16n (MiB)", me["peak_growth_mib"]),
            ("output matrix growth (MiB)", me["output_matrix_growth_mib"]),
        ]
    return rows


def _targets(results: dict) -> dict:
    t = {}
    if "speed" in results:
        t["speedup_default_vs_plain>=6"] = results["speed"]["speedup_default_vs_plain"] >= 6
    if "probe" in results:
        t["abs_auc_diff_default<0.005"] = results["probe"]["abs_auc_diff_default"] < 0.005
        t["abs_auc_diff_bf16<0.005"] = results["probe"]["abs_auc_diff_bf16"] < 0.005
    if "cache" in results:
        t["cache_speedup>=20"] = results["cache"]["speedup"] >= 20
    return t


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile timing")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--merge", action="store_true", help="update the sections of an existing --out file"
    )
    parser.add_argument("--n-cache", type=int, default=None, help="images in the cache run")
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--input-size", type=int, default=224, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "features.json")
    args = parser.parse_args(argv)
    if args.quick and args.out == RESULTS / "features.json":  # keep the full results
        args.out = RESULTS / "quick" / "features.json"
    if args.memory_probe is not None:
        _memory_probe(args.memory_probe, args.input_size)
        return {}
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    import torch

    data = _load()
    quick = args.quick
    results: dict = {}
    if args.merge and args.out.is_file():
        results = json.loads(args.out.read_text())
    results.update(
        {
            "benchmark": "features",
            "quick": quick,
            "machine": (
                f"{platform.processor() or platform.machine()}, torch threads={_threads()}, "
                "2-core CPU (all variants timed alternately in one run: the ratios are the "
                "meaningful numbers)"
            ),
            "torch": torch.__version__,
        }
    )

    def save():
        results["targets"] = _targets(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    if "speed" in sections:
        print("== speed ==", flush=True)
        Xs = data["train_images"][: 32 if quick else 128]
        results["speed"] = bench_speed(
            Xs, repeats=2 if quick else 3, with_compile=not (quick or args.no_compile)
        )
        print(json.dumps(results["speed"], indent=1), flush=True)
        save()
    if "probe" in sections:
        print("== linear probe (fp32 vs default precision) ==", flush=True)
        if quick:
            results["probe"] = bench_probe(data, n_train=120, n_test=60, input_size=64)
        else:
            results["probe"] = bench_probe(data, n_train=None, n_test=None, input_size=224)
        print(json.dumps(results["probe"], indent=1), flush=True)
        save()
    if "cache" in sections:
        print("== feature cache in GridSearchCV ==", flush=True)
        n_cache = args.n_cache or (30 if quick else 64)
        Xc = data["train_images"][:n_cache]
        yc = data["train_labels"].ravel()[:n_cache]
        results["cache"] = bench_cache(Xc, yc, input_size=64 if quick else 224)
        print(json.dumps(results["cache"], indent=1), flush=True)
        save()
    if "memory" in sections:
        print("== peak memory ==", flush=True)
        ns = [16, 256] if quick else [32, 512]
        results["memory"] = bench_memory(ns, 64 if quick else 224)
        print(json.dumps(results["memory"], indent=1), flush=True)
        save()

    print("\n| metric | value |\n|---|---|")
    for name, val in _summary(results):
        print(f"| {name} | {val} |")
    print(f"targets: {results['targets']}")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
