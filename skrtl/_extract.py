"""Batch feature extraction from a cohort table, resumable: ``skrtl extract``.

:func:`extract_cohort` (the ``skrtl extract COHORT.csv -o features.csv`` command) computes, for
every case of a cohort table (:func:`skrtl.read_cohort`), CNN features of the lesion crop
(:class:`skrtl.LesionCropper` then :class:`skrtl.PretrainedCNNFeatures`) and / or PyRadiomics
features of the image and mask (:class:`skrtl.RadiomicsFeatures`), and writes one row per case
with the table's own columns kept.

It is built for long runs on real cohorts:

* **resumable**: each finished case is committed to a SQLite file next to the output
  (``features.extract.sqlite`` for ``features.csv``) as soon as it completes, keyed by the
  case (its id, file paths, sizes and modification times, label) and a hash of the
  extraction settings. A rerun with the same settings skips every finished case; a crash or
  Ctrl-C loses nothing already computed. Changed settings get their own entries (nothing is
  mixed), an edited image or mask file is recomputed;
* **failures are reported, not fatal**: a case that cannot be processed (missing or corrupt
  file, empty mask or absent label, mask / image geometry mismatch, a PyRadiomics error) is
  written to an errors file (``features.errors.csv``) with its stage and reason, and the batch
  goes on. Failed cases are tried again by the next run;
* ``n_jobs`` cases in parallel (joblib processes), with a progress bar.

Exit status of the command: ``0`` every case succeeded; ``1`` some cases failed (listed in the
errors file; the output holds the others); ``2`` unusable arguments or cohort table (nothing
extracted); ``130`` interrupted (Ctrl-C; finished cases are kept, rerun to resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._cohort import LOADER_ATTR, load_case, read_cohort
from .utils import check_writable_dir, is_missing_cell, is_path_cell

__all__ = ["ExtractResult", "extract_cohort", "read_radiomics_params"]

_STORE_VERSION = "skrtl-extract-1"
_EXIT_OK, _EXIT_FAILED, _EXIT_USAGE, _EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class ExtractResult:
    """What :func:`extract_cohort` did.

    Attributes
    ----------
    features : pandas.DataFrame
        One row per successful case: the cohort table's columns, then the features.
    errors : pandas.DataFrame
        One row per failed case: ``case``, ``image``, ``mask``, ``stage`` (``"cohort"``,
        ``"load"``, ``"cnn"``, ``"radiomics"``), ``error`` (exception type) and ``message``.
    n_cases, n_computed, n_reused, n_failed : int
        Cases in the table; computed in this run; taken from the store (finished earlier);
        failed.
    output, errors_path, store_path : Path
    settings_hash : str
    interrupted : bool
        The run was interrupted (Ctrl-C); finished cases are in the store.
    seconds : float
    notes : list of str
        Warnings of the computed cases (e.g. a lesion cut by a fixed-size crop), with their
        case, and of reading the table.
    """

    features: pd.DataFrame
    errors: pd.DataFrame
    n_cases: int
    n_computed: int
    n_reused: int
    n_failed: int
    output: Path
    errors_path: Path
    store_path: Path
    settings_hash: str
    interrupted: bool = False
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """``0`` all cases succeeded, ``1`` some failed, ``130`` interrupted."""
        if self.interrupted:
            return _EXIT_INTERRUPTED
        return _EXIT_FAILED if self.n_failed else _EXIT_OK


# --------------------------------------------------------------------------------------------
# PyRadiomics parameter files
# --------------------------------------------------------------------------------------------
def read_radiomics_params(path) -> dict:
    """Read a PyRadiomics parameter file (YAML or JSON) as :class:`skrtl.RadiomicsFeatures`
    keyword arguments.

    PyRadiomics' three sections map onto the estimator: ``featureClass`` -> ``features``
    (``{class: [names]}``; an empty list or null means all features of the class),
    ``imageType`` -> ``image_types`` and ``setting`` -> ``settings`` (``label`` included).

    Parameters
    ----------
    path : str or path

    Returns
    -------
    dict
        ``{"features": ..., "image_types": ..., "settings": ...}`` (keys present in the file).

    Raises
    ------
    ValueError
        The file cannot be parsed, is not a mapping, or has unknown top-level sections.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_file():
        raise FileNotFoundError(f"PyRadiomics params file {os.fspath(path)!r} does not exist.")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            spec = json.loads(text)
        else:
            try:
                import yaml
            except ImportError as exc:  # pragma: no cover - pyyaml comes with pyradiomics
                raise ImportError(
                    'reading a YAML params file needs PyYAML: pip install "skrtl[radiomics]"'
                ) from exc
            spec = yaml.safe_load(text)
    except ImportError:
        raise
    except Exception as exc:
        raise ValueError(f"params file {str(p)!r} is not valid YAML / JSON: {exc}") from exc
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ValueError(
            f"params file {str(p)!r} must hold a mapping with the PyRadiomics sections "
            f"imageType, featureClass and setting; got a {type(spec).__name__}."
        )
    known = {"imageType", "featureClass", "setting", "voxelSetting"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(
            f"params file {str(p)!r} has unknown sections {unknown!r}; PyRadiomics params files "
            f"have {sorted(known - {'voxelSetting'})!r}."
        )
    out = {}
    if spec.get("featureClass"):
        out["features"] = {
            str(cls): (list(names) if names else None)
            for cls, names in spec["featureClass"].items()
        }
    if spec.get("imageType"):
        out["image_types"] = {str(k): dict(v or {}) for k, v in spec["imageType"].items()}
    if spec.get("setting"):
        out["settings"] = dict(spec["setting"])
    return out


# --------------------------------------------------------------------------------------------
# settings and keys
# --------------------------------------------------------------------------------------------
def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _stat(path) -> list | None:
    if not is_path_cell(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return [os.fspath(path), None, None]
    return [os.fspath(path), int(st.st_size), int(st.st_mtime_ns)]


def _case_key(case_id, row: dict) -> str:
    return _sha(
        [
            str(case_id),
            _stat(row.get("image")),
            _stat(row.get("mask")),
            repr(row.get("mask_label")),
            row.get("series_uid"),
        ]
    )


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
_EXTRACTORS: dict = {}  # fitted CNN extractors of this process, per (settings, mode, channels)


def _raw_array(image) -> np.ndarray:
    """The pixels with the stored type when it is uint8 (the ``"auto"`` intensity rule)."""
    stored = str(image.meta.get("stored_pixel_type", "")).replace("vector of ", "")
    if stored == "8-bit unsigned integer":
        return np.clip(np.rint(image.array), 0, 255).astype(np.uint8)
    return image.array


def _cnn_features(image, mask, settings: dict) -> dict:
    from ._cropper import LesionCropper
    from ._features import PretrainedCNNFeatures
    from ._imaging import make_image_frame

    volume = image.layout == "zyx"
    if image.layout.startswith("t"):
        raise ValueError(f"{image.path!r} is a multi-frame clip; choose a frame first.")
    mode = settings["mode"]
    if mode == "auto":
        mode = "2.5d" if volume else "2d"
    if not volume and mode != "2d":
        raise ValueError(f"the image is 2-D {image.shape!r}, but mode={mode!r} takes volumes.")
    frame = make_image_frame(
        [_raw_array(image)],
        masks=None if mask is None else [mask],
        spacing=[image.spacing],
    )
    crop = settings["crop"]
    if crop is not None and (mask is not None or crop.get("size_mm") is not None):
        cropper = LesionCropper(mode="2d" if (volume and mode == "2d") else "3d", **crop)
        frame = cropper.fit_transform(frame)
    elif volume and mode == "2d":
        raise ValueError("mode='2d' on a volume needs a mask (its lesion slice) or --size-mm.")
    cnn = settings["cnn"]
    img0 = frame["image"].iloc[0]
    chans = img0.shape[-1] if (mode == "2d" and img0.ndim == 3) else 1
    key = (_sha(cnn), mode, chans)
    est = _EXTRACTORS.get(key)
    if est is None:
        est = PretrainedCNNFeatures(mode=mode, verbose=0, **cnn).fit(frame)
        _EXTRACTORS[key] = est
    F = est.transform(frame)
    names = est.get_feature_names_out()
    return {str(n): float(v) for n, v in zip(names, np.asarray(F)[0])}


def _radiomics_features(image, mask, settings: dict) -> dict:
    from ._imaging import make_image_frame
    from ._radiomics import RadiomicsFeatures

    rad = dict(settings["radiomics"])
    if mask is None:
        raise ValueError("radiomics features need a mask; the case has none.")
    arr = image.array if image.layout != "yxc" else image.array.mean(axis=-1)
    frame = make_image_frame([arr], masks=[mask], spacing=[image.spacing])
    rad_settings = {k: v for k, v in (rad.get("settings") or {}).items() if k != "label"}
    est = RadiomicsFeatures(
        features=rad.get("features", "auto"),
        image_types=rad.get("image_types"),
        settings=rad_settings or None,
        mode="3d" if image.layout == "zyx" else "2d",
    )
    F = est.fit_transform(frame)
    return {str(n): float(v) for n, v in zip(est.get_feature_names_out(), F[0])}


def process_case(row: dict, settings: dict) -> dict:
    """Features of one case (a dict row of the cohort frame): ``{name: value}``.

    Raises on any failure; the caller records it. Stages: ``load`` (files, label, geometry),
    then ``cnn`` and / or ``radiomics``; the failing stage is attached as ``exc.stage``.
    """
    loader = settings["loader"]
    stage = "load"
    try:
        image, mask = load_case(
            row["image"],
            None if is_missing_cell(row.get("mask")) else row.get("mask"),
            label=row.get("mask_label"),
            series_uid=row.get("series_uid"),
            orientation=loader["orientation"],
            geometry_tolerance=loader["geometry_tolerance"],
            resample_mask=loader["resample_mask"],
        )
        out = {}
        if settings["cnn"] is not None:
            stage = "cnn"
            out.update(_cnn_features(image, mask, settings))
        if settings["radiomics"] is not None:
            stage = "radiomics"
            out.update(_radiomics_features(image, mask, settings))
        return out
    except Exception as exc:
        exc.stage = stage
        raise


def _run_case(row: dict, settings: dict, position: int, key: str) -> dict:
    """Process one case and report the outcome (never raises a case failure)."""
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            feats = process_case(row, settings)
    except Exception as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        return {
            "position": position,
            "key": key,
            "status": "error",
            "stage": getattr(exc, "stage", "load"),
            "error": type(exc).__name__,
            "message": message,
            "seconds": time.perf_counter() - t0,
        }
    seen = []
    for w in caught:
        msg = f"{w.category.__name__}: {str(w.message).splitlines()[0]}"
        if msg not in seen and not issubclass(w.category, DeprecationWarning):
            seen.append(msg)
    return {
        "position": position,
        "key": key,
        "status": "ok",
        "features": feats,
        "warnings": seen,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------
class _Store:
    """Append-only SQLite record of finished cases, committed one case at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.con = sqlite3.connect(str(path), timeout=60)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS cases (settings TEXT NOT NULL, key TEXT NOT NULL, "
            "case_id TEXT, status TEXT NOT NULL, features TEXT, stage TEXT, error TEXT, "
            "message TEXT, seconds REAL, finished REAL, PRIMARY KEY (settings, key))"
        )
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS runs (settings TEXT PRIMARY KEY, version TEXT, "
            "description TEXT, created REAL)"
        )
        self.con.commit()

    def register(self, settings_hash: str, description: dict) -> None:
        self.con.execute(
            "INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?)",
            (settings_hash, _STORE_VERSION, json.dumps(description, default=str), time.time()),
        )
        self.con.commit()

    def finished(self, settings_hash: str) -> set:
        cur = self.con.execute(
            "SELECT key FROM cases WHERE settings = ? AND status = 'ok'", (settings_hash,)
        )
        return {k for (k,) in cur}

    def put(self, settings_hash: str, case_id, res: dict) -> None:
        feats = json.dumps(res["features"]) if res["status"] == "ok" else None
        self.con.execute(
            "INSERT OR REPLACE INTO cases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                settings_hash,
                res["key"],
                str(case_id),
                res["status"],
                feats,
                res.get("stage"),
                res.get("error"),
                res.get("message"),
                float(res.get("seconds", 0.0)),
                time.time(),
            ),
        )
        self.con.commit()  # one case at a time: a crash loses nothing finished

    def rows(self, settings_hash: str, keys) -> dict:
        keys = list(keys)
        out = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            q = ",".join("?" * len(chunk))
            cur = self.con.execute(
                f"SELECT key, status, features, stage, error, message FROM cases "
                f"WHERE settings = ? AND key IN ({q})",
                (settings_hash, *chunk),
            )
            for key, status, feats, stage, error, message in cur:
                out[key] = (status, feats, stage, error, message)
        return out

    def close(self) -> None:
        self.con.close()


# --------------------------------------------------------------------------------------------
# the batch
# --------------------------------------------------------------------------------------------
def _parse_layers(layers):
    if isinstance(layers, str) and "," in layers:
        layers = [v.strip() for v in layers.split(",") if v.strip()]
    if isinstance(layers, list | tuple):
        return [int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v for v in layers]
    if isinstance(layers, str) and layers.lstrip("-").isdigit():
        return int(layers)
    return layers


def _atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def extract_cohort(
    cohort,
    output,
    *,
    cnn: bool = True,
    radiomics: bool = False,
    backbone: str | None = None,
    mode: str = "auto",
    layers="final",
    pooling: str = "avg",
    input_size: int = 224,
    precision: str = "auto",
    batch_size: int = 32,
    label=None,
    params=None,
    margin_mm=None,
    size_mm=None,
    target_spacing=None,
    crop: bool = True,
    image_column: str = "image",
    mask_column: str | None = "mask",
    site_column: str | None = None,
    id_column: str | None = None,
    n_jobs: int = 1,
    errors_path=None,
    store_path=None,
    verbose: int = 1,
) -> ExtractResult:
    """Extract CNN and / or radiomics features of every case of a cohort, resumably.

    Parameters
    ----------
    cohort : str, path or DataFrame
        Cohort table (see :func:`skrtl.read_cohort`): one row per case, image and mask paths
        and any clinical columns.
    output : str or path
        Output CSV: one row per successful case, the table's columns then the features
        (``cnn_...``, then PyRadiomics' names ``original_...``).
    cnn : bool, default=True
        CNN features of the lesion crop (:class:`skrtl.PretrainedCNNFeatures`).
    radiomics : bool, default=False
        PyRadiomics features of the whole image and mask (:class:`skrtl.RadiomicsFeatures`;
        PyRadiomics crops to the mask itself). Implied by ``params``.
    backbone, layers, pooling, input_size, precision, batch_size
        See :class:`skrtl.PretrainedCNNFeatures` (``layers``: also a comma-separated string,
        ``"3,final"``).
    mode : {"auto", "2d", "2.5d", "3d"}, default="auto"
        Network view: ``"auto"`` is ``"2.5d"`` for volumes (three orthogonal planes through
        the lesion) and ``"2d"`` for 2-D images; ``"2d"`` on a volume takes the axial slice
        of the crop with the largest lesion area.
    label : int, str or None
        Mask structure: an int for every case, or the name of a column with one label per
        row (see :func:`skrtl.read_cohort`). Default: a PyRadiomics params file's ``label``
        setting, else each mask must hold a single label.
    params : str or path, optional
        PyRadiomics parameter file (YAML / JSON: ``imageType``, ``featureClass``,
        ``setting``), see :func:`read_radiomics_params`.
    margin_mm, size_mm, target_spacing, crop
        The lesion crop before the CNN (:class:`skrtl.LesionCropper`); default a bounding
        box plus 10 mm, no resampling. ``crop=False``: the whole image.
    image_column, mask_column, site_column, id_column : str or None
        Columns of the table (PyRadiomics' ``Image`` / ``Mask`` headers are recognised).
        Without ``id_column`` the row number is the case id.
    n_jobs : int, default=1
        Cases processed in parallel (joblib processes; ``-1``: all cores).
    errors_path, store_path : str or path, optional
        Errors CSV and SQLite store; default ``<output stem>.errors.csv`` and
        ``<output stem>.extract.sqlite`` next to the output.
    verbose : int, default=1
        ``1``: a progress bar; ``0``: silent.

    Returns
    -------
    ExtractResult
        ``exit_code`` is ``0`` when every case succeeded, ``1`` when some failed.

    Raises
    ------
    ValueError, FileNotFoundError, PermissionError
        Unusable arguments, cohort table or output folder (before any case is processed).
    """
    t_start = time.perf_counter()
    from ._backbone import DEFAULT_BACKBONE

    if not cnn and not radiomics and params is None:
        raise ValueError("nothing to extract: enable CNN features, radiomics features, or both.")
    if mode not in ("auto", "2d", "2.5d", "3d"):
        raise ValueError(f"mode must be 'auto', '2d', '2.5d' or '3d', got {mode!r}.")
    if not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"n_jobs must be a positive int or -1, got {n_jobs!r}.")
    output = Path(os.path.expanduser(os.fspath(output)))
    if output.suffix.lower() != ".csv":
        raise ValueError(f"output must be a .csv file, got {str(output)!r}.")
    stem = output.with_suffix("")
    errors_path = Path(errors_path) if errors_path else Path(f"{stem}.errors.csv")
    store_path = Path(store_path) if store_path else Path(f"{stem}.extract.sqlite")
    check_writable_dir(output.parent)

    rad_spec = None
    if radiomics or params is not None:
        import importlib.util

        if importlib.util.find_spec("radiomics") is None:
            raise ImportError(
                'radiomics features need PyRadiomics: pip install "skrtl[radiomics]" (installs '
                "pyradiomics-bhklab and SimpleITK)."
            )
        rad_spec = read_radiomics_params(params) if params is not None else {}
        if label is None:
            label = (rad_spec.get("settings") or {}).get("label")

    # ---- the table: original columns kept as they are, paths resolved by read_cohort
    if isinstance(cohort, pd.DataFrame):
        table = cohort.reset_index(drop=True)
        base_dir = None
    else:
        path = Path(os.path.expanduser(os.fspath(cohort)))
        if not path.is_file():
            raise FileNotFoundError(f"cohort table {os.fspath(cohort)!r} does not exist.")
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        table = pd.read_csv(path, sep=sep)
        base_dir = path.resolve().parent
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = read_cohort(
            table,
            image=image_column,
            mask=mask_column,
            label=label,
            site=site_column,
            id=id_column,
            base_dir=base_dir,
            validate="none",
            errors="drop",
        )
    notes = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    ids = table[id_column].astype(str).tolist() if id_column else [str(i) for i in table.index]
    cohort_errors = frame.attrs.get("cohort_errors")
    loader = dict(frame.attrs.get(LOADER_ATTR) or {})

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
    cnn_spec = None
    if cnn:
        cnn_spec = {
            "backbone": backbone or DEFAULT_BACKBONE,
            "layers": _parse_layers(layers),
            "pooling": pooling,
            "input_size": int(input_size),
            "precision": precision,
            "batch_size": int(batch_size),
        }
    settings = {
        "version": _STORE_VERSION,
        "cnn": cnn_spec,
        "mode": mode,
        "crop": crop_spec,
        "radiomics": rad_spec,
        "loader": loader,
    }
    settings_hash = _sha(settings)

    # ---- cases: position in the table, id, row of the cohort frame, key
    positions = {str(case): pos for pos, case in enumerate(ids)}
    index_ids = [str(v) for v in frame.index]
    cases = []
    for i, case_id in enumerate(index_ids):
        row = {c: frame[c].iat[i] for c in ("image", "mask", "mask_label", "series_uid")
               if c in frame.columns}  # fmt: skip
        cases.append((positions[case_id], case_id, row, _case_key(case_id, row)))

    store = _Store(store_path)
    computed = failed_now = 0
    interrupted = False
    try:
        store.register(settings_hash, settings)
        done = store.finished(settings_hash)
        todo = [c for c in cases if c[3] not in done]
        reused = len(cases) - len(todo)
        bar = None
        if verbose:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(cases),
                initial=reused,
                desc="skrtl extract",
                unit="case",
                dynamic_ncols=True,
            )
        by_key = {c[3]: c for c in todo}
        try:
            if n_jobs == 1 or len(todo) <= 1:
                results = (_run_case(c[2], settings, c[0], c[3]) for c in todo)
            else:
                from joblib import Parallel, delayed

                results = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
                    delayed(_run_case)(c[2], settings, c[0], c[3]) for c in todo
                )
            for res in results:
                store.put(settings_hash, by_key[res["key"]][1], res)
                for msg in res.get("warnings", ()):
                    notes.append(f"case {by_key[res['key']][1]!r}: {msg}")
                computed += res["status"] == "ok"
                failed_now += res["status"] != "ok"
                if bar is not None:
                    bar.update(1)
                    if failed_now:
                        bar.set_postfix(failed=failed_now)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
        stored = store.rows(settings_hash, [c[3] for c in cases])
    finally:
        store.close()

    # ---- output and errors, in table order
    feats_rows, positions_ok, error_rows = [], [], []
    for pos, case_id, row, key in sorted(cases, key=lambda c: c[0]):
        rec = stored.get(key)
        if rec is None:
            continue
        status, feats, stage, error, message = rec
        if status == "ok":
            feats_rows.append(json.loads(feats))
            positions_ok.append(pos)
        else:
            error_rows.append(
                {
                    "case": case_id,
                    "image": row.get("image"),
                    "mask": row.get("mask"),
                    "stage": stage,
                    "error": error,
                    "message": message,
                }
            )
    if cohort_errors is not None and len(cohort_errors):
        for r in cohort_errors.itertuples():
            error_rows.append(
                {
                    "case": str(r.case),
                    "image": None,
                    "mask": None,
                    "stage": "cohort",
                    "error": r.error,
                    "message": r.message,
                }
            )
    errors = pd.DataFrame(
        error_rows, columns=["case", "image", "mask", "stage", "error", "message"]
    )
    F = pd.DataFrame(feats_rows)
    out = table.iloc[positions_ok].reset_index(drop=True)
    clash = [c for c in F.columns if c in out.columns]
    if clash:
        F = F.rename(columns={c: f"feature_{c}" for c in clash})
    out = pd.concat([out, F], axis=1)
    if not interrupted:
        _atomic_csv(out, output)
        if len(errors):
            _atomic_csv(errors, errors_path)
        elif errors_path.exists():
            errors_path.unlink()
    n_failed = len({r["case"] for r in error_rows})
    return ExtractResult(
        features=out,
        errors=errors,
        n_cases=len(table),
        n_computed=computed,
        n_reused=reused,
        n_failed=n_failed,
        output=output,
        errors_path=errors_path,
        store_path=store_path,
        settings_hash=settings_hash,
        interrupted=interrupted,
        seconds=time.perf_counter() - t_start,
        notes=notes,
    )
