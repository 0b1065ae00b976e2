"""Lesion-centred preprocessing: crop around the mask, resample, and pick 2-D / 2.5-D / 3-D views.

A CT is 512 x 512 x 100-300 voxels; a lesion is a few centimetres. These pure functions take
an image (an array with its spacing, or a :class:`skrtl.MedicalImage`) and its mask and return
what a network should see:

* :func:`crop_lesion` -- the box around the lesion (bounding box plus a margin in mm, or a
  fixed field of view in mm centred on the lesion), optionally resampled to a target spacing
  (isotropic or in-plane only). It crops **first** and interpolates only the box, so its cost
  does not depend on the size of the volume. Where the box leaves the volume it is padded
  (image minimum by default) and the result records what was done (:class:`LesionCrop`).
  The whole crop is the 3-D view.
* :func:`lesion_slice` -- one axial slice for 2-D models: the slice with the largest lesion
  area, or the one through the lesion's centre of mass.
* :func:`orthogonal_planes` and :func:`adjacent_slices` -- 2.5-D views: the axial, coronal
  and sagittal planes through the lesion centre, or ``n`` adjacent axial slices, as channels.

Arrays follow skrtl's conventions: volumes ``(z, y, x)`` (axial slices ``volume[z]``), 2-D
images ``(y, x)``; trailing channel axes of the image (beyond the mask's dimensions) are kept.
Spacings are in mm in array-axis order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real

import numpy as np
from scipy import ndimage

from ._io import MedicalImage

__all__ = ["LesionCrop", "adjacent_slices", "crop_lesion", "lesion_slice", "orthogonal_planes"]


@dataclass(eq=False, repr=False)
class LesionCrop:
    """The result of :func:`crop_lesion`: the cropped image and mask and a record of the crop.

    Attributes
    ----------
    image : ndarray of float32
        Cropped (and resampled) image; trailing channel axes of the input are kept.
    mask : ndarray of bool or None
        The mask on the same grid.
    spacing : tuple of float
        Spacing of the crop (mm, array-axis order).
    source_spacing, source_shape : tuple
        Spacing and spatial shape of the input.
    start : tuple of float
        Position of the crop's first voxel centre in source voxel coordinates (can be
        negative or fractional).
    center : tuple of float
        Centre of the box in source voxel coordinates.
    size_mm : tuple of float
        Physical extent of the box.
    lesion_bbox : tuple of (int, int) or None
        Source voxel range ``[start, stop)`` of the mask, per axis.
    padded : tuple of (int, int)
        Crop voxels before / after the volume along each axis, filled with ``pad_value``.
    pad_value : float
        Value used for padding.
    resampled : bool
        Whether the crop was interpolated (else it is an exact sub-array, padded).
    order : int
        Interpolation order used for the image (0 nearest, 1 linear, 3 cubic B-spline).
    truncated : bool
        The lesion extends beyond a fixed-size box (``size_mm``).
    origin, direction : optional
        Physical geometry of the crop when the input was a :class:`skrtl.MedicalImage`.
    """

    image: np.ndarray
    mask: np.ndarray | None
    spacing: tuple
    source_spacing: tuple
    source_shape: tuple
    start: tuple
    center: tuple
    size_mm: tuple
    lesion_bbox: tuple | None
    padded: tuple
    pad_value: float
    resampled: bool
    order: int
    truncated: bool = False
    origin: tuple | None = None
    direction: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def was_padded(self) -> bool:
        """Whether any part of the box lay outside the volume."""
        return any(b or a for b, a in self.padded)

    def to_medical_image(self) -> MedicalImage:
        """The cropped image as a :class:`skrtl.MedicalImage` (geometry kept when known)."""
        img = MedicalImage.from_array(
            self.image,
            spacing=self.spacing,
            origin=self.origin,
            direction=self.direction,
            layout="zyx" if len(self.spacing) == 3 else None,
            modality=self.meta.get("modality"),
            path=self.meta.get("path"),
        )
        return img

    def to_dict(self) -> dict:
        """A JSON-friendly record of what was done (no pixels)."""
        return {
            "shape": list(self.image.shape),
            "spacing": list(self.spacing),
            "source_spacing": list(self.source_spacing),
            "source_shape": list(self.source_shape),
            "start": [float(v) for v in self.start],
            "center": [float(v) for v in self.center],
            "size_mm": [float(v) for v in self.size_mm],
            "lesion_bbox": None
            if self.lesion_bbox is None
            else [list(b) for b in self.lesion_bbox],
            "padded": [list(p) for p in self.padded],
            "pad_value": float(self.pad_value),
            "resampled": bool(self.resampled),
            "order": int(self.order),
            "truncated": bool(self.truncated),
        }

    def __repr__(self) -> str:
        sp = tuple(round(s, 4) for s in self.spacing)
        return (
            f"LesionCrop(shape={self.image.shape!r}, spacing={sp!r}, padded={self.was_padded}, "
            f"resampled={self.resampled}, truncated={self.truncated})"
        )


def _per_axis(value, n: int, name: str, *, allow_none: bool = False) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, Real) and not isinstance(value, bool):
        vals = [float(value)] * n
    elif isinstance(value, Sequence | np.ndarray) and not isinstance(value, str):
        vals = [None if v is None else float(v) for v in value]
    else:
        raise TypeError(f"{name} must be a number or a sequence of {n} numbers, got {value!r}.")
    if len(vals) != n:
        raise ValueError(
            f"{name} must have one value per spatial axis ({n}, array order), got {value!r}."
        )
    for v in vals:
        if v is None and not allow_none:
            raise ValueError(f"{name} cannot contain None, got {value!r}.")
        if v is not None and (not np.isfinite(v) or v < 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")
    return vals


def _mm(values) -> str:
    return " x ".join(f"{float(v):.4g}" for v in values)


def _bbox(mask: np.ndarray) -> tuple:
    out = []
    for a in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != a)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def crop_lesion(
    image,
    mask=None,
    *,
    spacing=None,
    margin_mm=None,
    size_mm=None,
    target_spacing=None,
    center="bbox",
    order: int = 1,
    anti_aliasing: bool = True,
    pad_value="min",
) -> LesionCrop:
    """Crop the box around a lesion and optionally resample it to a target spacing.

    Parameters
    ----------
    image : ndarray or MedicalImage
        ``(z, y, x)`` volume or ``(y, x)`` image (trailing channel axes are kept).
    mask : ndarray of bool, optional
        Lesion mask, same spatial shape. Without a mask, ``size_mm`` is required and the box
        is centred on ``center`` (default: the image centre).
    spacing : float or sequence of float, optional
        Source spacing (mm, array-axis order); taken from a :class:`MedicalImage`, required
        for an array (``spacing=1`` works in voxel units).
    margin_mm : float or sequence of float, optional
        Margin added around the mask's bounding box on every side (default 10 mm when
        ``size_mm`` is not given).
    size_mm : float or sequence of float, optional
        Fixed field of view centred on the lesion instead (e.g. ``64`` for a 64 mm cube), the
        same physical size for every case. A lesion larger than the box is cut (with a
        warning; ``truncated`` records it).
    target_spacing : float or sequence of float or None, optional
        Output spacing: a float for isotropic voxels, a sequence with ``None`` for axes to
        keep (``(None, 1.0, 1.0)``: in-plane only). ``None``: no interpolation; the crop is
        an exact sub-array.
    center : {"bbox", "mass"} or sequence of float, default="bbox"
        Box centre: centre of the mask's bounding box, its centre of mass, or explicit source
        voxel coordinates.
    order : int, default=1
        Spline order for the image: 1 linear, 3 cubic B-spline (0 nearest). The mask is
        always resampled with nearest neighbour (a lesion that would vanish keeps the voxel
        at its centre of mass).
    anti_aliasing : bool, default=True
        Gaussian pre-filter along axes that are downsampled.
    pad_value : "min" or float, default="min"
        Value for the part of the box outside the volume: the image minimum (air in CT) or
        a number.

    Returns
    -------
    LesionCrop

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import crop_lesion
    >>> vol = np.zeros((40, 100, 100), np.float32)
    >>> mask = np.zeros(vol.shape, bool)
    >>> mask[18:22, 45:55, 40:60] = True
    >>> crop = crop_lesion(vol, mask, spacing=(2.5, 0.7, 0.7), size_mm=64, target_spacing=1.0)
    >>> crop.image.shape, crop.spacing
    ((64, 64, 64), (1.0, 1.0, 1.0))
    """
    src = image if isinstance(image, MedicalImage) else None
    if src is not None:
        if src.layout.startswith("t"):
            raise ValueError("crop_lesion does not take multi-frame clips; pick a frame first.")
        arr = src.array
        if spacing is None:
            spacing = src.spacing
            if not src.spacing_known:
                warnings.warn(
                    f"image {src.path!r} has no physical spacing: margins, sizes and spacings "
                    "in mm are taken as pixels.",
                    UserWarning,
                    stacklevel=2,
                )
    else:
        arr = np.asarray(image)
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"image must be a numeric array, got dtype {arr.dtype!r}.")
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool:
            m = m != 0
        ndim = m.ndim
        if arr.shape[:ndim] != m.shape:
            raise ValueError(
                f"mask shape {m.shape!r} does not match the image's spatial shape "
                f"{arr.shape[:ndim]!r}."
            )
        if not m.any():
            raise ValueError("mask is empty: there is no lesion to crop around.")
    else:
        m = None
        ndim = src.spatial_ndim if src is not None else (3 if arr.ndim == 3 else 2)
    if ndim not in (2, 3):
        raise ValueError(f"crop_lesion needs a 2-D or 3-D image, got spatial ndim {ndim}.")
    if spacing is None:
        raise ValueError(
            "crop_lesion needs spacing=(mm per array axis) for an array input (spacing=1 to "
            "work in voxels), or a skrtl.MedicalImage."
        )
    sp = np.asarray(_per_axis(spacing, ndim, "spacing"), dtype=float)
    if np.any(sp <= 0):
        raise ValueError(f"spacing must be > 0, got {spacing!r}.")
    if size_mm is not None and margin_mm is not None:
        raise ValueError(
            "give either margin_mm (bounding box + margin) or size_mm (fixed field of view), "
            "not both."
        )
    if m is None and size_mm is None:
        raise ValueError("without a mask, crop_lesion needs size_mm (the field of view).")
    if not isinstance(order, int) or not 0 <= order <= 5:
        raise ValueError(f"order must be an int in [0, 5], got {order!r}.")
    shape = np.asarray(arr.shape[:ndim])
    bbox = _bbox(m) if m is not None else None

    # ---- box centre (source voxel coordinates) and extent (mm)
    if isinstance(center, str):
        if center not in ("bbox", "mass"):
            raise ValueError(f"center must be 'bbox', 'mass' or coordinates, got {center!r}.")
        if m is None:
            c = (shape - 1) / 2.0
        elif center == "bbox":
            c = np.array([(lo + hi - 1) / 2.0 for lo, hi in bbox])
        else:
            c = np.asarray(ndimage.center_of_mass(m), dtype=float)
    else:
        c = np.asarray(_per_axis(center, ndim, "center"), dtype=float)
    if size_mm is not None:
        extent = np.asarray(_per_axis(size_mm, ndim, "size_mm"), dtype=float)
        if np.any(extent <= 0):
            raise ValueError(f"size_mm must be > 0, got {size_mm!r}.")
    else:
        margin = np.asarray(_per_axis(10.0 if margin_mm is None else margin_mm, ndim, "margin_mm"))
        lesion_mm = np.array([(hi - lo) for lo, hi in bbox]) * sp
        extent = lesion_mm + 2 * margin
    ts = _per_axis(target_spacing, ndim, "target_spacing", allow_none=True)
    if any(t is not None and t <= 0 for t in ts):
        raise ValueError(f"target_spacing must be > 0, got {target_spacing!r}.")
    out_sp = np.array([sp[a] if ts[a] is None else ts[a] for a in range(ndim)])
    resample_axis = [ts[a] is not None and not np.isclose(ts[a], sp[a]) for a in range(ndim)]
    n_out = np.maximum(1, np.round(extent / out_sp).astype(int))
    step = out_sp / sp
    start = c - (n_out - 1) / 2.0 * step
    for a in range(ndim):
        if not resample_axis[a]:
            start[a] = np.round(start[a])
            step[a] = 1.0
            out_sp[a] = sp[a]
    stop = start + (n_out - 1) * step  # last voxel centre
    truncated = False
    if bbox is not None and size_mm is not None:
        lo_box = start - 0.5 * step
        hi_box = stop + 0.5 * step
        truncated = any(
            lo < lo_box[a] - 1e-6 or hi > hi_box[a] + 1e-6
            for a, (lo, hi) in enumerate((b0 - 0.5, b1 - 0.5) for b0, b1 in bbox)
        )
        if truncated:
            warnings.warn(
                f"the lesion ({_mm([(hi - lo) * s for (lo, hi), s in zip(bbox, sp)])} mm) "
                f"extends beyond the {_mm(extent)} mm box: it is cut. Increase size_mm or use "
                "margin_mm.",
                UserWarning,
                stacklevel=2,
            )
    if isinstance(pad_value, str):
        if pad_value != "min":
            raise ValueError(f"pad_value must be 'min' or a number, got {pad_value!r}.")
        pad = float(np.min(arr))
    else:
        pad = float(pad_value)

    # ---- which output voxels lie outside the volume
    padded = []
    inside = []
    for a in range(ndim):
        coords = start[a] + np.arange(n_out[a]) * step[a]
        ok = (coords >= -0.5) & (coords <= shape[a] - 0.5)
        inside.append(ok)
        first = int(np.argmax(ok)) if ok.any() else n_out[a]
        last = int(n_out[a] - 1 - np.argmax(ok[::-1])) if ok.any() else -1
        padded.append((first, int(n_out[a] - 1 - last)))
    any_resample = any(resample_axis)
    if not any_resample:
        out_img, out_mask = _slice_crop(arr, m, start.astype(int), n_out, shape, pad)
    else:
        out_img, out_mask = _resampled_crop(
            arr, m, start, step, n_out, shape, pad, order, anti_aliasing, inside
        )
    crop = LesionCrop(
        image=out_img,
        mask=out_mask,
        spacing=tuple(float(v) for v in out_sp),
        source_spacing=tuple(float(v) for v in sp),
        source_shape=tuple(int(v) for v in shape),
        start=tuple(float(v) for v in start),
        center=tuple(float(v) for v in c),
        size_mm=tuple(float(v) for v in n_out * out_sp),
        lesion_bbox=bbox,
        padded=tuple(padded),
        pad_value=pad,
        resampled=any_resample,
        order=order if any_resample else 0,
        truncated=truncated,
    )
    if src is not None:
        crop.origin = tuple(float(v) for v in src.index_to_physical(start))
        crop.direction = np.asarray(src.direction).copy()
        crop.meta.update(modality=src.modality, path=src.path)
    return crop


def _slice_crop(arr, m, start, n_out, shape, pad):
    """Exact sub-array crop, padded where the box leaves the volume."""
    ndim = len(shape)
    out = np.full(tuple(n_out) + arr.shape[ndim:], pad, dtype=np.float32)
    out_m = None if m is None else np.zeros(tuple(n_out), dtype=bool)
    src_sl, dst_sl = [], []
    for a in range(ndim):
        lo, hi = start[a], start[a] + n_out[a]
        s0, s1 = max(lo, 0), min(hi, shape[a])
        if s1 <= s0:
            return out, out_m
        src_sl.append(slice(s0, s1))
        dst_sl.append(slice(s0 - lo, s1 - lo))
    out[tuple(dst_sl)] = arr[tuple(src_sl)]
    if m is not None:
        out_m[tuple(dst_sl)] = m[tuple(src_sl)]
    return out, out_m


def _resampled_crop(arr, m, start, step, n_out, shape, pad, order, anti_aliasing, inside):
    """Interpolate only the needed sub-volume onto the output grid."""
    ndim = len(shape)
    sigma = [max(0.0, (s - 1.0) / 2.0) if anti_aliasing and order > 0 else 0.0 for s in step]
    halo = [int(np.ceil(4 * sg)) + order + 2 for sg in sigma]
    lo = [
        int(max(0, np.floor(min(start[a], start[a] + (n_out[a] - 1) * step[a])) - halo[a]))
        for a in range(ndim)
    ]
    hi = [
        int(
            min(
                shape[a], np.ceil(max(start[a], start[a] + (n_out[a] - 1) * step[a])) + halo[a] + 1
            )
        )
        for a in range(ndim)
    ]
    if any(h <= l_ for l_, h in zip(lo, hi)):  # box entirely outside the volume
        out = np.full(tuple(n_out) + arr.shape[ndim:], pad, dtype=np.float32)
        return out, (None if m is None else np.zeros(tuple(n_out), dtype=bool))
    region = tuple(slice(l_, h) for l_, h in zip(lo, hi))
    offset = np.asarray(start) - np.asarray(lo)
    outside = ~_outer_and(inside)
    sub = np.asarray(arr[region], dtype=np.float32)
    extra = sub.shape[ndim:]
    chans = sub.reshape(sub.shape[:ndim] + (-1,)) if extra else sub[..., None]
    outs = []
    for k in range(chans.shape[-1]):
        ch = chans[..., k]
        if any(sigma):
            ch = ndimage.gaussian_filter(ch, sigma=sigma, mode="nearest")
        res = ndimage.affine_transform(
            ch,
            np.asarray(step, dtype=float),
            offset=offset,
            output_shape=tuple(int(n) for n in n_out),
            order=order,
            mode="nearest",
            prefilter=order > 1,
        )
        res[outside] = pad
        outs.append(res.astype(np.float32, copy=False))
    out = np.stack(outs, axis=-1).reshape(tuple(n_out) + extra) if extra else outs[0]
    out_m = None
    if m is not None:
        sub_m = m[region].astype(np.uint8)
        out_m = (
            ndimage.affine_transform(
                sub_m,
                np.asarray(step, dtype=float),
                offset=offset,
                output_shape=tuple(int(n) for n in n_out),
                order=0,
                mode="constant",
                cval=0,
            )
            > 0
        )
        out_m[outside] = False
        if not out_m.any():  # a lesion smaller than one output voxel: keep its centre
            com = np.asarray(ndimage.center_of_mass(m))
            k = np.round((com - np.asarray(start)) / np.asarray(step)).astype(int)
            if np.all(k >= 0) and np.all(k < n_out):
                out_m[tuple(k)] = True
    return out, out_m


def _outer_and(masks: list) -> np.ndarray:
    out = masks[0]
    for mk in masks[1:]:
        out = out[..., None] & mk
    return out


# --------------------------------------------------------------------------------------------
# 2-D and 2.5-D views
# --------------------------------------------------------------------------------------------
def _check_volume(volume, mask, name: str):
    vol = volume.array if isinstance(volume, MedicalImage) else np.asarray(volume)
    if vol.ndim < 3:
        raise ValueError(f"{name} needs a (z, y, x) volume, got shape {vol.shape!r}.")
    m = None
    if mask is not None:
        m = np.asarray(mask)
        m = m if m.dtype == bool else m != 0
        if m.shape != vol.shape[:3]:
            raise ValueError(
                f"mask shape {m.shape!r} does not match the volume's shape {vol.shape[:3]!r}."
            )
        if not m.any():
            raise ValueError("mask is empty: there is no lesion to centre on.")
    return vol, m


def _pick_slice(m: np.ndarray | None, depth: int, method: str) -> int:
    if method not in ("largest", "center", "centre"):
        raise ValueError(f"method must be 'largest' or 'center', got {method!r}.")
    if m is None:
        return depth // 2
    area = m.reshape(m.shape[0], -1).sum(axis=1)
    com = float(ndimage.center_of_mass(m)[0])
    if method == "largest":
        best = np.flatnonzero(area == area.max())
        return int(best[np.argmin(np.abs(best - com))])  # ties: nearest the centre of mass
    return int(np.clip(np.round(com), 0, depth - 1))


def lesion_slice(volume, mask=None, *, method: str = "largest"):
    """The axial slice for a 2-D model: largest lesion area, or through its centre of mass.

    Parameters
    ----------
    volume : ndarray of shape (z, y, x[, c]) or MedicalImage
    mask : ndarray of bool, optional
        Without a mask, the middle slice.
    method : {"largest", "center"}, default="largest"
        ``"largest"``: the slice with the most lesion pixels (ties: the one nearest the centre
        of mass); ``"center"``: the slice through the centre of mass.

    Returns
    -------
    image : ndarray of shape (y, x[, c])
    mask : ndarray of bool of shape (y, x) or None
    z : int
        Index of the chosen slice.
    """
    vol, m = _check_volume(volume, mask, "lesion_slice")
    z = _pick_slice(m, vol.shape[0], method)
    return vol[z], (None if m is None else m[z]), z


def adjacent_slices(volume, mask=None, *, n_slices: int = 3, step: int = 1, method="largest"):
    """``n_slices`` adjacent axial slices around the lesion, stacked as channels (2.5-D).

    Parameters
    ----------
    volume : ndarray of shape (z, y, x) or MedicalImage
    mask : ndarray of bool, optional
    n_slices : int, default=3
    step : int, default=1
        Slice stride (2 takes every other slice).
    method : {"largest", "center"}, default="largest"
        Centre slice, as in :func:`lesion_slice`.

    Returns
    -------
    image : ndarray of shape (y, x, n_slices)
    mask : ndarray of bool of shape (y, x) or None
        The centre slice's mask.
    indices : ndarray of int
        Slices used; at the ends of the volume the edge slice is repeated.
    """
    vol, m = _check_volume(volume, mask, "adjacent_slices")
    if vol.ndim != 3:
        raise ValueError(f"adjacent_slices needs a scalar (z, y, x) volume, got {vol.shape!r}.")
    if not isinstance(n_slices, int) or n_slices < 1 or not isinstance(step, int) or step < 1:
        raise ValueError(f"n_slices and step must be ints >= 1, got {n_slices!r}, {step!r}.")
    z = _pick_slice(m, vol.shape[0], method)
    half = (n_slices - 1) / 2.0
    idx = np.clip(
        np.round(z + (np.arange(n_slices) - half) * step).astype(int), 0, vol.shape[0] - 1
    )
    return np.stack([vol[i] for i in idx], axis=-1), (None if m is None else m[z]), idx


def orthogonal_planes(volume, mask=None, *, center=None, stack: bool = False):
    """Axial, coronal and sagittal planes through the lesion centre (2.5-D).

    Parameters
    ----------
    volume : ndarray of shape (z, y, x) or MedicalImage
        Ideally an isotropic cube (``crop_lesion(..., size_mm=s, target_spacing=t)``), so the
        three planes have the same size and scale.
    mask : ndarray of bool, optional
    center : sequence of int, optional
        Voxel through which the planes pass; default: the mask's centre of mass (the volume
        centre without a mask).
    stack : bool, default=False
        Return the planes as one ``(h, w, 3)`` image (channels axial, coronal, sagittal) and
        the union of their masks; needs planes of equal shape.

    Returns
    -------
    planes : list of 3 ndarrays, or ndarray of shape (h, w, 3) with ``stack=True``
        ``volume[cz]``, ``volume[:, cy]``, ``volume[:, :, cx]``.
    masks : list of 3 ndarrays or None, or one ndarray with ``stack=True``
    center : tuple of int
    """
    vol, m = _check_volume(volume, mask, "orthogonal_planes")
    if vol.ndim != 3:
        raise ValueError(f"orthogonal_planes needs a scalar (z, y, x) volume, got {vol.shape!r}.")
    if center is None:
        c = (
            np.round(ndimage.center_of_mass(m)).astype(int)
            if m is not None
            else np.asarray(vol.shape) // 2
        )
    else:
        c = np.asarray(center, dtype=int)
        if c.shape != (3,) or np.any(c < 0) or np.any(c >= vol.shape):
            raise ValueError(f"center must be a voxel index inside {vol.shape!r}, got {center!r}.")
    cz, cy, cx = (int(v) for v in c)
    planes = [vol[cz], vol[:, cy], vol[:, :, cx]]
    mplanes = None if m is None else [m[cz], m[:, cy], m[:, :, cx]]
    if not stack:
        return planes, mplanes, (cz, cy, cx)
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise ValueError(
            f"the three planes have different shapes {sorted(shapes)!r}; stack=True needs a "
            "cube: crop with crop_lesion(..., size_mm=s, target_spacing=t) first."
        )
    img = np.stack(planes, axis=-1)
    mk = None if mplanes is None else (mplanes[0] | mplanes[1] | mplanes[2])
    return img, mk, (cz, cy, cx)
