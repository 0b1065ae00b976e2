"""Medical-image input container, validation and preprocessing shared by all image estimators.

skrtl estimators take images in one of two forms:

* a numpy array: ``(n, H, W)`` grayscale or ``(n, H, W, C)`` channel-last 2-D images, or
  ``(n, D, H, W)`` volumes (for ``mode="2.5d"`` / ``"3d"``);
* an **image frame**: a :class:`pandas.DataFrame` built by :func:`make_image_frame` with one row
  per patient and columns ``image`` (one ndarray per cell, sizes may differ), and optionally
  ``mask``, ``spacing``, ``site`` and any other columns (clinical covariates, ...).

The frame is the container that survives :class:`~sklearn.pipeline.Pipeline`,
:func:`~sklearn.model_selection.cross_validate` and
:class:`~sklearn.model_selection.GridSearchCV`: sklearn splits it by rows, so masks, spacing
and site labels always stay aligned with their images, at fit *and* predict time (metadata
routing cannot deliver side data to ``predict`` inside a scorer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = [
    "IMAGE_FRAME_COLUMNS",
    "MAX_CHANNELS",
    "ImageInput",
    "make_image_frame",
    "read_image_frame",
]

IMAGE_FRAME_COLUMNS = ("image", "mask", "spacing", "site")
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
    """Validated image input: lists aligned by sample.

    Attributes
    ----------
    images : list of ndarray
        Float32 arrays, ``(H, W)``, ``(H, W, C)`` or ``(D, H, W)``.
    masks : list of ndarray of bool, or None
    spacing : ndarray of shape (n, ndim) or None
    sites : ndarray of shape (n,) or None
    extra : pandas.DataFrame
        The frame's other columns (empty for array input).
    dtypes : list of numpy dtype
        dtype of each image as the user gave it (before the float32 conversion), which the
        ``"auto"`` intensity rule reads.
    """

    images: list
    masks: list | None = None
    spacing: np.ndarray | None = None
    sites: np.ndarray | None = None
    extra: pd.DataFrame = field(default_factory=pd.DataFrame)
    dtypes: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def dtype(self, i: int):
        """Raw dtype of image ``i`` (None when unknown)."""
        return self.dtypes[i] if i < len(self.dtypes) else None


def read_image_frame(
    X,
    *,
    mode: str = "2d",
    require_masks: bool = False,
    estimator_name: str = "estimator",
) -> ImageInput:
    """Validate image input (array or image frame) and return an :class:`ImageInput`.

    Parameters
    ----------
    X : ndarray or pandas.DataFrame
        See the module documentation for accepted forms.
    mode : {"2d", "2.5d", "3d"}
        ``"2d"``: images are ``(H, W)`` or ``(H, W, C)``; otherwise volumes ``(D, H, W)``.
    require_masks : bool
        Raise if masks are missing.
    estimator_name : str
        Used in error messages.

    Raises
    ------
    ValueError
        On NaN/inf values, wrong dimensionality, mask shape mismatch or empty masks.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    masks = spacing = sites = None
    extra = pd.DataFrame()
    if isinstance(X, pd.DataFrame):
        if "image" not in X.columns:
            raise ValueError(
                f"{estimator_name} got a DataFrame without an 'image' column (columns: "
                f"{list(X.columns)[:8]!r}). Build the input with skrtl.make_image_frame(images, "
                "masks=..., spacing=..., sites=...)."
            )
        images = list(X["image"].to_numpy())
        if "mask" in X.columns:
            masks = list(X["mask"].to_numpy())
        if "spacing" in X.columns:
            spacing = np.asarray([tuple(s) for s in X["spacing"].to_numpy()], dtype=float)
        if "site" in X.columns:
            sites = X["site"].to_numpy()
        extra = X.drop(columns=[c for c in IMAGE_FRAME_COLUMNS if c in X.columns])
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
            f"from skrtl.make_image_frame), got {type(X).__name__}."
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
            m = m > 0
            if not m.any():
                raise ValueError(
                    f"mask {i} is empty (no non-zero pixel): masked pooling and lesion-centred "
                    "slicing need at least one lesion pixel. Fix or drop that sample."
                )
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
        images=out_images, masks=masks, spacing=spacing, sites=sites, extra=extra, dtypes=dtypes
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
