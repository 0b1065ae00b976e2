"""Medical-image input container, validation and preprocessing shared by all image estimators.

skrtl estimators take images in one of two forms:

* a numpy array: ``(n, H, W)`` grayscale or ``(n, H, W, C)`` channel-last 2-D images, or
  ``(n, D, H, W)`` volumes (for ``mode="2.5d"`` / ``"3d"``);
* an **image frame**: a :class:`pandas.DataFrame` built by :func:`make_image_frame` with one row
  per patient and columns ``image`` (one ndarray per cell, sizes may differ), and optionally
  ``mask``, ``spacing``, ``site`` and any other columns (clinical covariates, ...);
* a **file frame**: the same container with file paths in ``image`` / ``mask``, as
  :func:`skrtl.read_cohort` returns it (plus ``mask_label`` and ``series_uid`` columns). It is
  read lazily: :func:`read_image_frame` reads the headers (shape, spacing, pixel type) and
  each estimator loads a case when it needs it, batch by batch, so memory does not grow with
  the cohort.

The frame is the container that survives :class:`~sklearn.pipeline.Pipeline`,
:func:`~sklearn.model_selection.cross_validate` and
:class:`~sklearn.model_selection.GridSearchCV`: sklearn splits it by rows, so masks, spacing
and site labels always stay aligned with their images, at fit *and* predict time (metadata
routing cannot deliver side data to ``predict`` inside a scorer).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._cohort import LOADER_ATTR, is_lazy_frame, iter_cases
from ._io import read_header, select_label
from .utils import LRUCache, hash_array, is_missing_cell, is_path_cell

__all__ = [
    "IMAGE_FRAME_COLUMNS",
    "MAX_CHANNELS",
    "ImageInput",
    "case_cache_info",
    "clear_case_cache",
    "first_case_layout",
    "make_image_frame",
    "read_image_frame",
]

IMAGE_FRAME_COLUMNS = ("image", "mask", "spacing", "site")
#: further columns of a cohort frame that describe how a case is read (not covariates)
_CASE_COLUMNS = ("mask_label", "series_uid")
_MODES = ("2d", "2.5d", "3d")
#: A trailing axis of at most this length is a channel axis of a 2-D image (grey, RGB, RGBA).
MAX_CHANNELS = 4


def make_image_frame(
    images,
    *,
    masks=None,
    spacing=None,
    sites=None,
    index=None,
    **extra_columns,
) -> pd.DataFrame:
    """Bundle images with their masks, spacing, site labels and other columns.

    Parameters
    ----------
    images : array-like of shape (n, ...) or sequence of ndarrays
        One image or volume per sample. Sizes may differ between samples.
    masks : array-like or sequence of ndarrays, optional
        Lesion / region masks with the same spatial shape as each image (non-zero = inside).
    spacing : array-like of shape (n, ndim) or (ndim,), optional
        Pixel / voxel spacing in mm, per sample (a single tuple is broadcast).
    sites : array-like of shape (n,), optional
        Acquisition site (hospital, scanner) of each sample: used by harmonizers.
    index : array-like, optional
        Row index (e.g. patient IDs).
    **extra_columns : array-like of shape (n,)
        Any further per-sample columns, e.g. clinical covariates.

    Returns
    -------
    pandas.DataFrame
        The image frame, accepted by every skrtl image estimator.

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import make_image_frame
    >>> X = make_image_frame(np.zeros((4, 32, 32)), masks=np.ones((4, 32, 32)), sites=list("aabb"))
    >>> list(X.columns)
    ['image', 'mask', 'site']
    """
    imgs = _as_list(images, "images")
    n = len(imgs)
    if n == 0:
        raise ValueError("images is empty: an image frame needs at least one image.")
    data: dict[str, object] = {"image": _object_column(imgs)}
    if masks is not None:
        mlist = _as_list(masks, "masks")
        if len(mlist) != n:
            raise ValueError(f"masks has {len(mlist)} entries but images has {n}.")
        data["mask"] = _object_column(mlist)
    if spacing is not None:
        sp = np.asarray(spacing, dtype=float)
        if sp.ndim == 1:
            sp = np.broadcast_to(sp, (n, sp.shape[0]))
        if sp.ndim != 2 or sp.shape[0] != n:
            raise ValueError(
                f"spacing must have shape (n, ndim) or (ndim,), got shape {np.shape(spacing)!r} "
                f"for n={n} images."
            )
        data["spacing"] = _object_column([tuple(float(v) for v in row) for row in sp])
    if sites is not None:
        s = np.asarray(sites)
        if s.shape != (n,):
            raise ValueError(f"sites must have shape ({n},), got {s.shape!r}.")
        data["site"] = s
    for key, val in extra_columns.items():
        val = np.asarray(val)
        if val.shape[:1] != (n,):
            raise ValueError(f"column {key!r} must have {n} rows, got shape {val.shape!r}.")
        data[key] = list(val) if val.ndim > 1 else val
    return pd.DataFrame(data, index=index)


def _object_column(items: list) -> np.ndarray:
    col = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        col[i] = item
    return col


def _as_list(obj, name: str) -> list:
    if isinstance(obj, pd.Series):
        return list(obj.to_numpy())
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return list(obj)
        return [obj[i] for i in range(obj.shape[0])] if obj.ndim >= 1 else []
    if isinstance(obj, Sequence):
        return list(obj)
    raise TypeError(f"{name} must be an array or a sequence of arrays, got {type(obj).__name__}.")


@dataclass
class ImageInput:
    """Validated image input: sequences aligned by sample.

    For an in-memory frame or array, ``images`` and ``masks`` are lists of arrays. For a
    **file frame** (:func:`skrtl.read_cohort`: image / mask cells are paths) they are lazy
    sequences: ``images[i]`` loads case ``i`` through :func:`skrtl.load_case` (label selected,
    geometry checked, validated like an in-memory image) and ``masks[i]`` gives the same
    case's mask without loading it again; nothing else of the cohort is held in memory.
    Shapes, spacing and raw dtypes of a file frame come from the file headers, so that
    fit-time checks read no pixels.

    Attributes
    ----------
    images : list of ndarray or lazy sequence
        Float32 arrays, ``(H, W)``, ``(H, W, C)`` or ``(D, H, W)``.
    masks : list of ndarray of bool, lazy sequence, or None
    spacing : ndarray of shape (n, ndim) or None
    sites : ndarray of shape (n,) or None
    extra : pandas.DataFrame
        The frame's other columns (empty for array input).
    dtypes : list of numpy dtype
        dtype of each image as the user gave it (before the float32 conversion; for files,
        the stored pixel type), which the ``"auto"`` intensity rule reads.
    shapes : list of tuple
        Shape of each image (from the header for files).
    keys : list of bytes or None
        Content identity of each case of a file frame (file paths, sizes, modification times,
        label and reader settings), used as cache keys instead of the pixels; ``None`` for
        in-memory input.
    index : pandas.Index or None
        Row labels of a frame (case identifiers), for messages.
    """

    images: Sequence
    masks: Sequence | None = None
    spacing: np.ndarray | None = None
    sites: np.ndarray | None = None
    extra: pd.DataFrame = field(default_factory=pd.DataFrame)
    dtypes: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    keys: list | None = None
    index: pd.Index | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def lazy(self) -> bool:
        """Whether the images are loaded from files on access."""
        return isinstance(self.images, _LazyImages)

    def dtype(self, i: int):
        """Raw dtype of image ``i`` (None when unknown)."""
        return self.dtypes[i] if i < len(self.dtypes) else None

    def shape(self, i: int) -> tuple:
        """Shape of image ``i`` without loading it."""
        if i < len(self.shapes):
            return self.shapes[i]
        return tuple(self.images[i].shape)

    def has_mask(self, i: int) -> bool:
        """Whether sample ``i`` has a mask (without loading it)."""
        if self.masks is None:
            return False
        if isinstance(self.masks, _LazyMasks):
            return bool(self.masks.present[int(i)])
        return self.masks[i] is not None

    def case_name(self, i: int) -> str:
        """``"case 'P007'"`` for a frame row, ``"image 7"`` otherwise."""
        if self.index is not None and not isinstance(self.index, pd.RangeIndex):
            return f"case {self.index[i]!r}"
        return f"image {i}"

    def nbytes_estimate(self) -> int:
        """Bytes the images would take in memory as float32 (from the shapes)."""
        return int(sum(4 * int(np.prod(self.shape(i))) for i in range(len(self))))


# --------------------------------------------------------------------------------------------
# file frames: headers now, pixels case by case
# --------------------------------------------------------------------------------------------
#: headers of image files, keyed by file identity (path, size, modification time) and reader
#: settings: a cross-validation reads each header once
_HEADERS = LRUCache(max_items=65536)

#: stored pixel types (SimpleITK names) -> numpy dtypes, for the "auto" intensity rule
_PIXEL_TYPES = {
    "8-bit unsigned integer": np.uint8,
    "8-bit signed integer": np.int8,
    "16-bit unsigned integer": np.uint16,
    "16-bit signed integer": np.int16,
    "32-bit unsigned integer": np.uint32,
    "32-bit signed integer": np.int32,
    "64-bit unsigned integer": np.uint64,
    "64-bit signed integer": np.int64,
    "32-bit float": np.float32,
    "64-bit float": np.float64,
}
_DEFAULT_LOADER = {"orientation": "LPS", "geometry_tolerance": 1e-3, "resample_mask": False}


def _file_identity(path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (os.fspath(path), None, None)
    return (os.path.realpath(path), int(st.st_size), int(st.st_mtime_ns))


def _header(path, series_uid, orientation):
    key = (_file_identity(path), series_uid, orientation)
    head = _HEADERS.get(key)
    if head is None:
        head = read_header(path, series_uid=series_uid, orientation=orientation)
        _HEADERS.put(key, head)
    return head


def _header_dtype(head):
    """numpy dtype of the stored pixels (float32 when unknown)."""
    name = str(head.meta.get("stored_pixel_type", "")).replace("vector of ", "")
    return np.dtype(_PIXEL_TYPES.get(name, np.float32))


def _cell(cols: dict, name: str, i: int):
    return cols[name][i] if name in cols else None


def _header_layout_error(head, case: str, mode: str, name: str) -> str | None:
    """Why a file of this header cannot be read with ``mode`` (None when it can)."""
    layout, shape = head.layout, tuple(head.shape)
    where = f"{case} ({head.path!r})"
    if layout.startswith("t"):
        return (
            f"{where} is a multi-frame clip of shape {shape!r}; {name} takes one image per case. "
            "Choose a frame (skrtl.read_image(path, frame=k)) and save it, or list frames as "
            "cases."
        )
    if mode == "2d" and layout == "zyx":
        return (
            f"{where} is a volume (z, y, x) = {shape!r}, but mode='2d' takes 2-D images. Use "
            "mode='2.5d' or mode='3d' for volumes, or put skrtl.LesionCropper(mode='2d') first "
            "in the pipeline to take the lesion's axial slice."
        )
    if mode != "2d" and layout != "zyx":
        return (
            f"{where} is a 2-D image of shape {shape!r}, but mode={mode!r} takes volumes "
            "(z, y, x). Use mode='2d' for 2-D images."
        )
    if layout == "yxc" and shape[-1] > MAX_CHANNELS:
        return f"{where} has {shape[-1]} channels; at most {MAX_CHANNELS} are taken."
    return None


def _cell_identity(cell):
    """Identity of an image / mask cell: the file's, or a hash of an in-memory array."""
    if is_path_cell(cell):
        return _file_identity(cell)
    if cell is None or is_missing_cell(cell):
        return None
    h = hashlib.blake2b(digest_size=20)
    hash_array(h, np.asarray(cell))
    return ("array", h.hexdigest())


def _case_key(cols: dict, i: int, label, loader: dict) -> bytes:
    parts = [
        _cell_identity(cols["image"][i]),
        _cell_identity(_cell(cols, "mask", i)),
        repr(_cell(cols, "mask_label", i)),
        repr(label),
        _cell(cols, "series_uid", i),
        repr(_cell(cols, "spacing", i)) if not is_path_cell(cols["image"][i]) else None,
        tuple(sorted(loader.items())),
    ]
    return hashlib.blake2b(repr(parts).encode(), digest_size=20).digest()


def _case_nbytes(value) -> int:
    img, mask = value
    return int(img.nbytes) + (int(mask.nbytes) if mask is not None else 0)


#: decoded file cases (image, label-selected mask), bounded in bytes: repeated passes over a
#: small cohort (cross-validation folds, several estimators) decode each file once, while a
#: large cohort keeps a constant memory footprint
_CASES = LRUCache(max_bytes=256 * 2**20, sizeof=_case_nbytes)


def clear_case_cache() -> None:
    """Empty the process-wide cache of decoded file cases (see :func:`case_cache_info`)."""
    _CASES.clear()


def case_cache_info(max_mb: float | None = None) -> dict:
    """Statistics of the process-wide cache of decoded file cases, optionally resizing it.

    Estimators read the cases of a file frame (:func:`skrtl.read_cohort`) one at a time; the
    decoded image and mask of each case are kept in a least-recently-used cache bounded in
    bytes (256 MiB by default), keyed by the files' identity (path, size, modification time),
    the label and the reader settings. Repeated passes over a small cohort then decode each
    file once; a cohort larger than the bound costs at most the bound in memory. ``max_mb=0``
    turns the cache off.

    Parameters
    ----------
    max_mb : float, optional
        New bound in MiB.

    Returns
    -------
    dict
        ``entries``, ``bytes``, ``max_bytes``, ``hits`` and ``misses``.
    """
    if max_mb is not None:
        if isinstance(max_mb, bool) or not isinstance(max_mb, int | float) or max_mb < 0:
            raise ValueError(f"max_mb must be a non-negative number, got {max_mb!r}.")
        _CASES.resize(max_bytes=int(max_mb * 2**20))
    info = _CASES.info()
    return {k: info[k] for k in ("entries", "bytes", "max_bytes", "hits", "misses")}


class _CaseLoader:
    """Loads the cases of a file frame on demand, keeping only the last one.

    Decoded file cases also go to the bounded process-wide case cache (a hit returns copies,
    so that nothing downstream can change the cached arrays).
    """

    def __init__(self, frame: pd.DataFrame, *, mode, label, loader, estimator_name, names, keys):
        self._frame = frame
        self._mode = mode
        self._label = label
        self._loader = loader
        self._name = estimator_name
        self._names = names
        self._keys = keys
        self._paths = [is_path_cell(c) for c in frame["image"].to_numpy()]
        self._lock = threading.Lock()
        self._last: tuple | None = None

    def __len__(self) -> int:
        return len(self._frame)

    def _decode(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        key = self._keys[i] if self._paths[i] else None
        if key is not None:
            hit = _CASES.get(key)
            if hit is not None:
                img, mask = hit
                return img.copy(), (None if mask is None else mask.copy())
        case = next(
            iter_cases(self._frame, rows=[i], label=self._label, mode=self._mode, **self._loader)
        )
        img, mask = case.image.array, case.mask
        if key is not None:
            max_bytes = _CASES.max_bytes
            if max_bytes is None or _case_nbytes((img, mask)) <= max_bytes:
                _CASES.put(key, (img.copy(), None if mask is None else mask.copy()))
        return img, mask

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            if self._last is not None and self._last[0] == i:
                return self._last[1], self._last[2]
            try:
                img, mask = self._decode(i)
                img = _check_image(img, i, self._mode, self._name)
                img = img.astype(np.float32, copy=False)
            except Exception as exc:
                exc.add_note(f"(while {self._name} loaded {self._names[i]}, row {i})")
                raise
            self._last = (i, img, mask)
            return img, mask


class _LazyImages(Sequence):
    """``images[i]`` of a file frame: loaded (and validated) on access."""

    def __init__(self, loader: _CaseLoader):
        self._loader = loader

    def __len__(self) -> int:
        return len(self._loader)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._loader.load(int(i))[0]


class _LazyMasks(_LazyImages):
    """``masks[i]`` of a file frame: the mask of the case loaded with ``images[i]``."""

    def __init__(self, loader: _CaseLoader, present: np.ndarray):
        super().__init__(loader)
        self.present = present

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not self.present[int(i)]:
            return None
        return self._loader.load(int(i))[1]


def _read_file_frame(X: pd.DataFrame, *, mode, label, require_masks, estimator_name) -> ImageInput:
    """An :class:`ImageInput` of a frame with path cells: headers read now, pixels lazily."""
    loader = dict(_DEFAULT_LOADER)
    loader.update(X.attrs.get(LOADER_ATTR) or {})
    cols = {
        c: X[c].to_numpy()
        for c in ("image", "mask", "mask_label", "series_uid", "spacing")
        if c in X.columns
    }
    names = [
        f"case {v!r}" if not isinstance(X.index, pd.RangeIndex) else f"image {i}"
        for i, v in enumerate(X.index)
    ]
    shapes, dtypes, spacings, keys, problems = [], [], [], [], []
    for i in range(len(X)):
        cell = cols["image"][i]
        keys.append(_case_key(cols, i, label, loader))
        if is_missing_cell(cell):
            problems.append(f"{names[i]}: the image cell is empty")
            shapes.append(None), dtypes.append(None), spacings.append(None)
            continue
        if not is_path_cell(cell):  # an in-memory cell in a file frame
            arr = _check_image(cell, i, mode, estimator_name)
            shapes.append(tuple(arr.shape))
            dtypes.append(arr.dtype)
            sp = _cell(cols, "spacing", i)
            spacings.append(None if is_missing_cell(sp) else tuple(float(v) for v in sp))
            continue
        try:
            head = _header(cell, _cell(cols, "series_uid", i), loader["orientation"])
        except Exception as exc:
            problems.append(f"{names[i]}: {str(exc).splitlines()[0]}")
            shapes.append(None), dtypes.append(None), spacings.append(None)
            continue
        why = _header_layout_error(head, names[i], mode, estimator_name)
        if why is not None:
            problems.append(why)
        shapes.append(tuple(int(s) for s in head.shape))
        dtypes.append(_header_dtype(head))
        spacings.append(tuple(float(v) for v in head.spacing))
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"{estimator_name} cannot read {len(problems)} of {len(X)} cases of the image "
            "frame:\n  - " + "\n  - ".join(problems[:10]) + more + "\nFix or drop those rows "
            "(skrtl.read_cohort(..., errors='drop') drops unreadable rows with a report)."
        )
    masks = None
    if "mask" in cols:
        present = np.asarray([not is_missing_cell(m) for m in cols["mask"]], dtype=bool)
        if present.any():
            masks = present
    if require_masks and (masks is None or not masks.all()):
        raise ValueError(
            f"{estimator_name} needs a mask for every case; the image frame has rows without "
            "one (a 'mask' column with a path per row: skrtl.read_cohort(..., mask='mask'))."
        )
    spacing = None
    if "spacing" in cols and all(not is_missing_cell(s) for s in cols["spacing"]):
        spacing = _spacing_array([tuple(s) for s in cols["spacing"]])
    elif all(s is not None for s in spacings):
        spacing = _spacing_array(spacings)
    case_loader = _CaseLoader(
        X,
        mode=mode,
        label=label,
        loader=loader,
        estimator_name=estimator_name,
        names=names,
        keys=keys,
    )
    return ImageInput(
        images=_LazyImages(case_loader),
        masks=None if masks is None else _LazyMasks(case_loader, masks),
        spacing=spacing,
        sites=X["site"].to_numpy() if "site" in X.columns else None,
        extra=_extra_columns(X),
        dtypes=dtypes,
        shapes=shapes,
        keys=keys,
        index=X.index,
    )


def first_case_layout(X) -> str | None:
    """Layout (``"zyx"``, ``"yx"``, ``"yxc"``, ...) of the first case of a file frame, from its
    header; ``None`` when ``X`` is not a file frame."""
    if not (isinstance(X, pd.DataFrame) and "image" in X.columns and is_lazy_frame(X)):
        return None
    loader = dict(_DEFAULT_LOADER)
    loader.update(X.attrs.get(LOADER_ATTR) or {})
    uids = X["series_uid"].to_numpy() if "series_uid" in X.columns else [None] * len(X)
    for cell, uid in zip(X["image"].to_numpy(), uids):
        if is_path_cell(cell):
            return _header(cell, uid, loader["orientation"]).layout
    return None  # pragma: no cover - is_lazy_frame saw a path


def _spacing_array(rows: list) -> np.ndarray | None:
    if len({len(r) for r in rows}) != 1:
        return None  # 2-D and 3-D cases mixed: no common spacing matrix
    return np.asarray(rows, dtype=float)


def _extra_columns(X: pd.DataFrame) -> pd.DataFrame:
    own = set(IMAGE_FRAME_COLUMNS) | set(_CASE_COLUMNS)
    return X.drop(columns=[c for c in X.columns if c in own])


# --------------------------------------------------------------------------------------------
# masks of in-memory frames: the label rule of skrtl.select_label
# --------------------------------------------------------------------------------------------
def _row_label(cell):
    """A ``mask_label`` cell as an int, a tuple of ints or None."""
    if is_missing_cell(cell):
        return None
    if isinstance(cell, str):
        parts = [v for v in cell.replace(";", ",").split(",") if v.strip()]
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            raise ValueError(f"mask_label {cell!r} is not an integer label.") from None
    elif isinstance(cell, Sequence | np.ndarray):
        vals = [float(v) for v in cell]
    else:
        vals = [float(cell)]
    if not vals or any(not v.is_integer() for v in vals):
        raise ValueError(f"mask_label {cell!r} must be a positive integer label.")
    ints = tuple(int(v) for v in vals)
    return ints[0] if len(ints) == 1 else ints


def _effective_label(row_cell, label, name: str):
    row = _row_label(row_cell)
    if row is not None and label is not None and row != label:
        raise ValueError(
            f"{name} has mask_label={row!r} but label={label!r} was passed; use one of them."
        )
    return row if row is not None else label


def read_image_frame(
    X,
    *,
    mode: str = "2d",
    require_masks: bool = False,
    label=None,
    estimator_name: str = "estimator",
) -> ImageInput:
    """Validate image input (array, image frame or file frame) and return an :class:`ImageInput`.

    Parameters
    ----------
    X : ndarray or pandas.DataFrame
        See the module documentation for accepted forms. A frame whose ``image`` cells are
        file paths (:func:`skrtl.read_cohort`) is read lazily: only headers now, each case's
        pixels when ``images[i]`` is accessed.
    mode : {"2d", "2.5d", "3d"}
        ``"2d"``: images are ``(H, W)`` or ``(H, W, C)``; otherwise volumes ``(D, H, W)``.
    require_masks : bool
        Raise if masks are missing.
    label : int, sequence of int or None
        Structure of multi-label masks, for rows without a ``mask_label`` value (see
        :func:`skrtl.select_label`: ``None`` accepts masks with a single non-zero value and
        refuses several labels). A row whose ``mask_label`` differs from ``label`` raises.
    estimator_name : str
        Used in error messages.

    Raises
    ------
    ValueError
        On NaN/inf values, wrong dimensionality, mask shape mismatch, empty masks, several
        labels in a mask without ``label``, or unreadable files (every such case listed).

    Notes
    -----
    **One mask rule.** Every mask -- a path or an array, in every estimator -- goes through
    :func:`skrtl.select_label`: a mask with a single non-zero value (0/1, 0/255, boolean) is
    used as it is; a multi-label mask needs a label (``label=`` or the frame's
    ``mask_label`` column) and a mask with non-integer values (a probability map) is refused.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if isinstance(X, pd.DataFrame) and "image" in X.columns and is_lazy_frame(X):
        return _read_file_frame(
            X, mode=mode, label=label, require_masks=require_masks, estimator_name=estimator_name
        )
    masks = spacing = sites = index = row_labels = None
    extra = pd.DataFrame()
    if isinstance(X, pd.DataFrame):
        if "image" not in X.columns:
            raise ValueError(
                f"{estimator_name} got a DataFrame without an 'image' column (columns: "
                f"{list(X.columns)[:8]!r}). Build the input with skrtl.make_image_frame(images, "
                "masks=..., spacing=..., sites=...), or read a cohort table of files with "
                "skrtl.read_cohort."
            )
        images = list(X["image"].to_numpy())
        if "mask" in X.columns:
            masks = list(X["mask"].to_numpy())
        if "mask_label" in X.columns:
            row_labels = X["mask_label"].to_numpy()
        if "spacing" in X.columns:
            spacing = np.asarray([tuple(s) for s in X["spacing"].to_numpy()], dtype=float)
        if "site" in X.columns:
            sites = X["site"].to_numpy()
        extra = _extra_columns(X)
        index = X.index
    elif isinstance(X, list | tuple) and len(X) and all(isinstance(v, np.ndarray) for v in X):
        images = list(X)  # a sequence of images, sizes may differ
    elif isinstance(X, np.ndarray | list | tuple):
        try:
            arr = np.asarray(X) if not isinstance(X, np.ndarray) else X
        except ValueError as exc:
            raise ValueError(
                f"{estimator_name} could not read X as an array of images ({exc}). Images of "
                "different sizes go in an image frame: skrtl.make_image_frame(list_of_images, "
                "masks=...)."
            ) from exc
        if arr.dtype == object:
            images = list(arr)
        else:
            want = (3, 4) if mode == "2d" else (4,)
            if arr.ndim not in want:
                shape_doc = "(n, H, W) or (n, H, W, C)" if mode == "2d" else "(n, D, H, W) volumes"
                hint = (
                    " A 2-D array looks like a feature matrix, not images."
                    if arr.ndim == 2
                    else ""
                )
                raise ValueError(
                    f"{estimator_name} with mode={mode!r} expects images of shape {shape_doc}, "
                    f"got an array of shape {arr.shape!r}.{hint} Use mode='3d' or '2.5d' for "
                    "volumes, or skrtl.make_image_frame for images of different sizes."
                )
            images = [arr[i] for i in range(arr.shape[0])]
    else:
        raise TypeError(
            f"{estimator_name} expects a numpy array of images or an image frame (DataFrame "
            f"from skrtl.make_image_frame or skrtl.read_cohort), got {type(X).__name__}."
        )
    if len(images) == 0:
        raise ValueError(f"{estimator_name} got 0 images; at least one is required.")
    out_images = []
    dtypes = []
    for i, img in enumerate(images):
        img = _check_image(img, i, mode, estimator_name)
        dtypes.append(img.dtype)
        out_images.append(img.astype(np.float32, copy=False))
    if masks is not None:
        out_masks = []
        for i, (img, m) in enumerate(zip(out_images, masks)):
            if m is None or (isinstance(m, float) and np.isnan(m)):
                out_masks.append(None)
                continue
            m = np.asarray(m)
            spatial = img.shape[:2] if (mode == "2d") else img.shape
            if m.shape != spatial:
                raise ValueError(
                    f"mask {i} has shape {m.shape!r} but its image's spatial shape is "
                    f"{spatial!r}; masks must match their image pixel for pixel."
                )
            name = f"mask {i}"
            lab = _effective_label(None if row_labels is None else row_labels[i], label, name)
            try:
                m = select_label(m, lab, name=name)
            except ValueError as exc:
                if "is empty" in str(exc):
                    raise ValueError(
                        f"mask {i} is empty (no non-zero pixel): masked pooling and "
                        "lesion-centred slicing need at least one lesion pixel. Fix or drop "
                        "that sample."
                    ) from exc
                raise
            out_masks.append(m)
        masks = out_masks
        if all(m is None for m in masks):
            masks = None
    if require_masks and (masks is None or any(m is None for m in masks)):
        raise ValueError(
            f"{estimator_name} needs a mask for every image: pass "
            "X=skrtl.make_image_frame(images, masks=masks)."
        )
    return ImageInput(
        images=out_images,
        masks=masks,
        spacing=spacing,
        sites=sites,
        extra=extra,
        dtypes=dtypes,
        shapes=[tuple(im.shape) for im in out_images],
        index=index,
    )


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _layout_hint(shape: tuple) -> str:
    """Why a 3-D array is not a channel-last 2-D image, and what to do instead."""
    if shape[0] <= MAX_CHANNELS:
        return (
            f"it looks channel-first (C, H, W) with C={shape[0]}: skrtl takes channel-last "
            "images, so move the channels last (np.moveaxis(image, 0, -1); for an array of "
            "images np.moveaxis(X, 1, -1))"
        )
    return (
        f"a last axis of {shape[-1]} is no channel axis (at most {MAX_CHANNELS} channels: grey, "
        "RGB, RGBA), so this looks like a volume (D, H, W): use mode='2.5d' or mode='3d' for "
        "volumes"
    )


def _check_image(img, i: int, mode: str, estimator_name: str) -> np.ndarray:
    """One image as a numeric ndarray of the layout ``mode`` takes, or a clear error."""
    img = np.asarray(img)
    if np.iscomplexobj(img):
        raise ValueError(
            f"image {i} is complex ({img.dtype}); {estimator_name} takes real intensities. Pass "
            "the magnitude (np.abs(image)) or another real part explicitly."
        )
    if img.dtype == object or not (np.issubdtype(img.dtype, np.number) or img.dtype == bool):
        raise ValueError(
            f"image {i} has non-numeric dtype {img.dtype!r}; images must be numeric arrays "
            "(file paths are read with skrtl.read_cohort)."
        )
    if mode == "2d":
        if img.ndim not in (2, 3):
            raise ValueError(
                f"image {i} has shape {img.shape!r}; mode='2d' needs (H, W) or channel-last "
                f"(H, W, C) with C <= {MAX_CHANNELS}. For volumes use mode='2.5d' or mode='3d'."
            )
        if img.ndim == 3 and img.shape[-1] > MAX_CHANNELS:
            raise ValueError(
                f"image {i} has shape {img.shape!r}, which mode='2d' does not take: "
                f"{_layout_hint(img.shape)}."
            )
    elif img.ndim != 3:
        raise ValueError(
            f"image {i} has shape {img.shape!r}; mode={mode!r} needs a volume (D, H, W)."
        )
    if img.dtype.kind == "f":
        finite = np.isfinite(img)
        if not finite.all():
            raise ValueError(
                f"image {i} contains NaN or infinite values ({int((~finite).sum())} pixels); "
                "replace them (e.g. np.nan_to_num) or drop the sample before calling "
                f"{estimator_name}."
            )
        peak = float(np.abs(img).max()) if img.size else 0.0
        if peak > _FLOAT32_MAX:
            raise ValueError(
                f"image {i} has finite values up to {peak:.3g}, beyond the float32 range "
                f"(+-{_FLOAT32_MAX:.3g}) the networks compute in; rescale the image first."
            )
    return img
