"""Harmonization against a simulated scanner shift on real ultrasound images (BreastMNIST).

Site A is BreastMNIST as published: the linear probe (frozen ImageNet ``tf_efficientnet_lite0``
features -> standardise -> logistic regression) is trained on the train split and tested on the
test split. Site B is the *same* test split seen through another "scanner": Gaussian blur,
a non-linear intensity remap (gamma, gain, offset) and additive Gaussian noise, at two
severities (``SHIFTS``: "mild", "strong"), the noise redrawn for each of ``--seeds`` seeds.
Because the images and labels are identical, every AUC point lost on site B is due to the
covariate shift.

Methods, all fitted on site A train (with the unlabelled site B images where stated):

* ``site A``               the probe on the untouched test split (reference);
* ``site B unadapted``     the same probe on site B;
* ``AdaBN``                :class:`skrtl.AdaBN` around the feature transformer, default
  ``source_stats="match"``: the ImageNet statistics are kept for site A; for the site B rows
  every BatchNorm layer gets the statistics, estimated on the unlabelled site B images, under
  which site B's outputs have the moments site A's have (source-anchored AdaBN);
* ``AdaBN (recompute)``    classic AdaBN (Li et al. 2016): statistics re-estimated on site A
  train for the source rows and on site B for the site B rows;
* ``hist. matching``       :class:`skrtl.HistogramMatcher` (per image, reference
  quantiles of site A train) in front of the probe;
* ``hist. + AdaBN``        both (AdaBN adapted on the histogram-matched site B images);
* ``ComBat (features)``    :class:`skrtl.ComBatHarmonizer` on the CNN features, fitted on
  site A train + unlabelled site B features.

Reported: AUC per method (mean and sd over seeds) and the fraction of the lost AUC recovered,
``(AUC_method - AUC_B) / (AUC_A - AUC_B)``; goal: at least 0.5 for AdaBN / hist. / both.
Also the maximum absolute difference between ``ComBatHarmonizer`` and the ``neuroCombat``
package on the same features (when ``neuroCombat`` is installed).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_harmonize.py   # full run
    python benchmarks/bench_harmonize.py --quick             # smoke run

Results: ``results/harmonize.json`` (schema in ``_common.py``): rows of ``section`` "auc" (one
per shift and method), "shift", "combat_vs_neurocombat", "seconds_per_seed" and "total".
"""

from __future__ import annotations

import contextlib
import io
import sys

import numpy as np
from _common import (
    Benchmark,
    Stopwatch,
    bench_parser,
    flat_summary,
    load_medmnist_splits,
    package_version,
)
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl import (
    AdaBN,
    ComBatHarmonizer,
    HistogramMatcher,
    PretrainedCNNFeatures,
    make_image_frame,
)

METHODS = [
    "site A",
    "site B unadapted",
    "AdaBN",
    "AdaBN (recompute)",
    "hist. matching",
    "hist. + AdaBN",
    "ComBat (features)",
]


def simulate_site_b(images, *, seed, blur, noise, gamma, gain, offset):
    """Another scanner: blur, monotone non-linear intensity remap, additive noise (0-255)."""
    rng = np.random.default_rng(seed)
    x = images.astype(np.float32)
    x = ndimage.gaussian_filter(x, sigma=(0.0, blur, blur), mode="nearest")
    x = 255.0 * gain * (x / 255.0) ** gamma + offset
    x = x + rng.normal(0.0, noise, x.shape).astype(np.float32)
    return np.clip(x, 0.0, 255.0).astype(np.float32)


def _features(**kw):
    return PretrainedCNNFeatures(intensity="uint8", **kw)


def probe(step):
    return make_pipeline(step, StandardScaler(), LogisticRegression(C=0.05, max_iter=5000))


def auc(model, X, y):
    return float(roc_auc_score(y, model.predict_proba(X)[:, 1]))


def combat_vs_neurocombat(F, sites):
    """Max |ComBatHarmonizer - neuroCombat| over non-constant features, or None."""
    try:
        import neuroCombat
    except ImportError:
        return None
    import pandas as pd

    # features constant within a site (ReLU6 at 0 or 6 for every image of a site) are left
    # out: there neuroCombat's site variance is 0 or ~1e-32 depending on float rounding, and
    # it treats only an exact 0 as constant, so either result is arbitrary
    sites = np.asarray(sites)
    tol = 1e-6 * (np.abs(F).max() + 1e-12)
    keep = np.all([F[sites == s].std(axis=0) > tol for s in np.unique(sites)], axis=0)
    F = F[:, keep].astype(np.float64)
    covars = pd.DataFrame({"batch": np.asarray(sites)})
    with contextlib.redirect_stdout(io.StringIO()):
        ref = neuroCombat.neuroCombat(F.T.copy(), covars, "batch")["data"].T
    ours = ComBatHarmonizer().fit_transform(F, sample_domain=np.asarray(sites))
    return {
        "max_abs_diff": float(np.abs(ours - ref).max()),
        "n_samples": int(F.shape[0]),
        "n_features": int(F.shape[1]),
        "n_features_left_out_constant_within_a_site": int((~keep).sum()),
        "feature_scale": float(np.abs(F).max()),
        "neuroCombat_version": package_version("neuroCombat"),
    }


def run_seed(seed, data, shift, args, cache):
    Xa_tr, ya_tr, Xa_te, y_te = data
    Xb = simulate_site_b(Xa_te, seed=seed, **shift)
    fa_tr = make_image_frame(Xa_tr, sites=["A"] * len(Xa_tr))
    fa_te = make_image_frame(Xa_te, sites=["A"] * len(Xa_te))
    fb = make_image_frame(Xb, sites=["B"] * len(Xb))
    fb_as_a = fb.assign(site="A")  # site B images, routed to the source statistics
    fe_kw = {"input_size": args.input_size, "batch_size": 64, "precision": "fp32"}
    res, times = {}, {}

    with Stopwatch() as sw:
        if "plain" not in cache:  # the unadapted probe does not depend on the seed
            cache["plain"] = probe(_features(**fe_kw)).fit(Xa_tr, ya_tr)
        plain = cache["plain"]
        res["site A"] = auc(plain, Xa_te, y_te)
        res["site B unadapted"] = auc(plain, Xb, y_te)
    times["unadapted"] = sw.seconds

    with Stopwatch() as sw:
        ada = probe(AdaBN(_features(**fe_kw))).fit(fa_tr, ya_tr, adabn__X_target=fb)
        res["AdaBN"] = auc(ada, fb, y_te)
        res["AdaBN, site A test"] = auc(ada, fa_te, y_te)
        res["AdaBN, site B routed to A"] = auc(ada, fb_as_a, y_te)
    times["AdaBN"] = sw.seconds

    with Stopwatch() as sw:
        rec = probe(AdaBN(_features(**fe_kw), source_stats="recompute"))
        rec.fit(fa_tr, ya_tr, adabn__X_target=fb)
        res["AdaBN (recompute)"] = auc(rec, fb, y_te)
        res["AdaBN (recompute), site A test"] = auc(rec, fa_te, y_te)
    times["AdaBN (recompute)"] = sw.seconds

    with Stopwatch() as sw:
        hm = make_pipeline(
            HistogramMatcher(),
            _features(**fe_kw),
            StandardScaler(),
            LogisticRegression(C=0.05, max_iter=5000),
        ).fit(Xa_tr, ya_tr)
        res["hist. matching"] = auc(hm, Xb, y_te)
        res["hist. matching, site A test"] = auc(hm, Xa_te, y_te)
    times["hist. matching"] = sw.seconds

    with Stopwatch() as sw:
        matcher = HistogramMatcher().fit(fa_tr)  # same reference as inside the pipeline
        fb_matched = matcher.transform(fb)
        both = make_pipeline(
            HistogramMatcher(),
            AdaBN(_features(**fe_kw)),
            StandardScaler(),
            LogisticRegression(C=0.05, max_iter=5000),
        )
        both.fit(fa_tr, ya_tr, adabn__X_target=fb_matched)
        res["hist. + AdaBN"] = auc(both, fb, y_te)
    times["hist. + AdaBN"] = sw.seconds

    with Stopwatch() as sw:
        fe = plain[0]
        Fa, Fb = fe.transform(Xa_tr), fe.transform(Xb)
        sites = np.array(["A"] * len(Fa) + ["B"] * len(Fb))
        cb = ComBatHarmonizer().fit(np.vstack([Fa, Fb]), sample_domain=sites)
        lr = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=5000))
        lr.fit(cb.transform(Fa, sample_domain=sites[: len(Fa)]), ya_tr)
        Hb = cb.transform(Fb, sample_domain=sites[len(Fa) :])
        res["ComBat (features)"] = float(roc_auc_score(y_te, lr.predict_proba(Hb)[:, 1]))
    times["ComBat (features)"] = sw.seconds
    if "combat_check" not in cache:
        Fte = fe.transform(Xa_te)
        cache["combat_check"] = combat_vs_neurocombat(
            np.vstack([Fte, Fb]), ["A"] * len(Fte) + ["B"] * len(Fb)
        )
    return res, times


SHIFTS = {
    "mild": {"blur": 0.5, "noise": 6.0, "gamma": 0.8, "gain": 0.9, "offset": 20.0},
    "strong": {"blur": 1.0, "noise": 12.0, "gamma": 0.6, "gain": 0.8, "offset": 30.0},
}


def aggregate(per_seed):
    keys = list(per_seed[0])
    mean = {k: float(np.mean([r[k] for r in per_seed])) for k in keys}
    sd = {k: float(np.std([r[k] for r in per_seed])) for k in keys}
    a, b = mean["site A"], mean["site B unadapted"]
    lost = a - b
    recovered = {k: (float((mean[k] - b) / lost) if lost > 0 else None) for k in METHODS[2:]}
    return mean, sd, lost, recovered


def print_table(name, shift, mean, sd, recovered):
    print(f"\n== shift {name!r}: {shift}")
    print(f"{'method':<24} {'AUC':>7} {'sd':>6} {'recovered':>10}")
    for k in METHODS:
        rec = recovered.get(k)
        rec_s = f"{rec:>10.2f}" if rec is not None else f"{'':>10}"
        print(f"{k:<24} {mean[k]:>7.3f} {sd[k]:>6.3f} {rec_s}")
    for k in mean:
        if k not in METHODS:
            print(f"  ({k}: {mean[k]:.3f})")


REMAP = "255*gain*(x/255)**gamma + offset, then noise"


def summarise(rows) -> dict:
    """The result's ``summary``: AUC and recovered fraction per shift and method."""
    metrics = ["auc_mean", "fraction_of_lost_auc_recovered", "goal_recover_half"]
    summary = flat_summary(rows, section="auc", keys=["shift", "method"], metrics=metrics)
    summary.update(flat_summary(rows, section="shift", keys=["shift"], metrics=["auc_lost"]))
    for section, metric in (("combat_vs_neurocombat", "max_abs_diff"), ("total", "seconds")):
        summary.update(flat_summary(rows, section=section, keys=["section"], metrics=[metric]))
    return summary


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--seeds", type=int, default=2, help="noise seeds per shift")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    args = ap.parse_args(argv)
    bench = Benchmark("harmonize", issue=4, args=args)
    splits = load_medmnist_splits("breastmnist", splits=["train", "test"])
    Xa_tr, ya_tr = splits["train"]
    Xa_te, y_te = splits["test"]
    if args.quick:
        args.seeds, args.input_size, args.shifts = 1, 64, ["strong"]
        rng = np.random.default_rng(0)
        tr = rng.choice(len(Xa_tr), 200, replace=False)
        Xa_tr, ya_tr = Xa_tr[tr], ya_tr[tr]
    data = (Xa_tr, ya_tr, Xa_te, y_te)
    total = Stopwatch()
    cache: dict = {}
    rows, per_time, tables = [], [], {}
    for name in args.shifts:
        per_seed = []
        for seed in range(args.seeds):
            res, times = run_seed(seed, data, SHIFTS[name], args, cache)
            per_seed.append(res)
            per_time.append(times)
            line = ", ".join(f"{k}={v:.3f}" for k, v in res.items())
            print(f"{name} seed {seed}: {line}", flush=True)
        mean, sd, lost, recovered = aggregate(per_seed)
        tables[name] = mean, sd, recovered
        for k in mean:
            row = {"section": "auc", "shift": name, "method": k}
            row.update(auc_mean=mean[k], auc_sd=sd[k])
            if k in recovered:
                row["fraction_of_lost_auc_recovered"] = recovered[k]
            if k in METHODS[2:6]:
                row["goal_recover_half"] = recovered[k] is not None and recovered[k] >= 0.5
            rows.append(row)
        rows.append({"section": "shift", "shift": name, "auc_lost": lost})
    for name, (mean, sd, recovered) in tables.items():
        print_table(name, SHIFTS[name], mean, sd, recovered)
    check = cache.get("combat_check")
    if check is not None:
        print(
            f"\nComBat vs neuroCombat {check['neuroCombat_version']}: max |diff| = "
            f"{check['max_abs_diff']:.2e} on {check['n_samples']} x {check['n_features']} "
            f"CNN features (scale {check['feature_scale']:.2f})"
        )
        rows.append({"section": "combat_vs_neurocombat", **check})
    else:
        print("\nneuroCombat not installed: ComBat cross-check skipped")
    for step in per_time[0]:
        seconds = float(np.mean([t[step] for t in per_time]))
        rows.append({"section": "seconds_per_seed", "step": step, "seconds": seconds})
    rows.append({"section": "total", "seconds": total.stop()})
    config = {
        "data": "BreastMNIST (MedMNIST v2, 28x28 ultrasound): site A = published train/test "
        "splits; site B = the test split blurred + intensity-remapped + noisy",
        "n_train": int(len(Xa_tr)),
        "n_test": int(len(Xa_te)),
        "probe": "PretrainedCNNFeatures(tf_efficientnet_lite0, ImageNet, input_size="
        f"{args.input_size}, intensity='uint8', precision='fp32') -> StandardScaler -> "
        "LogisticRegression(C=0.05)",
        "input_size": args.input_size,
        "seeds_per_shift": args.seeds,
        "shifts": {name: dict(SHIFTS[name], remap=REMAP) for name in args.shifts},
    }
    bench.write(config=config, results=rows, summary=summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
