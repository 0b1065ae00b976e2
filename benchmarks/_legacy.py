"""Read result files written before the shared harness (``_common.py``), in its schema.

The benchmark scripts wrote four different JSON shapes before they shared a harness. The files
in ``results/`` that hold those measurements are kept as they were written; this module
converts them on read (``_common.read_result``) so that ``run_all.py`` summarises every file
the same way. Every measured number of an old file is kept: values are moved, never
recomputed or rounded; the ``summary`` is then built by the benchmark's own ``summarise``.

Delete a converter here once its benchmark has been re-run with the harness (and this module
once ``results/`` holds no old file).
"""

from __future__ import annotations

import importlib

ISSUES = {
    "features": 3,
    "harmonize": 4,
    "finetune": 5,
    "label_shift": 6,
    "search": 7,
    "fusion": 9,
}


def _name(old: dict, stem: str) -> str:
    name = str(old.get("benchmark", stem))
    if name == "bench_search":
        return "search"
    if name.startswith("FineTuneClassifier"):
        return "finetune"
    return name if name in ISSUES else stem


def _summarise(name: str, rows: list[dict]) -> dict:
    return importlib.import_module(f"bench_{name}").summarise(rows)


def _features(old: dict) -> dict:
    sections = [s for s in ("speed", "probe", "cache", "memory") if s in old]
    return {
        "machine": {"description": old.get("machine"), "versions": {"torch": old.get("torch")}},
        "config": {"data": "breastmnist.npz", "sections": sections},
        "results": [{"section": s, **old[s]} for s in sections],
        "notes": list(old.get("notes", [])),
    }


def _finetune(old: dict) -> dict:
    rows = [{"section": "accuracy", **r} for r in old["results"]]
    rows += [{"section": "epoch_timing", **r} for r in old.get("epoch_timing", [])]
    return {
        "machine": {"description": old.get("machine")},
        "config": {
            "data": old["benchmark"].removeprefix("FineTuneClassifier on ").strip(),
            "defaults": old.get("defaults"),
            "published": old.get("published"),
        },
        "results": rows,
        "notes": [f"goal: {old['goal']}", f"epoch_timing: {old['epoch_timing_note']}"],
    }


def _fusion(old: dict) -> dict:
    timings = old.get("timings", {})
    rows = [{"section": "extraction", "features": "deep", "seconds": timings["deep_extraction_s"]}]
    for mask, info in old.get("radiomics", {}).items():
        seconds = timings[f"radiomics_{mask}_extraction_s"]
        rows.append(
            {"section": "extraction", "features": f"radiomics-{mask}", "seconds": seconds, **info}
        )
    rows += [{"section": "feature_set", "features": k, **r} for k, r in old["results"].items()]
    rows += [
        {"section": "paired_bootstrap", "comparison": k, **v}
        for k, v in old["paired_bootstrap_test_auc"].items()
    ]
    rows.append({"section": "total", "seconds": old["seconds"]})
    keys = ("data", "seed", "n_train", "n_test", "deep_features", "reference_test_auc")
    return {
        "machine": {"description": old.get("hardware")},
        "config": {k: old[k] for k in keys if k in old},
        "results": rows,
        "notes": [],
    }


def _harmonize(old: dict) -> dict:
    rows = []
    for shift, r in old["results"].items():
        recovered, goal = r["fraction_of_lost_auc_recovered"], r["goal_recover_half"]
        for method, auc in r["auc_mean"].items():
            row = {"section": "auc", "shift": shift, "method": method}
            row.update(auc_mean=auc, auc_sd=r["auc_sd"][method])
            if method in recovered:
                row["fraction_of_lost_auc_recovered"] = recovered[method]
            if method in goal:
                row["goal_recover_half"] = goal[method]
            rows.append(row)
        rows.append({"section": "shift", "shift": shift, "auc_lost": r["auc_lost"]})
    if old.get("combat_vs_neurocombat") is not None:
        rows.append({"section": "combat_vs_neurocombat", **old["combat_vs_neurocombat"]})
    rows += [
        {"section": "seconds_per_seed", "step": k, "seconds": v}
        for k, v in old.get("seconds_per_seed", {}).items()
    ]
    rows.append({"section": "total", "seconds": old["seconds_total"]})
    keys = ("data", "n_train", "n_test", "probe", "seeds_per_shift")
    config = {k: old[k] for k in keys if k in old}
    config["shifts"] = {shift: r["shift"] for shift, r in old["results"].items()}
    return {
        "machine": {"description": old.get("hardware")},
        "config": config,
        "results": rows,
        "notes": [],
    }


def _label_shift(old: dict) -> dict:
    rows = []
    for dataset, d in old["details"].items():
        rows += [
            {"section": "method", "dataset": dataset, "method": m, **s}
            for m, s in d["summary"].items()
        ]
        rows.append({"section": "dataset", "dataset": dataset, **d["info"]})
    rows.append({"section": "total", "seconds": old["seconds"]})
    return {
        "machine": {"description": old.get("hardware")},
        "config": {"datasets": list(old["details"]), "seed": old.get("seed")},
        "results": rows,
        "notes": [],
    }


def _search(old: dict) -> dict:
    config_keys = (
        "data",
        "estimator",
        "space",
        "cv",
        "scoring",
        "pruner",
        "n_trials_requested",
        "reference_test_auc",
    )
    meta = ("benchmark", "machine", "quick", "trials", "load_average_1min_start_end")
    outcome = {k: v for k, v in old.items() if k not in config_keys + meta}
    rows = [{"section": "search", **outcome}]
    rows += [{"section": "trial", **t} for t in old["trials"]]
    start, end = old.get("load_average_1min_start_end", [None, None])
    return {
        "machine": {
            "description": old.get("machine"),
            "load_average_1min_start": start,
            "load_average_1min_end": end,
        },
        "config": {k: old[k] for k in config_keys if k in old},
        "results": rows,
        "notes": [],
    }


def _flatten(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, dict):
        for key, val in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), val, out)
    elif isinstance(obj, bool | int | float):
        out[prefix] = obj


def _unknown(old: dict) -> dict:
    summary: dict = {}
    _flatten("", old.get("summary", old), summary)
    return {
        "machine": {},
        "config": {},
        "results": [],
        "summary": summary,
        "notes": ["old result of unknown shape: summary = its numbers, flattened"],
    }


CONVERTERS = {
    "features": _features,
    "finetune": _finetune,
    "fusion": _fusion,
    "harmonize": _harmonize,
    "label_shift": _label_shift,
    "search": _search,
}


def upgrade(old: dict, stem: str) -> dict:
    """Convert a result written before the harness (file stem ``stem``) to its schema."""
    name = _name(old, stem)
    convert = CONVERTERS.get(name, _unknown)
    new = convert(old)
    if "summary" not in new:
        new["summary"] = _summarise(name, new["results"])
    return {
        "benchmark": name,
        "issue": ISSUES.get(name),
        "profile": "quick" if old.get("quick") else "full",
        "machine": new["machine"],
        "config": new["config"],
        "results": new["results"],
        "summary": new["summary"],
        "notes": new["notes"] + ["converted on read from the format used before the harness"],
    }
