"""``skrtl demo``: a whole multi-site study, offline, from image files (or a MedMNIST file).

Data: by default the lesion phantom (sites A + B = source, site C = another scanner, site D =
the scanner of A with a lower prevalence), **written to disk** as NIfTI images and masks with
a cohort CSV (``<output>/cohort/cohort.csv``) and read back with :func:`skrtl.read_cohort`, so
that the study runs on files exactly as it would on a user's cohort; or ``cohort=`` a user's
cohort CSV with a binary ``target`` column (optional site and survival columns); or a
MedMNIST file with a simulated second site.

Steps: deep features of the embedded backbone, shift diagnostics, harmonization (none /
histogram matching / ComBat / AdaBN), linear probe vs fine-tuning, label-shift adaptation,
Cox model on deep features. Steps that need what a cohort lacks (a second site, survival
columns) are skipped with a note. Saliency maps (:func:`skrtl.explain`) of a few images per
site show where the fine-tuned network and the linear probe look. Writes ``report.md``, PNG
plots and ``report.html`` (one self-contained page: figures embedded, tables, shift
diagnostics, timings) into ``output_dir`` and returns the results table.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["run_demo"]

_SOURCE_SITES = ("A", "B")
_TARGET_SITE = "C"
_LABEL_SITE = "D"


class _Study:
    """Collects results rows, notes and figures; prints progress."""

    def __init__(self, output_dir: Path, verbose: int):
        self.output_dir = output_dir
        self.verbose = verbose
        self.rows: list[dict] = []
        self.notes: list[str] = []
        # report sections: {"key", "title", "table" (DataFrame or None), "text" (paragraphs)}
        self.sections: list[dict] = []
        self.figures: list[tuple[str, str, str | None]] = []  # (file, caption, section key)
        self.timings: list[tuple[str, float, bool]] = []  # (step, seconds, finished)
        self.start = time.perf_counter()

    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[skrtl demo {time.perf_counter() - self.start:6.1f}s] {msg}", flush=True)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.log(f"note: {msg}")

    def add(self, step, method, metric, source=np.nan, target=np.nan, seconds=np.nan, note=""):
        self.rows.append(
            {
                "step": step,
                "method": method,
                "metric": metric,
                "source": source,
                "target": target,
                "seconds": seconds,
                "note": note,
            }
        )

    def savefig(self, fig, name: str, caption: str, section: str | None = None) -> None:
        import matplotlib.pyplot as plt

        fig.savefig(self.output_dir / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        self.figures.append((name, caption, section))

    def section(self, key: str, title: str, table=None, text: str = "") -> None:
        self.sections.append({"key": key, "title": title, "table": table, "text": text})

    def run(self, title: str, func, *args, **kwargs):
        """Run a step; on error record it and go on (the demo always finishes)."""
        self.log(title)
        t0 = time.perf_counter()
        ok = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = func(*args, **kwargs)
                ok = True
                return out
            except Exception as exc:  # a demo step must never abort the report
                self.note(f"step '{title}' failed: {type(exc).__name__}: {exc}")
                if self.verbose > 1:
                    traceback.print_exc()
                return None
            finally:
                self.timings.append((title, time.perf_counter() - t0, ok))
                seen = set()
                for w in caught:
                    msg = f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
                    if msg not in seen and not issubclass(w.category, DeprecationWarning):
                        seen.add(msg)
                        self.note(f"warning in '{title}': {msg}")
                self.log(f"{title}: done in {time.perf_counter() - t0:.1f}s")


# float32 features: the example output in docs/demo.md is the same on every CPU (the default
# precision="auto" uses bfloat16 after the first layers only where the CPU supports it)
_PRECISION = "fp32"


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _phantom_data(n_samples, quick, random_state):
    from .datasets import default_site_params, make_lesion_phantom

    n = min(n_samples, 200) if quick else n_samples
    params = default_site_params(3)
    params.append(dict(params[0]))  # site D: scanner of site A, screening prevalence
    data = make_lesion_phantom(
        n,
        image_size=48 if quick else 64,
        n_sites=4,
        site_params=params,
        prevalence=[0.5, 0.5, 0.5, 0.15],
        random_state=random_state,
    )
    sites = data.sites
    rng = np.random.default_rng(random_state)
    src = np.flatnonzero(np.isin(sites, _SOURCE_SITES))
    # stratified 70 / 30 split of the source sites into train and held-out test
    test_mask = np.zeros(len(sites), dtype=bool)
    for c in (0, 1):
        rows = rng.permutation(src[data.target[src] == c])
        test_mask[rows[: int(round(0.3 * len(rows)))]] = True
    train = np.setdiff1d(src, np.flatnonzero(test_mask))
    return {
        "name": "lesion phantom",
        "frame": data.frame,
        "y": data.target,
        "survival": data.survival,
        "risk": data.risk,
        "train": train,
        "test": np.flatnonzero(test_mask),
        "target": np.flatnonzero(sites == _TARGET_SITE),
        "label_target": np.flatnonzero(sites == _LABEL_SITE),
        # site D is compared with the training images of site A (same scanner)
        "label_source": np.intersect1d(train, np.flatnonzero(sites == "A")),
        "label_source_name": "site A",
        "target_name": f"site {_TARGET_SITE} (other scanner)",
        "label_target_name": f"site {_LABEL_SITE} (scanner of A, prevalence 0.15)",
        "description": (
            data.description + " Source: sites A and B (70 % train, 30 % held out); "
            "covariate-shift target: site C (another scanner); label-shift target: site D "
            "(scanner of site A, prevalence 0.15 instead of 0.5)."
        ),
        "site_params": data.site_params,
    }


def _write_phantom_cohort(d: dict, folder: Path) -> Path:
    """Write the phantom as NIfTI images + masks and a cohort CSV; return the CSV path."""
    import SimpleITK as sitk

    frame = d["frame"]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    surv = d["survival"]
    rows = []
    for i in range(len(frame)):
        case = f"P{i:04d}"
        spacing = tuple(float(v) for v in frame["spacing"].iat[i])
        img = sitk.GetImageFromArray(np.asarray(frame["image"].iat[i], dtype=np.float32))
        img.SetSpacing(spacing[::-1])  # SimpleITK: (x, y)
        msk = sitk.GetImageFromArray(np.asarray(frame["mask"].iat[i], dtype=np.uint8))
        msk.CopyInformation(img)
        sitk.WriteImage(img, str(folder / "images" / f"{case}.nii.gz"))
        sitk.WriteImage(msk, str(folder / "masks" / f"{case}.nii.gz"))
        rows.append(
            {
                "id": case,
                "image": f"images/{case}.nii.gz",
                "mask": f"masks/{case}.nii.gz",
                "site": frame["site"].iat[i],
                "malignant": int(d["y"][i]),
                "time": float(surv["time"][i]),
                "event": int(surv["event"][i]),
            }
        )
    csv = folder / "cohort.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def _phantom_files(output: Path, n_samples, quick, random_state) -> dict:
    """The phantom study, its images read back from the NIfTI files of its cohort CSV."""
    from ._cohort import read_cohort

    d = _phantom_data(n_samples, quick, random_state)
    csv = _write_phantom_cohort(d, output / "cohort")
    cohort = read_cohort(csv, id="id")
    d["frame"] = cohort.drop(columns=["malignant", "time", "event"])
    d["cohort_csv"] = csv
    d["description"] += (
        f" The cohort is written to disk ({len(cohort)} NIfTI images and masks, "
        f"cohort table {csv.name}) and every step reads the images from those files."
    )
    return d


def _cohort_data(
    path,
    *,
    target,
    site_column,
    id_column,
    image_column,
    mask_column,
    label,
    time_column,
    event_column,
    target_site,
    mode,
    crop,
    random_state,
    study,
) -> dict:
    """A user's cohort CSV: the files, a binary target, optional site and survival columns."""
    from ._cohort import read_cohort
    from ._cropper import LesionCropper
    from ._imaging import first_case_layout
    from ._survival import make_survival_target

    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_file():
        raise FileNotFoundError(f"cohort table {os.fspath(path)!r} does not exist.")
    table = pd.read_csv(p, sep="\t" if p.suffix.lower() in (".tsv", ".tab") else ",")
    if target is None:
        raise ValueError(
            f"--cohort needs --target COLUMN: the binary label column (columns: "
            f"{list(table.columns)!r})."
        )
    if target not in table.columns:
        raise ValueError(
            f"target={target!r} is not a column of {p.name}; columns: {list(table.columns)!r}."
        )
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    has_site = site_column is not None and site_column in table.columns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cohort = read_cohort(
            table,
            image=image_column,
            mask=mask_column,
            label=label,
            site=site_column if has_site else None,
            id=id_column,
            base_dir=p.resolve().parent,
            errors="drop",
        )
    for w in caught:
        study.note(str(w.message).splitlines()[0])
    keep = cohort[target].notna().to_numpy()
    if not keep.all():
        study.note(f"{int((~keep).sum())} cases without a {target!r} value are left out.")
        cohort = cohort.iloc[np.flatnonzero(keep)]
    values = cohort[target].to_numpy()
    classes = sorted(set(values.tolist()), key=str)
    if len(classes) != 2:
        raise ValueError(
            f"target={target!r} must be binary (two classes); it has {len(classes)}: "
            f"{classes[:10]!r}."
        )
    y = (values == classes[1]).astype(int)
    survival = None
    if time_column in cohort.columns and event_column in cohort.columns:
        t, e = cohort[time_column], cohort[event_column]
        if t.notna().all() and e.notna().all():
            survival = make_survival_target(e.to_numpy().astype(bool), t.to_numpy(float))
        else:
            study.note(f"survival columns {time_column!r} / {event_column!r} have missing values; "
                       "the survival step is skipped.")  # fmt: skip
    drop = [c for c in (target, time_column, event_column) if c in cohort.columns]
    frame = cohort.drop(columns=drop)
    volume = first_case_layout(frame) == "zyx"
    if mode == "auto":
        mode = "2.5d" if volume else "2d"
    if crop is not None and "mask" in frame.columns:
        cropper = LesionCropper(mode="2d" if (volume and mode == "2d") else "3d", **crop)
        study.log(f"lesion crops of {len(frame)} cases ({cropper!r})")
        frame = cropper.fit_transform(frame)
    elif volume and mode == "2d":
        raise ValueError("mode='2d' on volumes needs masks and the lesion crop (drop --no-crop).")
    rng = np.random.default_rng(random_state)
    n = len(frame)
    sites = frame["site"].astype(str).to_numpy() if "site" in frame.columns else None
    target_rows = np.array([], dtype=int)
    tgt_name = "no second site"
    if sites is not None and len(set(sites)) >= 2:
        names = sorted(set(sites))
        tsite = names[-1] if target_site is None else str(target_site)
        if tsite not in names:
            raise ValueError(f"target_site={target_site!r} is not a site of the cohort {names!r}.")
        target_rows = np.flatnonzero(sites == tsite)
        tgt_name = f"site {tsite}"
    elif sites is not None:
        study.note("the cohort has a single site: the site-shift steps are skipped.")
    else:
        study.note(f"no {site_column!r} column: the site-shift steps are skipped.")
    src = np.setdiff1d(np.arange(n), target_rows)
    test_mask = np.zeros(n, dtype=bool)
    for c in (0, 1):
        rows = rng.permutation(src[y[src] == c])
        test_mask[rows[: int(round(0.3 * len(rows)))]] = True
    train = np.setdiff1d(src, np.flatnonzero(test_mask))
    if len(train) < 10 or len(set(y[train])) < 2:
        per_class = np.bincount(y[train], minlength=2).tolist()
        raise ValueError(
            f"the cohort leaves {len(train)} training cases ({per_class} per class) outside "
            "the target site; the study needs at least 10 with both classes."
        )
    return {
        "name": p.name,
        "frame": frame,
        "y": y,
        "survival": survival,
        "risk": None,
        "train": train,
        "test": np.flatnonzero(test_mask),
        "target": target_rows,
        "label_target": target_rows,
        "target_name": tgt_name,
        "label_target_name": tgt_name,
        "mode": mode,
        "description": (
            f"{p.name}: {n} cases, target {target!r} ({classes[0]!r} = 0, {classes[1]!r} = 1). "
            f"Source: {len(src)} cases (70 % train, 30 % held out); target: {tgt_name} "
            f"({len(target_rows)} cases). Network view: mode={mode!r}"
            + (", lesion crops" if crop is not None and "mask" in cohort.columns else "")
            + "."
        ),
        "site_params": None,
    }


def _medmnist_data(path, n_samples, quick, random_state):
    from scipy import ndimage

    from ._imaging import make_image_frame
    from .datasets import load_medmnist

    rng = np.random.default_rng(random_state)
    Xtr, ytr = load_medmnist(path, split="train")
    Xte, yte = load_medmnist(path, split="test")
    if ytr.ndim != 1 or len(np.unique(ytr)) != 2:
        raise ValueError(
            f"skrtl demo needs a binary single-label MedMNIST file, {Path(path).name} has "
            f"labels of shape {ytr.shape!r} with classes {np.unique(ytr).tolist()!r}."
        )
    if Xtr.ndim != 3:
        raise ValueError(
            f"skrtl demo runs on 2-D grayscale MedMNIST files; {Path(path).name} has images of "
            f"shape {Xtr.shape[1:]!r}."
        )
    n = min(n_samples, 120) if quick else n_samples
    tr = rng.permutation(len(Xtr))[:n]
    te = rng.permutation(len(Xte))
    third = len(te) // 3
    if quick:
        third = min(third, n // 2)
    te_a, te_b, te_c = te[:third], te[third : 2 * third], te[2 * third : 3 * third]
    # simulated second site: blur + noise + intensity change
    shifted = []
    for i in te_b:
        img = ndimage.gaussian_filter(Xte[i].astype(np.float32), 1.0)
        img = 0.8 * img + 20.0 + rng.normal(0, 12.0, img.shape)
        shifted.append(np.clip(img, 0, 255).astype(np.float32))
    # simulated screening site: same images, minority class kept with probability 0.3
    minority = int(np.bincount(ytr).argmin())
    keep = np.array([i for i in te_c if yte[i] != minority or rng.random() < 0.3], dtype=int)
    images = [Xtr[i].astype(np.float32) for i in tr]
    images += [Xte[i].astype(np.float32) for i in te_a] + shifted
    images += [Xte[i].astype(np.float32) for i in keep]
    y = np.r_[ytr[tr], yte[te_a], yte[te_b], yte[keep]].astype(int)
    sites = np.array(
        ["train"] * len(tr) + ["test"] * len(te_a) + ["shifted"] * len(te_b)
        + ["screening"] * len(keep)
    )  # fmt: skip
    frame = make_image_frame(images, sites=sites)
    return {
        "name": Path(path).name,
        "frame": frame,
        "y": y,
        "survival": None,
        "risk": None,
        "train": np.flatnonzero(sites == "train"),
        "test": np.flatnonzero(sites == "test"),
        "target": np.flatnonzero(sites == "shifted"),
        "label_target": np.flatnonzero(sites == "screening"),
        "target_name": "simulated scanner (blur, noise, intensity)",
        "label_target_name": f"simulated screening site (class {minority} kept at 30 %)",
        "description": (
            f"{Path(path).name}: {len(tr)} training images (source), {len(te_a)} test images "
            f"(held-out source), {len(te_b)} test images with simulated blur, noise and "
            f"intensity change (covariate-shift target), {len(keep)} test images with class "
            f"{minority} under-sampled (label-shift target)."
        ),
        "site_params": None,
    }


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _auc(y, score) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def _probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000))


def _pca_probe(n_train: int):
    """Low-dimensional probe: better calibrated posteriors, which EM prior estimation needs."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_comp = int(max(2, min(10, n_train // 10)))
    return make_pipeline(
        StandardScaler(), PCA(n_components=n_comp, random_state=0), LogisticRegression()
    )


def _md_table(df: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float | np.floating):
            return "" if np.isnan(v) else f"{v:.3f}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------
def _plot_examples(study, d):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ._cohort import iter_cases

    frame, y = d["frame"], d["y"]
    site_col = frame["site"].astype(str).to_numpy() if "site" in frame.columns else None
    sites = list(dict.fromkeys(site_col.tolist())) if site_col is not None else ["all"]
    ncol = 6
    fig, axes = plt.subplots(len(sites), ncol, figsize=(1.6 * ncol, 1.7 * len(sites)))
    axes = np.atleast_2d(axes)
    for r, site in enumerate(sites):
        in_site = site_col == site if site_col is not None else np.ones(len(frame), bool)
        rows = np.flatnonzero(in_site)[:ncol]
        for ax in axes[r]:
            ax.axis("off")
        for c, case in enumerate(iter_cases(frame, rows=rows, mode=d.get("mode", "2d"))):
            ax = axes[r, c]
            img, m = case.image.array, case.mask
            if img.ndim == 3 and case.image.layout == "zyx":
                if m is None:
                    img = img[img.shape[0] // 2]
                else:
                    z = int(np.argmax(m.reshape(m.shape[0], -1).sum(1)))
                    img, m = img[z], m[z]
            ax.imshow(img, cmap="gray")
            if m is not None:
                ax.contour(m.astype(float), [0.5], colors="r", linewidths=0.5)
            ax.set_title(f"site {site}, y={y[rows[c]]}", fontsize=7)
    fig.tight_layout()
    study.savefig(fig, "examples.png", "Example images per site (red: lesion mask).")


def _features(study, d, image_size, random_state):
    """Deep features of all images: returns (F, extractor class)."""
    from ._features import PretrainedCNNFeatures

    frame = d["frame"]
    t0 = time.perf_counter()
    ext = PretrainedCNNFeatures(
        mode=d.get("mode", "2d"),
        input_size=image_size,
        batch_size=32,
        precision=_PRECISION,
        verbose=0,
    )
    ext.fit(frame.iloc[d["train"]])
    F = np.asarray(ext.transform(frame), dtype=np.float64)
    study.log(f"features {F.shape} in {time.perf_counter() - t0:.1f}s")
    return F, PretrainedCNNFeatures, ext


def _diagnostics(study, d, F, quick, random_state):
    from ._diagnostics import diagnose_shift

    y = d["y"]
    out = {}
    same = d["label_target"] is d["target"]  # a user cohort: one target site, twice
    for key, name, labelled in (
        ("target", d["target_name"], True),
        ("label_target", d["label_target_name"] + (" (labels unused)" if same else ""), False),
    ):
        t0 = time.perf_counter()
        rows = d[key]
        tr, src_name = d["train"], "source"
        if key == "label_target" and "label_source" in d:
            tr, src_name = d["label_source"], d["label_source_name"]
        diag = diagnose_shift(
            F[tr],
            y[tr],
            F[rows],
            y[rows] if labelled else None,
            estimator=_pca_probe(len(tr)),
            n_permutations=100 if quick else 300,
            n_bootstrap=100 if quick else 200,
            random_state=random_state,
        )
        sec = time.perf_counter() - t0
        step = f"diagnostics: {src_name} vs {name}"
        study.add(step, "MMD two-sample test", "p-value", target=diag.mmd.p_value, seconds=sec)
        study.add(step, "proxy A-distance", "PAD", target=diag.proxy_a_distance)
        study.add(step, f"prior test ({diag.target_priors_method})", "p-value",
                  target=diag.prior_p_value)  # fmt: skip
        study.add(step, "class-conditional MMD", "p-value", target=diag.conditional_p_value)
        fname = f"diagnostics_{key}.png"
        study.savefig(diag.plot(), fname, f"Shift diagnostics: {src_name} vs {name}.", section=key)
        study.section(
            key,
            f"Shift diagnostics: {src_name} vs {name}"
            + (" (target labels used)" if labelled else " (target labels not used)"),
            table=diag.summary(),
            text=diag.advice(),
        )
        out[key] = diag
    return out


def _probe_auc(F, y, train, test, target):
    probe = _probe().fit(F[train], y[train])
    return (
        _auc(y[test], probe.predict_proba(F[test])[:, 1]),
        _auc(y[target], probe.predict_proba(F[target])[:, 1]) if len(target) else np.nan,
    )


def _harmonization(study, d, F, feat_cls, image_size, random_state):
    y, tr, te, tg = d["y"], d["train"], d["test"], d["target"]
    frame = d["frame"]
    mode = d.get("mode", "2d")
    t0 = time.perf_counter()
    src, tgt = _probe_auc(F, y, tr, te, tg)
    study.add("harmonization", "none (linear probe)", "ROC AUC", src, tgt,
              time.perf_counter() - t0)  # fmt: skip

    def histogram():
        from ._harmonize import HistogramMatcher

        t0 = time.perf_counter()
        hm = HistogramMatcher(level="image").fit(frame.iloc[tr])
        matched = hm.transform(frame)
        ext = feat_cls(mode=mode, input_size=image_size, batch_size=32, precision=_PRECISION)
        Fh = np.asarray(ext.fit(matched.iloc[tr]).transform(matched), dtype=np.float64)
        s, t = _probe_auc(Fh, y, tr, te, tg)
        study.add("harmonization", "HistogramMatcher (images)", "ROC AUC", s, t,
                  time.perf_counter() - t0)  # fmt: skip

    def combat():
        from ._combat import ComBatHarmonizer

        t0 = time.perf_counter()
        cols = [f"f{i}" for i in range(F.shape[1])]
        df = pd.DataFrame(F, columns=cols)
        df["site"] = frame["site"].to_numpy()
        # fit on the unlabelled images of every site (no labels are used)
        cb = ComBatHarmonizer().fit(df)
        Fc = np.asarray(cb.transform(df), dtype=np.float64)
        s, t = _probe_auc(Fc, y, tr, te, tg)
        study.add("harmonization", "ComBatHarmonizer (features)", "ROC AUC", s, t,
                  time.perf_counter() - t0,
                  "site effect estimated without covariates")  # fmt: skip

    def adabn():
        from ._adabn import AdaBN

        t0 = time.perf_counter()
        ada = AdaBN(
            feat_cls(mode=mode, input_size=image_size, batch_size=32, precision=_PRECISION),
            unseen="reference",
        )
        ada.fit(frame.iloc[tr])
        ada.adapt(frame.iloc[tg])  # source sites keep the source statistics
        Fa = np.asarray(ada.transform(frame), dtype=np.float64)
        s, t = _probe_auc(Fa, y, tr, te, tg)
        study.add("harmonization", "AdaBN (per-site BatchNorm)", "ROC AUC", s, t,
                  time.perf_counter() - t0)  # fmt: skip

    study.run("harmonization: histogram matching", histogram)
    study.run("harmonization: ComBat", combat)
    study.run("harmonization: AdaBN", adabn)


def _finetune(study, d, image_size, quick, random_state):
    from ._finetune import FineTuneClassifier as cls

    y, tr, te, tg = d["y"], d["train"], d["test"], d["target"]
    frame = d["frame"]
    t0 = time.perf_counter()
    clf = cls(
        mode=d.get("mode", "2d"),
        strategy="finetune",
        n_estimators=1,  # one network keeps the demo fast (library default: 5-network ensemble)
        max_epochs=3 if quick else 6,
        batch_size=32,
        input_size=image_size,
        random_state=random_state,
        verbose=0,
    )
    clf.fit(frame.iloc[tr], y[tr])
    pos = list(clf.classes_).index(1)
    s = _auc(y[te], clf.predict_proba(frame.iloc[te])[:, pos])
    t = _auc(y[tg], clf.predict_proba(frame.iloc[tg])[:, pos]) if len(tg) else np.nan
    study.add("transfer", "fine-tune (FineTuneClassifier)", "ROC AUC", s, t,
              time.perf_counter() - t0,
              f"{clf.n_estimators} network(s), {clf.max_epochs} epochs")  # fmt: skip
    hist = getattr(clf, "history_", None)
    if hist:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        h = pd.DataFrame(list(hist))
        fig, ax = plt.subplots(figsize=(4.5, 3))
        for col in ("train_loss", "valid_loss"):
            if col in h:
                ax.plot(h["epoch"] if "epoch" in h else np.arange(len(h)), h[col], label=col)
        ax.set_xlabel("epoch")
        ax.legend()
        study.savefig(fig, "finetune_history.png", "Fine-tuning loss per epoch.")
    return clf


def _saliency_examples(d, per_site: int = 2) -> np.ndarray:
    """A few images per site that no model trained on: one per class where a site has both."""
    frame, y = d["frame"], d["y"]
    held = np.setdiff1d(np.arange(len(y)), d["train"])
    pool = held if len(held) else np.arange(len(y))
    sites = (
        frame["site"].astype(str).to_numpy()
        if "site" in frame.columns
        else np.full(len(y), "all", dtype=object)
    )
    rows = []
    for site in dict.fromkeys(sites[pool].tolist()):
        cand = pool[sites[pool] == site]
        picked = [cand[y[cand] == c][0] for c in (1, 0) if (y[cand] == c).any()]
        picked += [r for r in cand if r not in picked]
        rows.extend(picked[:per_site])
    return np.asarray(rows[: 6 * per_site], dtype=int)


def _saliency(study, d, F, ext, clf):
    """Saliency maps of a few images per site: Grad-CAM of the network, CAM of the probe."""
    from sklearn.pipeline import Pipeline

    from ._explain import explain

    frame, y, tr = d["frame"], d["y"], d["train"]
    rows = _saliency_examples(d)
    if not len(rows):
        return
    X = frame.iloc[rows]
    sites = X["site"].astype(str).to_numpy() if "site" in X.columns else ["all"] * len(rows)
    titles = [f"site {s}, y={y[r]}" for s, r in zip(sites, rows)]
    probe = _probe().fit(F[tr], y[tr])
    pipe = Pipeline([("cnn", ext), ("scaler", probe[0]), ("probe", probe[-1])])
    source = np.isin(rows, d["test"])
    table = pd.DataFrame({"case": [str(i) for i in X.index], "site": sites, "y": y[rows]})
    runs = []
    if clf is not None:
        runs.append(("fine-tuned network, Grad-CAM of the last convolutional stage",
                     "saliency_finetune.png", "Grad-CAM", clf))  # fmt: skip
    runs.append(("linear probe, class activation map (coefficients on the feature map)",
                 "saliency_probe.png", "probe CAM", pipe))  # fmt: skip
    for caption, fname, short, est in runs:
        t0 = time.perf_counter()
        maps = explain(est, X, target=1)  # the evidence for the positive class
        sec = time.perf_counter() - t0
        disp = maps.plot(ncols=min(4, len(rows)), titles=titles, panel_size=1.9)
        study.savefig(disp.figure_, fname, f"Saliency maps, {caption} (positive class; green: "
                      "lesion mask).", section="saliency")  # fmt: skip
        share, frac = maps.mask_share(), maps.mask_fraction()
        score = "p(y=1)" if maps.method != "cam" else "decision"
        table[f"{short} {score}"] = maps.scores
        if np.isfinite(share).any():
            table[f"{short} share in lesion"] = share
            study.add(
                "saliency",
                f"{short} ({maps.layer if isinstance(maps.layer, str) else '+'.join(maps.layer)})",
                "share in lesion",
                float(np.nanmean(share[source])) if source.any() else np.nan,
                float(np.nanmean(share[~source])) if (~source).any() else np.nan,
                sec,
                f"{len(rows)} images; the lesion covers {np.nanmean(frac):.0%} of them",
            )
        else:
            why = "no masks" if "mask" not in X.columns else "constant maps: a 1 x 1 feature map"
            study.add("saliency", short, "images explained", np.nan, np.nan, sec,
                      f"{len(rows)} images ({why})")  # fmt: skip
    if "mask" in X.columns:
        table["lesion fraction"] = maps.mask_fraction()
    study.section(
        "saliency",
        "Saliency maps",
        table=table,
        text=(
            "Where the models look, on a few images per site that no model was trained on: "
            "skrtl.explain maps the evidence for the positive class back onto the original "
            "image grid. 'share in lesion' is the share of the (positive) saliency inside the "
            "lesion mask; compare it with the lesion fraction, the share a map spread evenly "
            "would have.\n"
            "The fine-tuned network sees the whole image, so its share inside the lesion says "
            "where it looked. The linear probe pools inside the lesion mask (masked pooling), "
            "so its map lies on the feature-map cells the mask covers by construction."
        ),
    )


def _linear_probe_row(study, d, F):
    y, tr, te, tg = d["y"], d["train"], d["test"], d["target"]
    t0 = time.perf_counter()
    s, t = _probe_auc(F, y, tr, te, tg)
    study.add("transfer", "linear probe (features + LogisticRegression)", "ROC AUC", s, t,
              time.perf_counter() - t0)  # fmt: skip


def _label_shift(study, d, F, random_state):
    from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

    from ._label_shift import LabelShiftAdapter

    y, tr, tg = d["y"], d["train"], d["label_target"]
    t0 = time.perf_counter()
    ada = LabelShiftAdapter(_pca_probe(len(tr)), random_state=random_state).fit(F[tr], y[tr])
    before = ada.predict_proba(F[tg])
    ada.adapt(F[tg])
    after = ada.predict_proba(F[tg])
    sec = time.perf_counter() - t0
    pos = list(ada.classes_).index(1)
    true_prev = float(np.mean(y[tg] == 1))
    study.add("label shift", "target prevalence", "P(y=1)", float(np.mean(y[tr] == 1)),
              true_prev, np.nan, "source / true target")  # fmt: skip
    study.add("label shift", "EM estimate (LabelShiftAdapter, PCA probe)", "P(y=1)",
              float(ada.source_priors_[pos]), float(ada.target_priors_[pos]), sec)  # fmt: skip
    for name, p in (("calibrated source model", before), ("adapted to target priors", after)):
        study.add(
            "label shift", name, "log loss", np.nan, float(log_loss(y[tg], p, labels=[0, 1]))
        )
        study.add("label shift", name, "Brier", np.nan, float(brier_score_loss(y[tg], p[:, pos])))
        study.add("label shift", name, "accuracy", np.nan,
                  float(accuracy_score(y[tg], ada.classes_[p.argmax(1)])))  # fmt: skip


def _survival(study, d, F, random_state):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ._survival import CoxPHSurvival, concordance_index, kaplan_meier

    surv, risk = d["survival"], d["risk"]
    tr, te, tg = d["train"], d["test"], d["target"]
    t0 = time.perf_counter()
    n_comp = int(min(10, len(tr) // 10, F.shape[1]))
    cox = make_pipeline(
        StandardScaler(), PCA(n_components=max(2, n_comp), random_state=random_state),
        CoxPHSurvival(penalizer=0.1),
    )  # fmt: skip
    cox.fit(F[tr], surv[tr])
    sec = time.perf_counter() - t0
    c_src = float(cox.score(F[te], surv[te]))
    c_tgt = float(cox.score(F[tg], surv[tg])) if len(tg) else np.nan
    study.add("survival", "Cox (PCA of deep features)", "C-index", c_src, c_tgt, sec)
    if risk is not None:
        study.add("survival", "oracle: latent risk", "C-index",
                  float(concordance_index(surv[te], risk[te])),
                  float(concordance_index(surv[tg], risk[tg])))  # fmt: skip
    pred = cox.predict(F[te])
    high = pred > np.median(pred)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for mask, label in ((~high, "predicted low risk"), (high, "predicted high risk")):
        t, s = kaplan_meier(surv["time"][te][mask], surv["event"][te][mask])
        ax.step(np.r_[0, t], np.r_[1, s], where="post", label=label)
    ax.set_xlabel("months")
    ax.set_ylabel("survival")
    ax.set_title("held-out source images: Kaplan-Meier by Cox risk group", fontsize=9)
    ax.legend(fontsize=8)
    study.savefig(
        fig, "survival_km.png", "Kaplan-Meier curves of the target site by predicted risk."
    )


def _write_report(study, d, params) -> Path:
    table = pd.DataFrame(study.rows)
    lines = [
        "# skrtl demo report",
        "",
        f"Data: {d['description']}",
        "",
        f"Settings: {params}. Models are trained on the training images of the source "
        f"site(s). Column 'source' = held-out source images; column 'target' = "
        f"{d['target_name']}, except for the label-shift rows: {d['label_target_name']}.",
        "",
        "## Results",
        "",
        _md_table(table) if len(table) else "(no results)",
        "",
    ]
    for sec in study.sections:
        lines += [f"## {sec['title']}", ""]
        if sec["table"] is not None:
            lines += [_md_table(sec["table"]), ""]
        lines += [para for line in sec["text"].splitlines() if line for para in (line, "")]
    if d.get("site_params"):
        sp = pd.DataFrame(d["site_params"]).T.reset_index(names="site")
        lines += ["## Simulated scanners", "", _md_table(sp), ""]
    if study.figures:
        lines += ["## Figures", ""]
        for name, caption, _ in study.figures:
            lines += [f"![{caption}]({name})", "", caption, ""]
    if study.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in study.notes] + [""]
    lines += [f"Total run time: {time.perf_counter() - study.start:.0f} s.", ""]
    path = study.output_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _write_html_report(study, d, params) -> Path:
    """``report.html``: the report as one self-contained page (figures embedded)."""
    import html as _html

    from ._report_html import html_figure, html_page, html_table, html_text

    out = study.output_dir
    figures = {name: (caption, key) for name, caption, key in study.figures}

    def figs(key=None, names=None) -> str:
        chosen = [n for n, (_, k) in figures.items() if (names is None and k == key)]
        chosen += [n for n in (names or []) if n in figures]
        return "".join(html_figure(out / n, figures[n][0]) for n in chosen)

    table = pd.DataFrame(study.rows)
    sections = [
        ("results", "Results", html_table(table) if len(table) else "<p>(no results)</p>"),
    ]
    if "examples.png" in figures:
        sections.append(("examples", "Example images per site", figs(names=["examples.png"])))
    for sec in study.sections:
        body = "" if sec["table"] is None else html_table(sec["table"])
        body += html_text(sec["text"]) + figs(sec["key"])
        sections.append((sec["key"], sec["title"], body))
    other = [n for n, (_, k) in figures.items() if k is None and n != "examples.png"]
    if other:
        sections.append(("figures", "Figures", figs(names=other)))
    if d.get("site_params"):
        sp = pd.DataFrame(d["site_params"]).T.reset_index(names="site")
        sections.append(("scanners", "Simulated scanners", html_table(sp)))
    timings = pd.DataFrame(
        [{"step": t, "seconds": sec, "finished": ok} for t, sec, ok in study.timings]
    )
    total = time.perf_counter() - study.start
    sections.append(
        (
            "timings",
            "Timings",
            (html_table(timings, float_format="{:.1f}") if len(timings) else "")
            + html_text(f"Total run time: {total:.0f} s."),
        )
    )
    if study.notes:
        items = "".join(f"<li>{_html.escape(n)}</li>" for n in study.notes)
        sections.append(("notes", "Notes", f'<ul class="notes">{items}</ul>'))
    settings = (
        f"Settings: {params}. Models are trained on the training images of the source "
        f"site(s). Column 'source' = held-out source images; column 'target' = "
        f"{d['target_name']}, except for the label-shift rows: {d['label_target_name']}."
    )
    intro = (
        html_text(f"Data: {d['description']}") + f'<p class="meta">{_html.escape(settings)}</p>'
    )
    path = out / "report.html"
    path.write_text(html_page("skrtl demo report", sections, intro=intro), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
def run_demo(
    data=None,
    output_dir="skrtl_demo_report",
    n_samples: int = 360,
    image_size: int = 96,
    quick: bool = False,
    random_state: int | None = 0,
    verbose: int = 1,
    *,
    cohort=None,
    target: str | None = None,
    site_column: str | None = "site",
    id_column: str | None = None,
    image_column: str = "image",
    mask_column: str | None = "mask",
    label=None,
    time_column: str = "time",
    event_column: str = "event",
    target_site=None,
    mode: str = "auto",
    margin_mm=None,
    size_mm=None,
    target_spacing=None,
    crop: bool = True,
) -> dict:
    """Run a complete multi-site transfer-learning study offline and write a report.

    Parameters
    ----------
    data : str or path-like, optional
        A binary 2-D MedMNIST ``.npz`` file (e.g. ``breastmnist.npz``); default: the lesion
        phantom (:func:`skrtl.datasets.make_lesion_phantom`) with sites A, B (source), C
        (covariate-shift target: another scanner) and D (label-shift target: scanner of site
        A, prevalence 0.15 instead of 0.5), written to ``output_dir/cohort`` as NIfTI images,
        masks and ``cohort.csv``, and read back from those files.
    output_dir : str or path-like, default="skrtl_demo_report"
        Folder for ``report.md`` and the PNG plots (created if needed; checked to be writable
        before the study starts).
    n_samples : int, default=360
        Phantom patients (MedMNIST: training images used).
    image_size : int, default=96
        Network input size in pixels.
    quick : bool, default=False
        Tiny run (at most 200 samples, 48 px phantom, input size <= 64, 3 fine-tuning
        epochs).
    random_state : int or None, default=0
    verbose : int, default=1
        0: silent; 1: progress and the results table; 2: also tracebacks of failed steps.
    cohort : str or path-like, optional
        A cohort CSV of image (and mask) files (see :func:`skrtl.read_cohort`) instead of the
        phantom: the same study on the user's cases.
    target : str, optional
        Binary label column of ``cohort`` (required with it); the second class in sorted
        order is the positive one.
    site_column : str or None, default="site"
        Site column of ``cohort``; optional: without it (or with one site) the site-shift
        steps (diagnostics, harmonization, AdaBN, label shift) are skipped.
    id_column, image_column, mask_column, label
        Passed to :func:`skrtl.read_cohort`.
    time_column, event_column : str, default="time", "event"
        Survival columns of ``cohort``: the Cox step runs only when both exist.
    target_site : str, optional
        The site held out as the shift target (default: the last site in sorted order); the
        other sites are the source (70 % train, 30 % held out).
    mode : {"auto", "2d", "2.5d", "3d"}, default="auto"
        Network view for ``cohort``: ``"2.5d"`` for volumes, ``"2d"`` for 2-D images.
    margin_mm, size_mm, target_spacing, crop
        The lesion crop of ``cohort`` cases (:class:`skrtl.LesionCropper`) before the study
        (default: bounding box + 10 mm); ``crop=False`` uses whole images.

    Returns
    -------
    dict
        ``results`` (DataFrame), ``report`` (path of report.md), ``html`` (path of the
        self-contained report.html), ``diagnosis`` (dict
        ``"target"`` / ``"label_target"`` -> :class:`~skrtl._diagnostics.ShiftDiagnosis`, or
        None), ``notes`` (list of str), ``cohort`` (path of the cohort CSV the study read, or
        None for a MedMNIST file).

    Raises
    ------
    ValueError, FileNotFoundError, PermissionError
        Bad arguments, an unreadable data file or cohort table, or an output folder that
        cannot be written (all before the study starts).
    """
    from .utils import check_writable_dir

    if not (isinstance(n_samples, int | np.integer) and n_samples >= 30):
        raise ValueError(f"n_samples must be an integer >= 30, got {n_samples!r}.")
    if not (isinstance(image_size, int | np.integer) and image_size >= 32):
        raise ValueError(f"image_size must be an integer >= 32 pixels, got {image_size!r}.")
    if data is not None and cohort is not None:
        raise ValueError("give data (a MedMNIST file) or cohort (a CSV), not both.")
    if mode not in ("auto", "2d", "2.5d", "3d"):
        raise ValueError(f"mode must be 'auto', '2d', '2.5d' or '3d', got {mode!r}.")
    out = check_writable_dir(output_dir, what="report folder")
    study = _Study(out, verbose)
    if quick:
        image_size = min(int(image_size), 64)
    if cohort is not None:
        crop_spec = None
        if crop:
            crop_spec = {
                k: v
                for k, v in (
                    ("margin_mm", margin_mm),
                    ("size_mm", size_mm),
                    ("target_spacing", target_spacing),
                )
                if v is not None
            }
        d = _cohort_data(
            cohort,
            target=target,
            site_column=site_column,
            id_column=id_column,
            image_column=image_column,
            mask_column=mask_column,
            label=label,
            time_column=time_column,
            event_column=event_column,
            target_site=target_site,
            mode=mode,
            crop=crop_spec,
            random_state=random_state,
            study=study,
        )
        d["cohort_csv"] = Path(cohort)
    elif data is None:
        d = _phantom_files(out, int(n_samples), quick, random_state)
    else:
        from .datasets import load_medmnist

        load_medmnist(data, split="train")  # a clear error for a file that is not MedMNIST
        d = _medmnist_data(data, int(n_samples), quick, random_state)
    study.log(
        f"{d['name']}: {len(d['train'])} train, {len(d['test'])} held-out source, "
        f"{len(d['target'])} target samples"
    )
    shift = len(d["target"]) > 0
    study.run("example images", _plot_examples, study, d)
    res = study.run("deep features (embedded tf_efficientnet_lite0)", _features, study, d,
                    image_size, random_state)  # fmt: skip
    diag = None
    if res is not None:
        F, feat_cls, ext = res
        if shift:
            diag = study.run("shift diagnostics", _diagnostics, study, d, F, quick, random_state)
        study.run("linear probe", _linear_probe_row, study, d, F)
        clf = study.run("fine-tuning", _finetune, study, d, image_size, quick, random_state)
        study.run("saliency maps", _saliency, study, d, F, ext, clf)
        if shift:
            _harmonization(study, d, F, feat_cls, image_size, random_state)
            study.run("label-shift adaptation", _label_shift, study, d, F, random_state)
        if d["survival"] is not None:
            study.run("Cox model on deep features", _survival, study, d, F, random_state)
        elif cohort is not None:
            study.note(
                f"no {time_column!r} / {event_column!r} columns: the survival step is skipped."
            )
    params = {
        "n_samples": len(d["y"]),
        "image_size": image_size,
        "quick": quick,
        "random_state": random_state,
    }
    if cohort is not None:
        params.update(mode=d["mode"], target=target)
    report = _write_report(study, d, params)
    html = _write_html_report(study, d, params)
    results = pd.DataFrame(study.rows)
    if verbose:
        with pd.option_context("display.width", 140, "display.max_colwidth", 48):
            print(results.drop(columns=["note"]).to_string(index=False, float_format="%.3f"))
        print(f"\nreport: {report} (and {html.name})")
    return {
        "results": results,
        "report": report,
        "html": html,
        "diagnosis": diag,
        "notes": study.notes,
        "cohort": d.get("cohort_csv"),
    }
