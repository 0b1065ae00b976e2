"""Where the network images of a sample lie in the sample's own grid: the geometry of saliency.

A torch estimator turns one sample into one or several 2-D network images (the one
preprocessing path, :mod:`skrtl._preprocess`): a 2-D image is resized; a volume gives three
orthogonal planes stacked as channels (``"2.5d"``, ``slices="orthogonal"``), adjacent axial
slices stacked as channels (``"adjacent"``), or one image per axial slice (``"3d"``,
slice-wise). A saliency map computed on a network image therefore belongs to one or several
*planes* of the sample, each of which was stretched to the network input size.

This module is the one place that knows this geometry: :func:`network_planes` says which planes
of the sample every network image shows (found by running the preprocessing's own slicing,
:func:`~skrtl._preprocess.to_slices`, on coordinate volumes, so it follows any change of the
slicing rules), and :func:`resize_map` undoes the resize (optionally preserving the sum of an
additive map exactly). A future volumetric mode (3-D network input) adds one kind of plane
here: the whole volume, with a trilinear resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._preprocess import to_slices

__all__ = [
    "AXIS_NAMES",
    "Plane",
    "SaliencyView",
    "assemble_map",
    "network_planes",
    "plane_of",
    "plane_shape",
    "resize_map",
    "spatial_shape",
]

#: Names of the axes of a ``(D, H, W)`` volume, as the plane through that axis is called.
AXIS_NAMES = {0: ("axial", "z"), 1: ("coronal", "y"), 2: ("sagittal", "x")}


@dataclass(frozen=True)
class Plane:
    """A 2-D plane of a sample shown by a network image.

    Attributes
    ----------
    axis : int or None
        ``None`` for a 2-D image (the whole image); else the volume axis ``(0, 1, 2) = (z, y,
        x)`` that is fixed (0: axial slice, 1: coronal plane, 2: sagittal plane).
    index : int or None
        Position of the plane along ``axis``.
    share : float
        Fraction of an additive map of the network image that goes to this plane (the three
        orthogonal planes of one 2.5-D image share it in proportion to their pixels, so that
        the map has the same density on each).
    """

    axis: int | None
    index: int | None
    share: float = 1.0

    @property
    def name(self) -> str:
        """``"image"``, ``"axial z=12"``, ``"coronal y=30"``, ``"sagittal x=28"``."""
        if self.axis is None:
            return "image"
        plane, letter = AXIS_NAMES[self.axis]
        return f"{plane} {letter}={self.index}"


@dataclass
class SaliencyView:
    """One plane of a sample with its saliency map, ready to plot.

    Attributes
    ----------
    image : ndarray
        The plane of the sample image as the estimator received it (raw intensities), ``(h,
        w)`` or ``(h, w, c)`` for a colour 2-D image.
    mask : ndarray of bool or None
        The plane of the sample's mask.
    saliency : ndarray of float of shape (h, w)
        The saliency map on the plane's pixels.
    plane : Plane
        Where the plane lies in the sample.
    """

    image: np.ndarray
    mask: np.ndarray | None
    saliency: np.ndarray
    plane: Plane

    @property
    def name(self) -> str:
        """The plane's name (``"image"``, ``"axial z=12"``, ...)."""
        return self.plane.name


def spatial_shape(image: np.ndarray, mode: str) -> tuple[int, ...]:
    """``(H, W)`` of a 2-D image (channels dropped) or ``(D, H, W)`` of a volume."""
    return tuple(int(s) for s in (image.shape[:2] if mode == "2d" else image.shape[:3]))


def _coordinate(shape: tuple[int, int, int], axis: int) -> np.ndarray:
    """A ``(D, H, W, 1)`` volume holding each voxel's index along ``axis``."""
    view = [1, 1, 1]
    view[axis] = shape[axis]
    coord = np.arange(shape[axis], dtype=np.float32).reshape(view)
    return np.ascontiguousarray(np.broadcast_to(coord, shape))[..., None]


def network_planes(preprocessor, shape: tuple[int, ...], mask) -> list[list[Plane]]:
    """The planes of one sample shown by each of its network images.

    Parameters
    ----------
    preprocessor : ImagePreprocessor
        The fitted estimator's ``preprocessor_``.
    shape : tuple of int
        Spatial shape of the sample (:func:`spatial_shape`).
    mask : ndarray of bool or None
        The sample's mask (it chooses the slices and the lesion centre of volumes).

    Returns
    -------
    list of list of Plane
        One entry per network image, in the order of ``preprocessor.network_images``.
    """
    mode = preprocessor.mode
    if mode == "2d":
        return [[Plane(None, None, 1.0)]]
    if len(shape) != 3:
        raise ValueError(f"mode={mode!r} needs volumes (D, H, W), got spatial shape {shape!r}.")
    kw = {
        "mode": mode,
        "slices": preprocessor.slices,
        "n_slices": preprocessor.n_slices,
        "slice_selection": preprocessor.slice_selection,
    }
    if mode == "2.5d" and preprocessor.slices == "orthogonal":
        # channel k of the stacked image is the plane through the centre fixing axis k
        centre = []
        for axis in range(3):
            (img,), _ = to_slices(_coordinate(shape, axis), mask, **kw)
            centre.append(int(round(float(img[..., axis].mean()))))
        # an additive map is shared in proportion to the planes' pixels: the same density
        sizes = [int(np.prod([s for a, s in enumerate(shape) if a != axis])) for axis in range(3)]
        return [[Plane(axis, centre[axis], sizes[axis] / sum(sizes)) for axis in range(3)]]
    if mode == "2.5d":  # adjacent axial slices as channels: the centre slice is channel n // 2
        (img,), _ = to_slices(_coordinate(shape, 0), mask, **kw)
        cz = int(round(float(img[..., preprocessor.n_slices // 2].mean())))
        return [[Plane(0, cz, 1.0)]]
    if mode == "3d":  # slice-wise: one network image per axial slice
        imgs, _ = to_slices(_coordinate(shape, 0), mask, **kw)
        return [[Plane(0, int(round(float(im.mean()))), 1.0)] for im in imgs]
    raise NotImplementedError(  # pragma: no cover - a new mode adds its planes here
        f"saliency maps do not know the geometry of mode={mode!r} yet."
    )


def plane_of(array: np.ndarray | None, plane: Plane) -> np.ndarray | None:
    """The 2-D plane of a sample image or mask (a 2-D image is returned as it is)."""
    if array is None or plane.axis is None:
        return array
    index = [slice(None)] * 3
    index[plane.axis] = plane.index
    return np.asarray(array[tuple(index)])


def plane_shape(shape: tuple[int, ...], plane: Plane) -> tuple[int, int]:
    """Shape ``(h, w)`` of a plane of a sample of spatial shape ``shape``."""
    if plane.axis is None:
        return int(shape[0]), int(shape[1])
    rest = [int(s) for a, s in enumerate(shape) if a != plane.axis]
    return rest[0], rest[1]


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of a 1-D linear resize (half-pixel centres, antialiased)."""
    eye = torch.eye(n_in, dtype=torch.float64)[:, None, :, None]  # n_in images of n_in x 1
    out = F.interpolate(
        eye, size=(n_out, 1), mode="bilinear", align_corners=False, antialias=n_out < n_in
    )
    return out[:, 0, :, 0].T.numpy()


def resize_map(m: np.ndarray, shape: tuple[int, int], *, preserve_sum: bool = False):
    """Resize a 2-D map to ``shape`` (bilinear, half-pixel centres, as the preprocessing).

    With ``preserve_sum`` every input cell spreads its value over the output pixels with the
    bilinear weights normalised to one, so that the output sums exactly to the input: an
    additive map (a class activation map in decision units) keeps its total.
    """
    m = np.asarray(m, dtype=np.float64)
    h, w = int(shape[0]), int(shape[1])
    if m.shape == (h, w):
        return m.copy()
    if preserve_sum:
        uy = _interp_matrix(h, m.shape[0])
        ux = _interp_matrix(w, m.shape[1])
        for u in (uy, ux):
            cols = u.sum(axis=0)
            empty = cols <= 0
            if empty.any():  # pragma: no cover - extreme downsizing: nearest output pixel
                for j in np.flatnonzero(empty):
                    u[min(u.shape[0] - 1, int(j * u.shape[0] / u.shape[1])), j] = 1.0
                cols = u.sum(axis=0)
            u /= cols[None, :]
        return uy @ m @ ux.T
    t = torch.from_numpy(m)[None, None]
    out = F.interpolate(
        t, size=(h, w), mode="bilinear", align_corners=False, antialias=h < m.shape[0]
    )
    return out[0, 0].numpy()


def assemble_map(shape: tuple[int, ...], views: list[SaliencyView]) -> np.ndarray:
    """The saliency of a sample in its own grid: the 2-D map, or a volume with NaN off-plane.

    Where planes cross (2.5-D orthogonal planes) the later plane's value is kept.
    """
    if len(shape) == 2:
        return np.asarray(views[0].saliency, dtype=np.float64)
    out = np.full(shape, np.nan)
    for view in views:
        index = [slice(None)] * 3
        index[view.plane.axis] = view.plane.index
        out[tuple(index)] = view.saliency
    return out
