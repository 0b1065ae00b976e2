"""Cohort tables: image frames whose images and masks are file paths, loaded case by case.

A radiomics cohort is usually a CSV with one row per case: an image path (a DICOM series folder
or a NIfTI / NRRD / MHA file), a mask path, and clinical columns -- the layout of PyRadiomics'
batch mode (``Image``, ``Mask`` headers). :func:`read_cohort` turns it into an **image frame**
(the container of :func:`skrtl.make_image_frame`) whose ``image`` and ``mask`` cells are
absolute paths; nothing is loaded until a case is needed. :func:`load_case` and
:func:`iter_cases` load cases one at a time, from path cells and in-memory arrays alike, so the
same code serves both kinds of frames and memory does not grow with the cohort.

Columns of a cohort frame (besides every clinical column, passed through unchanged):

``image``
    Absolute path of the image (file or DICOM series folder).
``mask``
    Absolute path of the mask, or ``None`` (only when the table has a mask column).
``mask_label``
    Per-row label of the structure to use in the mask (only when ``label`` is given).
``series_uid``
    Per-row SeriesInstanceUID (only when ``series_uid`` names a column).
``spacing``
    Voxel spacing from the image header, array-axis order in mm (when headers are validated).
``site``
    Acquisition site (when ``site`` names a column, or the table has a ``site`` column).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import (
    MaskGeometryError,
    MedicalImage,
    compare_geometry,
    read_header,
    read_image,
    read_mask,
    select_label,
)
from .utils import is_missing_cell, is_path_cell

__all__ = [
    "COHORT_COLUMNS",
    "Case",
    "CohortError",
    "is_lazy_frame",
    "iter_cases",
    "load_case",
    "read_cohort",
]

#: Columns a cohort frame may carry that are not clinical covariates.
COHORT_COLUMNS = ("image", "mask", "mask_label", "series_uid", "spacing", "site")
_VALIDATE = ("none", "exists", "header", "full")
#: frame attribute (``frame.attrs``) with the reader settings of :func:`read_cohort`
#: (orientation, geometry tolerance, mask resampling), used when cases are loaded later
LOADER_ATTR = "skrtl_loader"
_PYRADIOMICS_HEADERS = {"image": "Image", "mask": "Mask"}


class CohortError(ValueError):
    """Some rows of a cohort table are unusable; ``errors`` lists every one of them.

    Attributes
    ----------
    errors : pandas.DataFrame
        One row per problem: ``case`` (row index), ``column``, ``path``, ``error`` (exception
        type) and ``message``.
    """

    def __init__(self, message: str, errors: pd.DataFrame):
        super().__init__(message)
        self.errors = errors


_is_missing = is_missing_cell
_is_path = is_path_cell


def is_lazy_frame(X) -> bool:
    """Whether ``X`` is an image frame with file paths (not arrays) in its ``image`` column."""
    if not isinstance(X, pd.DataFrame) or "image" not in X.columns or not len(X):
        return False
    return any(_is_path(c) for c in X["image"].to_numpy())


def _resolve_path(cell, base: Path) -> str | None:
    if _is_missing(cell):
        return None
    if not _is_path(cell):
        raise TypeError(
            f"read_cohort expects file paths in the image and mask columns, got a "
            f"{type(cell).__name__}; for in-memory arrays use skrtl.make_image_frame."
        )
    p = Path(os.path.expanduser(str(cell).strip()))
    if not p.is_absolute():
        p = base / p
    return os.path.normpath(str(p))


def _find_column(df: pd.DataFrame, name, role: str, *, required: bool) -> str | None:
    if name is None:
        return None
    if name in df.columns:
        return name
    alt = _PYRADIOMICS_HEADERS.get(role)
    if name == role and alt in df.columns:  # PyRadiomics batch headers
        return alt
    if required:
        raise ValueError(
            f"{role}={name!r} is not a column of the cohort table; columns are "
            f"{list(df.columns)!r}. Pass {role}=<column name> (PyRadiomics' "
            f"{_PYRADIOMICS_HEADERS.get(role, role)!r} header is also recognised)."
        )
    return None


def _parse_label(value, *, case) -> int | tuple | None:
    """A per-row label cell -> int, tuple of ints or None."""
    if _is_missing(value):
        return None
    if isinstance(value, str):
        parts = [v for v in value.replace(";", ",").split(",") if v.strip()]
        try:
            nums = [float(v) for v in parts]
        except ValueError:
            raise ValueError(f"label {value!r} of case {case!r} is not an integer.") from None
    elif isinstance(value, Sequence | np.ndarray):
        nums = [float(v) for v in value]
    else:
        nums = [float(value)]
    if not nums or any(not v.is_integer() or v <= 0 for v in nums):
        raise ValueError(
            f"label {value!r} of case {case!r} must be a positive integer (0 is background)."
        )
    ints = tuple(int(v) for v in nums)
    return ints[0] if len(ints) == 1 else ints


def read_cohort(
    source,
    *,
    image: str = "image",
    mask: str | None = "mask",
    label=None,
    site: str | None = None,
    id: str | None = None,
    series_uid: str | None = None,
    base_dir=None,
    validate: str = "header",
    errors: str = "raise",
    geometry_tolerance: float = 1e-3,
    resample_mask: bool = False,
    orientation: str | None = "LPS",
    sep: str | None = None,
    verbose: int = 0,
) -> pd.DataFrame:
    """Read a cohort table (CSV or DataFrame) into an image frame of file paths.

    Parameters
    ----------
    source : str, path or pandas.DataFrame
        A CSV (``.tsv`` / ``.tab``: tab-separated) with one row per case, or a DataFrame.
    image : str, default="image"
        Column of image paths (files or DICOM series folders). PyRadiomics' ``Image`` header
        is used when there is no ``image`` column.
    mask : str or None, default="mask"
        Column of mask paths (``Mask`` also recognised). With the default, a table without a
        mask column gives a frame without masks; ``None`` ignores masks.
    label : int, sequence of int, str or None, default=None
        Structure of the masks to use: an int (or a list of ints for their union) for every
        case, or the name of a column holding one label per row (PyRadiomics' batch ``Label``
        column: pass ``label="Label"``). Stored per row in column ``mask_label``. ``None``:
        each mask must hold a single non-zero value.
    site : str, optional
        Column with the acquisition site, copied to ``site`` (a ``site`` column is kept as it
        is).
    id : str, optional
        Column of unique case identifiers, used as the index.
    series_uid : str, optional
        Column of SeriesInstanceUIDs, for image folders that hold several DICOM series.
    base_dir : str or path, optional
        Folder relative paths are resolved against; default: the CSV's folder (the current
        directory for a DataFrame).
    validate : {"none", "exists", "header", "full"}, default="header"
        What is checked now (every problem of every row is collected before raising):
        ``"exists"``: the files exist; ``"header"``: also reads each image and mask header
        (format, DICOM series choice, geometry of mask vs image) and fills ``spacing``;
        ``"full"``: also loads every case once (labels present and non-empty), one case at a
        time, keeping nothing.
    errors : {"raise", "drop"}, default="raise"
        ``"raise"``: a :class:`CohortError` listing every bad row. ``"drop"``: drop those
        rows with a warning; the problems are in ``frame.attrs["cohort_errors"]``.
    geometry_tolerance : float, default=1e-3
        See :func:`skrtl.read_mask`.
    resample_mask : bool, default=False
        Accept masks whose grid differs from their image (they are resampled when loaded).
    orientation : str or None, default="LPS"
        Canonical orientation of volumes (see :func:`skrtl.read_image`).
    sep : str, optional
        CSV separator (default ``","``; tab for ``.tsv`` / ``.tab``).
    verbose : int, default=0
        1: progress bar while validating.

    Returns
    -------
    pandas.DataFrame
        An image frame (see the module documentation for its columns) accepted wherever an
        in-memory frame is; images are loaded by :func:`load_case` / :func:`iter_cases`.

    Raises
    ------
    CohortError
        Some rows are unusable (``errors="raise"``); ``exc.errors`` holds them all.
    ValueError
        A named column does not exist; duplicate ids.

    Examples
    --------
    >>> from skrtl import read_cohort
    >>> X = read_cohort("cohort.csv", label=1, site="hospital", id="patient")  # doctest: +SKIP
    >>> X.columns.tolist()  # doctest: +SKIP
    ['image', 'mask', 'mask_label', 'spacing', 'site', 'age', 'stage']
    """
    if validate not in _VALIDATE:
        raise ValueError(f"validate must be one of {_VALIDATE}, got {validate!r}.")
    if errors not in ("raise", "drop"):
        raise ValueError(f"errors must be 'raise' or 'drop', got {errors!r}.")
    if isinstance(source, pd.DataFrame):
        df = source.copy()
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    elif isinstance(source, str | os.PathLike):
        csv = Path(os.path.expanduser(os.fspath(source)))
        if not csv.is_file():
            raise FileNotFoundError(f"cohort table {os.fspath(source)!r} does not exist.")
        if sep is None:
            sep = "\t" if csv.suffix.lower() in (".tsv", ".tab") else ","
        df = pd.read_csv(csv, sep=sep)
        base = Path(base_dir) if base_dir is not None else csv.resolve().parent
    else:
        raise TypeError(
            f"source must be a CSV path or a pandas DataFrame, got {type(source).__name__}."
        )
    if df.empty:
        raise ValueError("the cohort table has no rows.")
    base = Path(os.path.expanduser(str(base)))
    img_col = _find_column(df, image, "image", required=True)
    mask_col = _find_column(df, mask, "mask", required=mask not in (None, "mask"))
    site_col = _find_column(df, site, "site", required=True)
    id_col = _find_column(df, id, "id", required=True)
    uid_col = _find_column(df, series_uid, "series_uid", required=True)
    label_col = None
    if isinstance(label, str):
        label_col = _find_column(df, label, "label", required=True)
    elif label is not None:
        _check_label_value(label)

    consumed = [c for c in (img_col, mask_col, site_col, id_col, uid_col, label_col) if c]
    out = pd.DataFrame(index=df.index)
    out["image"] = _object([_resolve_path(c, base) for c in df[img_col]])
    if mask_col is not None:
        out["mask"] = _object([_resolve_path(c, base) for c in df[mask_col]])
    problems: list[dict] = []
    if label_col is not None or label is not None:
        labels = []
        for case, value in zip(df.index, df[label_col] if label_col else [label] * len(df)):
            try:
                labels.append(_parse_label(value, case=case))
            except ValueError as exc:
                labels.append(None)
                problems.append(_problem(case, "mask_label", None, exc))
        out["mask_label"] = _object(labels)
    if uid_col is not None:
        out["series_uid"] = _object(
            [None if _is_missing(v) else str(v).strip() for v in df[uid_col]]
        )
    if site_col is not None:
        out["site"] = df[site_col].to_numpy()
    elif "site" in df.columns:
        out["site"] = df["site"].to_numpy()
        consumed.append("site")
    for col in df.columns:
        if col not in consumed and col not in out.columns:
            out[col] = df[col].to_numpy()
    if id_col is not None:
        ids = df[id_col]
        dup = ids[ids.duplicated(keep=False)]
        if len(dup):
            dups = sorted(set(dup.astype(str)))[:10]
            raise ValueError(
                f"id column {id_col!r} has duplicate values {dups!r}; case identifiers must be "
                "unique."
            )
        out.index = pd.Index(ids.to_numpy(), name=id_col)
    if label is None and "Label" in df.columns and mask_col is not None:
        out.attrs["label_hint"] = "Label"

    problems += _validate(
        out,
        level=validate,
        tolerance=geometry_tolerance,
        resample_mask=resample_mask,
        orientation=orientation,
        verbose=verbose,
    )
    if problems:
        table = pd.DataFrame(problems, columns=["case", "column", "path", "error", "message"])
        bad = list(dict.fromkeys(table["case"].tolist()))
        if errors == "raise":
            raise CohortError(_problem_report(table, len(out)), table)
        warnings.warn(
            f"read_cohort dropped {len(bad)} of {len(out)} cases:\n"
            + _problem_report(table, len(out), header=False),
            UserWarning,
            stacklevel=2,
        )
        out = out.drop(index=bad)
        out.attrs["cohort_errors"] = table
    out.attrs.pop("label_hint", None)
    first = [c for c in COHORT_COLUMNS if c in out.columns]
    out = out[first + [c for c in out.columns if c not in first]]
    # how the cases are read later (estimators load them lazily through iter_cases)
    out.attrs[LOADER_ATTR] = {
        "orientation": orientation,
        "geometry_tolerance": float(geometry_tolerance),
        "resample_mask": bool(resample_mask),
    }
    return out


def _check_label_value(label) -> None:
    items = label if isinstance(label, Sequence | np.ndarray) else [label]
    for lab in items:
        if isinstance(lab, bool) or not isinstance(lab, Integral | np.integer):
            raise TypeError(
                f"label must be an int, a list of ints or a column name, got {label!r}."
            )
        if int(lab) <= 0:
            raise ValueError(f"label must be a positive integer (0 is background), got {label!r}.")


def _object(items) -> np.ndarray:
    col = np.empty(len(items), dtype=object)
    for i, v in enumerate(items):
        col[i] = v
    return col


def _problem(case, column, path, exc: Exception) -> dict:
    return {
        "case": case,
        "column": column,
        "path": path,
        "error": type(exc).__name__,
        "message": str(exc),
    }


def _problem_report(table: pd.DataFrame, n: int, *, header: bool = True, limit: int = 50) -> str:
    n_bad = table["case"].nunique()
    lines = [f"{n_bad} of {n} cases of the cohort are unusable:"] if header else []
    for r in table.head(limit).itertuples():
        first = str(r.message).splitlines()[0]
        lines.append(f"  - case {r.case!r} [{r.column}]: {first}")
    if len(table) > limit:
        lines.append(f"  ... and {len(table) - limit} more (all of them in exc.errors).")
    if header:
        lines.append(
            "Fix those rows, or pass errors='drop' to continue without them (the problems are "
            "then in frame.attrs['cohort_errors'])."
        )
    return "\n".join(lines)


def _validate(frame, *, level, tolerance, resample_mask, orientation, verbose) -> list[dict]:
    if level == "none":
        return []
    problems: list[dict] = []
    spacings = [None] * len(frame)
    rows = range(len(frame))
    if verbose:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="checking cohort", unit="case")
    has_mask = "mask" in frame.columns
    hint = frame.attrs.get("label_hint")
    for i in rows:
        case = frame.index[i]
        img_path = frame["image"].iat[i]
        mask_path = frame["mask"].iat[i] if has_mask else None
        uid = frame["series_uid"].iat[i] if "series_uid" in frame.columns else None
        label = frame["mask_label"].iat[i] if "mask_label" in frame.columns else None
        if img_path is None:
            problems.append(
                _problem(case, "image", None, ValueError("no image path (empty cell)"))
            )
            continue
        ok = True
        for col, path in (("image", img_path), ("mask", mask_path)):
            if path is not None and not os.path.exists(path):
                problems.append(
                    _problem(case, col, path, FileNotFoundError(f"{col} {path!r} does not exist"))
                )
                ok = False
        if not ok or level == "exists":
            continue
        try:
            head = read_header(img_path, series_uid=uid, orientation=orientation)
            spacings[i] = head.spacing if head.spacing_known else None
        except Exception as exc:
            problems.append(_problem(case, "image", img_path, exc))
            continue
        if mask_path is not None:
            try:
                mhead = read_header(mask_path, orientation=orientation)
                diffs = compare_geometry(head, mhead, tolerance=tolerance)
                resamplable = resample_mask and head.spacing_known and mhead.spacing_known
                if diffs and not resamplable:
                    lines = "; ".join(
                        f"{k}: image {a!r} vs mask {b!r}" for k, (a, b) in diffs.items()
                    )
                    raise MaskGeometryError(
                        f"mask {mask_path!r} does not match image {img_path!r}: {lines}. Pass "
                        "resample_mask=True to resample masks onto their image grid.",
                        image_path=img_path,
                        mask_path=mask_path,
                        differences=diffs,
                    )
            except Exception as exc:
                problems.append(_problem(case, "mask", mask_path, exc))
                continue
        if level == "full":
            try:
                load_case(
                    img_path,
                    mask_path,
                    label=label,
                    series_uid=uid,
                    orientation=orientation,
                    geometry_tolerance=tolerance,
                    resample_mask=resample_mask,
                )
            except Exception as exc:
                msg = str(exc)
                if hint and "labels" in msg:
                    exc = type(exc)(
                        f"{msg} (the table has a {hint!r} column: pass label={hint!r} to use it)"
                    )
                problems.append(_problem(case, "mask" if mask_path else "image", mask_path, exc))
    if level in ("header", "full") and any(s is not None for s in spacings):
        frame["spacing"] = _object([None if s is None else tuple(s) for s in spacings])
    return problems


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def load_case(
    image,
    mask=None,
    *,
    label=None,
    series_uid: str | None = None,
    spacing=None,
    mode: str | None = None,
    orientation: str | None = "LPS",
    geometry_tolerance: float = 1e-3,
    resample_mask: bool = False,
) -> tuple[MedicalImage, np.ndarray | None]:
    """Load one case -- from files or from in-memory arrays -- as an image and a boolean mask.

    The single loader behind file and in-memory image frames: a path cell is read with
    :func:`skrtl.read_image` (and its mask with :func:`skrtl.read_mask`, geometry checked); an
    array cell is wrapped as it is (no reorientation), its mask label-selected and
    shape-checked.

    Parameters
    ----------
    image : str, path, ndarray or MedicalImage
    mask : str, path, ndarray or None
    label : int, sequence of int or None
        Structure of the mask (see :func:`skrtl.select_label`).
    series_uid : str, optional
        For an image folder holding several DICOM series.
    spacing : sequence of float, optional
        Spacing of an in-memory array (array-axis order, mm); ignored for files, which carry
        their own.
    mode : {"2d", "2.5d", "3d"}, optional
        Tells a ``(y, x, c)`` array from a ``(z, y, x)`` volume (in-memory arrays only).
    orientation, geometry_tolerance, resample_mask
        See :func:`skrtl.read_image` and :func:`skrtl.read_mask`.

    Returns
    -------
    image : MedicalImage
    mask : ndarray of bool or None
        Same spatial shape as ``image.array``.
    """
    if isinstance(image, MedicalImage):
        img = image
    elif _is_path(image):
        img = read_image(image, series_uid=series_uid, orientation=orientation)
    elif _is_missing(image):
        raise ValueError("the image cell is empty; every case needs an image.")
    else:
        layout = None
        if mode is not None:
            arr = np.asarray(image)
            layout = "zyx" if mode in ("2.5d", "3d") else ("yx" if arr.ndim == 2 else "yxc")
        img = MedicalImage.from_array(image, spacing=spacing, layout=layout)
    if _is_missing(mask):
        return img, None
    if _is_path(mask):
        if img.path is None:
            raise ValueError(
                f"the image is an in-memory array but its mask is a file ({os.fspath(mask)!r}): "
                "the mask's geometry cannot be checked against it. Give both as files, or "
                "both as arrays."
            )
        m = read_mask(
            mask,
            reference=img,
            label=label,
            geometry_tolerance=geometry_tolerance,
            resample=resample_mask,
        )
        return img, m
    name = "mask" if img.path is None else f"mask of {img.path!r}"
    m = select_label(np.asarray(mask), label, name=name)
    if m.shape != tuple(img.spatial_shape):
        raise ValueError(
            f"{name} has shape {m.shape!r} but the image's spatial shape is "
            f"{tuple(img.spatial_shape)!r}; masks must match their image voxel for voxel."
        )
    return img, m


@dataclass
class Case:
    """One loaded case of an image frame (see :func:`iter_cases`).

    Attributes
    ----------
    index : object
        Row label in the frame.
    position : int
        Row number.
    image : MedicalImage or None
        ``None`` when loading failed (``errors="return"``).
    mask : ndarray of bool or None
    error : Exception or None
        Why the case could not be loaded (``errors="return"``).
    """

    index: object
    position: int
    image: MedicalImage | None
    mask: np.ndarray | None
    error: Exception | None = None


def iter_cases(
    X: pd.DataFrame,
    rows=None,
    *,
    label=None,
    mode: str | None = None,
    orientation: str | None = "LPS",
    geometry_tolerance: float = 1e-3,
    resample_mask: bool = False,
    errors: str = "raise",
) -> Iterator[Case]:
    """Load the cases of an image frame one at a time (file paths or in-memory arrays).

    Parameters
    ----------
    X : pandas.DataFrame
        An image frame (:func:`read_cohort` or :func:`skrtl.make_image_frame`). Its
        ``mask``, ``mask_label``, ``series_uid`` and ``spacing`` columns are used when present.
    rows : sequence of int, optional
        Row positions to load (a batch); default: all rows.
    label : int, sequence of int or None
        Label for rows without a ``mask_label`` value. A row whose ``mask_label`` differs from
        an explicit ``label`` raises.
    mode, orientation, geometry_tolerance, resample_mask
        See :func:`load_case`.
    errors : {"raise", "return"}, default="raise"
        ``"return"``: a case that fails is yielded with ``image=None`` and ``error`` set, and
        the iteration goes on.

    Yields
    ------
    Case
    """
    if not isinstance(X, pd.DataFrame) or "image" not in X.columns:
        raise TypeError("iter_cases needs an image frame (a DataFrame with an 'image' column).")
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}.")
    positions = range(len(X)) if rows is None else [int(r) for r in rows]
    cols = {
        c: X[c].to_numpy()
        for c in ("image", "mask", "mask_label", "series_uid", "spacing")
        if c in X.columns
    }
    for pos in positions:
        index = X.index[pos]
        try:
            row_label = cols["mask_label"][pos] if "mask_label" in cols else None
            row_label = _parse_label(row_label, case=index)
            if row_label is not None and label is not None and row_label != label:
                raise ValueError(
                    f"case {index!r} has mask_label={row_label!r} but label={label!r} was "
                    "passed; use one of them."
                )
            sp = cols["spacing"][pos] if "spacing" in cols else None
            img, m = load_case(
                cols["image"][pos],
                cols["mask"][pos] if "mask" in cols else None,
                label=row_label if row_label is not None else label,
                series_uid=cols["series_uid"][pos] if "series_uid" in cols else None,
                spacing=None if _is_missing(sp) else sp,
                mode=mode,
                orientation=orientation,
                geometry_tolerance=geometry_tolerance,
                resample_mask=resample_mask,
            )
        except Exception as exc:
            if errors == "raise":
                raise
            yield Case(index=index, position=pos, image=None, mask=None, error=exc)
            continue
        yield Case(index=index, position=pos, image=img, mask=m)
