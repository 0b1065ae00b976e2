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
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_FRAME_COLUMNS",
    "ImageInput",
    "make_image_frame",
    "read_image_frame",
    "scale_intensity",
    "to_slices",
    "to_network_tensor",
]

IMAGE_FRAME_COLUMNS = ("image", "mask", "spacing", "site")
_MODES = ("2d", "2.5d", "3d")


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
    """

    images: list
    masks: list | None = None
    spacing: np.ndarray | None = None
    sites: np.ndarray | None = None
    extra: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __len__(self) -> int:
        return len(self.images)


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
    elif isinstance(X, np.ndarray | list | tuple):
        arr = np.asarray(X) if not isinstance(X, np.ndarray) else X
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
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.dtype == object or not (np.issubdtype(img.dtype, np.number) or img.dtype == bool):
            raise ValueError(f"image {i} has non-numeric dtype {img.dtype!r}.")
        if mode == "2d" and img.ndim not in (2, 3):
            raise ValueError(
                f"image {i} has shape {img.shape!r}; mode='2d' needs (H, W) or (H, W, C). "
                "For volumes use mode='2.5d' or mode='3d'."
            )
        if mode != "2d" and img.ndim != 3:
            raise ValueError(
                f"image {i} has shape {img.shape!r}; mode={mode!r} needs a volume (D, H, W)."
            )
        img = img.astype(np.float32, copy=False)
        if not np.isfinite(img).all():
            raise ValueError(
                f"image {i} contains NaN or infinite values; replace them (e.g. "
                "np.nan_to_num) or drop the sample before calling {estimator_name}.".replace(
                    "{estimator_name}", estimator_name
                )
            )
        out_images.append(img)
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
    return ImageInput(images=out_images, masks=masks, spacing=spacing, sites=sites, extra=extra)


# --------------------------------------------------------------------------------------------
# intensity
# --------------------------------------------------------------------------------------------
def scale_intensity(
    img: np.ndarray,
    *,
    method: str = "auto",
    windows: Sequence[tuple[float, float]] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    mask: np.ndarray | None = None,
    channel_axis: int | None = None,
) -> np.ndarray:
    """Map raw intensities to [0, 1] channels.

    Parameters
    ----------
    img : ndarray
        Image or volume. With ``channel_axis`` the channels are scaled jointly.
    method : {"auto", "window", "percentile", "minmax", "uint8", "none"}
        ``"window"``: CT windows ``(level, width)``, one output channel per window (stacked on a
        new last axis). ``"percentile"``: clip to the given percentiles (computed inside
        ``mask`` when given) and rescale (MRI, ultrasound). ``"minmax"``: per-image min-max.
        ``"uint8"``: divide by 255. ``"auto"``: ``"window"`` if windows are given, ``"uint8"``
        for integer data within [0, 255], else ``"percentile"``.
    windows : sequence of (level, width), optional
        CT windows in HU, e.g. ``[(40, 400), (-600, 1500)]`` (soft tissue, lung).
    percentiles : (float, float)
    mask : ndarray of bool, optional
    channel_axis : int, optional
        Position of an existing channel axis (kept as is, last axis in the output).

    Returns
    -------
    ndarray of float32 with a trailing channel axis.
    """
    x = np.asarray(img, dtype=np.float32)
    if channel_axis is None:
        x = x[..., None]
    elif channel_axis not in (-1, x.ndim - 1):
        x = np.moveaxis(x, channel_axis, -1)
    if method == "auto":
        if windows:
            method = "window"
        elif np.issubdtype(np.asarray(img).dtype, np.integer) and x.min() >= 0 and x.max() <= 255:
            method = "uint8"
        else:
            method = "percentile"
    if method == "window":
        if not windows:
            raise ValueError("method='window' needs windows=[(level, width), ...].")
        chans = []
        for level, width in windows:
            if width <= 0:
                raise ValueError(f"window width must be > 0, got {width!r}.")
            lo = level - width / 2.0
            chans.append(np.clip((x.mean(axis=-1) - lo) / width, 0.0, 1.0))
        return np.stack(chans, axis=-1).astype(np.float32)
    if method == "uint8":
        return np.clip(x / 255.0, 0.0, 1.0)
    if method == "none":
        return x
    if method == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif method == "percentile":
        ref = x[mask] if mask is not None and mask.shape == x.shape[:-1] else x
        lo, hi = (float(v) for v in np.percentile(ref, percentiles))
    else:
        raise ValueError(
            f"intensity method must be one of 'auto', 'window', 'percentile', 'minmax', "
            f"'uint8', 'none'; got {method!r}."
        )
    if hi <= lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# volumes -> 2-D network inputs
# --------------------------------------------------------------------------------------------
def _centre(mask: np.ndarray | None, shape: tuple) -> tuple[int, ...]:
    if mask is not None:
        idx = np.argwhere(mask)
        return tuple(int(round(v)) for v in idx.mean(axis=0))
    return tuple(s // 2 for s in shape)


def to_slices(
    volume: np.ndarray,
    mask: np.ndarray | None,
    *,
    mode: str,
    slices: str = "orthogonal",
    n_slices: int = 3,
    slice_selection: str = "mask",
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Turn a scaled volume ``(D, H, W, C)`` into 2-D images ``(h, w, c)`` for the network.

    ``mode="2.5d"`` returns a single image whose channels are three orthogonal planes through the
    lesion centre (``slices="orthogonal"``, needs ``C == 1``) or ``n_slices`` adjacent axial
    slices (``slices="adjacent"``). ``mode="3d"`` returns every axial slice (or only those that
    contain the mask, ``slice_selection="mask"``); features are aggregated afterwards.
    """
    d, h, w, c = volume.shape
    cz, cy, cx = _centre(mask, (d, h, w))
    if mode == "2.5d":
        if slices == "orthogonal":
            if c != 1:
                raise ValueError(
                    "slices='orthogonal' stacks three planes as channels and needs one intensity "
                    f"channel, got {c} (several CT windows?). Use slices='adjacent' or one window."
                )
            planes = [volume[cz, :, :, 0], volume[:, cy, :, 0], volume[:, :, cx, 0]]
            mplanes = (
                [mask[cz], mask[:, cy, :], mask[:, :, cx]] if mask is not None else [None] * 3
            )
            size = (max(p.shape[0] for p in planes), max(p.shape[1] for p in planes))
            stacked = np.stack([_resize_np(p, size) for p in planes], axis=-1)
            mstack = None
            if mask is not None:
                mstack = np.stack([_resize_np(m.astype(np.float32), size) for m in mplanes])
                mstack = mstack.max(axis=0) > 0.5
            return [stacked], [mstack]
        if slices == "adjacent":
            if n_slices < 1:
                raise ValueError(f"n_slices must be >= 1, got {n_slices!r}.")
            half = n_slices // 2
            idx = np.clip(np.arange(cz - half, cz - half + n_slices), 0, d - 1)
            img = np.concatenate([volume[i] for i in idx], axis=-1)
            return [img], [mask[cz] if mask is not None else None]
        raise ValueError(f"slices must be 'orthogonal' or 'adjacent', got {slices!r}.")
    if mode == "3d":
        if slice_selection == "mask" and mask is not None:
            zs = np.flatnonzero(mask.reshape(d, -1).any(axis=1))
        elif slice_selection in ("all", "mask"):
            zs = np.arange(d)
        else:
            raise ValueError(f"slice_selection must be 'mask' or 'all', got {slice_selection!r}.")
        return [volume[z] for z in zs], [mask[z] if mask is not None else None for z in zs]
    raise ValueError(f"to_slices needs mode '2.5d' or '3d', got {mode!r}.")


def _resize_np(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == tuple(size):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def to_network_tensor(
    images: Sequence[np.ndarray],
    *,
    size: int | tuple[int, int],
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    masks: Sequence[np.ndarray | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack scaled 2-D images ``(h, w, c)`` in [0, 1] into a normalised NCHW batch.

    Images are resized (bilinear, antialiased) to ``size``; single-channel images are
    replicated to ``in_chans`` channels; masks are resized to the same grid.

    Returns
    -------
    x : torch.Tensor of shape (n, in_chans, size, size), float32
    m : torch.Tensor of shape (n, 1, size, size) in [0, 1], or None
    """
    size = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    batch = []
    for i, img in enumerate(images):
        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        if t.ndim == 2:
            t = t[..., None]
        t = t.permute(2, 0, 1)
        c = t.shape[0]
        if c != in_chans:
            if c == 1:
                t = t.expand(in_chans, -1, -1)
            elif in_chans == 1:
                t = t.mean(dim=0, keepdim=True)
            else:
                raise ValueError(
                    f"image {i} has {c} channels but the network takes {in_chans}; use 1 or "
                    f"{in_chans} channels (e.g. fewer CT windows)."
                )
        if tuple(t.shape[1:]) != size:
            t = F.interpolate(
                t[None], size=size, mode="bilinear", align_corners=False, antialias=True
            )[0]
        batch.append(t)
    x = torch.stack(batch)
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    if mean_t.shape[1] != in_chans:
        mean_t = mean_t.mean(1, keepdim=True)
        std_t = std_t.mean(1, keepdim=True)
    x = (x - mean_t) / std_t
    mt = None
    if masks is not None and any(m is not None for m in masks):
        ms = []
        for img, m in zip(images, masks):
            if m is None:
                m = np.ones(np.asarray(img).shape[:2], dtype=np.float32)
            t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
            ms.append(F.interpolate(t, size=size, mode="area")[0] if t.shape[2:] != size else t[0])
        mt = torch.stack(ms)
    return x.contiguous(), mt
