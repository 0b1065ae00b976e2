"""The one preprocessing path from an image-frame row to a network input tensor.

Every torch image estimator of skrtl (CNN features, fine-tuning, AdaBN through them) turns a
sample into network input the same way, through :class:`ImagePreprocessor`:

1. **intensity scaling** to [0, 1] channels (:func:`scale_intensity`): CT windows, percentile
   clipping over the whole image, or ``/255`` for 8-bit images;
2. **slicing** of volumes into 2-D network images (:func:`to_slices`): three orthogonal planes
   or adjacent slices through the lesion centre (``"2.5d"``), or every axial slice that holds
   the mask (``"3d"``, slice-wise); a volumetric network (``"3d"`` with ``volumetric="acs"`` or
   ``"inflate"``) takes the whole volume as one network input;
3. **resizing** to the network input size (bilinear, antialiased; volumes to ``(D, H, W)``,
   separably along the three axes; masks by area averaging);
4. **channels**: one intensity channel is replicated to the network's three input channels (the
   input a pretrained network saw for a grey-level image), otherwise channels must match;
5. **normalisation** with the backbone's ImageNet mean and standard deviation.

The ``"auto"`` intensity rule is decided by the raw dtype of each image alone: ``uint8`` (and
``bool``) images are divided by 255, any other type (``int16`` CT, ``uint16`` MR / X-ray,
floats) is percentile-scaled, and CT windows are used whenever they are given.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "INTENSITY_METHODS",
    "VOLUMETRIC_OPTIONS",
    "ImagePreprocessor",
    "resize_volumes",
    "resolve_intensity",
    "scale_intensity",
    "to_slices",
]

INTENSITY_METHODS = ("auto", "window", "percentile", "minmax", "uint8", "none")
#: How ``mode="3d"`` runs the network: slice by slice, or as a 3-D network (ACS / inflation).
VOLUMETRIC_OPTIONS = ("slices", "acs", "inflate")


def resolve_intensity(method: str, windows, raw_dtype) -> str:
    """The intensity method ``"auto"`` stands for, given the windows and the raw image dtype."""
    if method != "auto":
        return method
    if windows:
        return "window"
    if raw_dtype is not None and np.dtype(raw_dtype) in (np.dtype(np.uint8), np.dtype(bool)):
        return "uint8"
    return "percentile"


def scale_intensity(
    img: np.ndarray,
    *,
    method: str = "auto",
    windows: Sequence[tuple[float, float]] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    channel_axis: int | None = None,
    raw_dtype=None,
) -> np.ndarray:
    """Map raw intensities to [0, 1] channels.

    Parameters
    ----------
    img : ndarray
        Image or volume. With ``channel_axis`` the channels are scaled jointly.
    method : {"auto", "window", "percentile", "minmax", "uint8", "none"}
        ``"window"``: CT windows ``(level, width)``, one output channel per window (stacked on a
        new last axis). ``"percentile"``: clip to the given percentiles of the whole image and
        rescale (MRI, ultrasound, X-ray). ``"minmax"``: per-image min-max. ``"uint8"``: divide
        by 255. ``"none"``: unchanged. ``"auto"``: see :func:`resolve_intensity`.
    windows : sequence of (level, width), optional
        CT windows in HU, e.g. ``[(40, 400), (-600, 1500)]`` (soft tissue, lung).
    percentiles : (float, float)
    channel_axis : int, optional
        Position of an existing channel axis (kept, moved last in the output).
    raw_dtype : numpy dtype, optional
        dtype of the image as the user gave it (default: ``img.dtype``), for ``"auto"``.

    Returns
    -------
    ndarray of float32 with a trailing channel axis.
    """
    method = resolve_intensity(method, windows, img.dtype if raw_dtype is None else raw_dtype)
    x = np.asarray(img, dtype=np.float32)
    if channel_axis is None:
        x = x[..., None]
    elif channel_axis not in (-1, x.ndim - 1):
        x = np.moveaxis(x, channel_axis, -1)
    if method == "window":
        if not windows:
            raise ValueError("intensity='window' needs windows=[(level, width), ...].")
        grey = x.mean(axis=-1)
        chans = []
        for level, width in windows:
            if width <= 0:
                raise ValueError(f"window width must be > 0, got {width!r}.")
            lo = level - width / 2.0
            chans.append(np.clip((grey - lo) / width, 0.0, 1.0))
        return np.stack(chans, axis=-1).astype(np.float32)
    if method == "uint8":
        return np.clip(x / 255.0, 0.0, 1.0)
    if method == "none":
        return x
    if method == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif method == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, percentiles))
    else:
        raise ValueError(f"intensity must be one of {INTENSITY_METHODS!r}; got {method!r}.")
    if hi <= lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# volumes -> 2-D network images
# --------------------------------------------------------------------------------------------
def _centre(mask: np.ndarray | None, shape: tuple) -> tuple[int, ...]:
    if mask is not None:
        idx = np.argwhere(mask)
        return tuple(int(round(v)) for v in idx.mean(axis=0))
    return tuple(s // 2 for s in shape)


def _resize_np(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == tuple(size):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def resize_volumes(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a ``(N, C, D, H, W)`` batch to ``size = (D, H, W)``: separable, antialiased.

    Each axis is resampled linearly (trilinear overall); an axis that shrinks is low-pass
    filtered first (``antialias``), as the 2-D path does for images.
    """
    n, c, d, h, w = t.shape
    d2, h2, w2 = (int(v) for v in size)
    if (h, w) != (h2, w2):
        x = t.transpose(1, 2).reshape(n * d, c, h, w)
        x = F.interpolate(x, size=(h2, w2), mode="bilinear", align_corners=False, antialias=True)
        t = x.reshape(n, d, c, h2, w2).transpose(1, 2)
    if d != d2:
        x = t.permute(0, 3, 1, 2, 4).reshape(n * h2, c, d, w2)
        x = F.interpolate(x, size=(d2, w2), mode="bilinear", align_corners=False, antialias=True)
        t = x.reshape(n, h2, c, d2, w2).permute(0, 2, 3, 1, 4)
    return t.contiguous()


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

    ``mode="2.5d"`` returns a single image whose channels are three orthogonal planes through
    the lesion centre (``slices="orthogonal"``, needs ``C == 1``) or ``n_slices`` adjacent
    axial slices (``slices="adjacent"``). ``mode="3d"`` returns every axial slice (or only
    those that contain the mask, ``slice_selection="mask"``); estimators aggregate the slices
    of a volume afterwards.
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


# --------------------------------------------------------------------------------------------
# the preprocessor
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePreprocessor:
    """Settings and code of the one path from images (and masks) to network input batches.

    Attributes
    ----------
    mode : {"2d", "2.5d", "3d"}
    intensity : str
        One of :data:`INTENSITY_METHODS`.
    windows : tuple of (level, width) or None
    percentiles : (float, float)
    slices : {"orthogonal", "adjacent"}
    n_slices : int
    slice_selection : {"mask", "all"}
    size : (int, int) or (int, int, int)
        Network input size (height, width), or (depth, height, width) for volumetric networks.
    in_chans : int
        Network input channels.
    mean, std : tuple of float
        Per-channel normalisation of the network (length ``in_chans``, or averaged to it).
    volumetric : {"slices", "acs", "inflate"}, default="slices"
        With ``mode="3d"``: ``"slices"`` makes every axial slice a 2-D network image; the
        others give one ``(C, D, H, W)`` network input per volume (whole volume, no slice
        selection) for a 3-D network.
    """

    mode: str
    intensity: str
    windows: tuple | None
    percentiles: tuple
    slices: str
    n_slices: int
    slice_selection: str
    size: tuple
    in_chans: int
    mean: tuple
    std: tuple
    volumetric: str = "slices"

    @property
    def is_volumetric(self) -> bool:
        """Whether each sample is one volume input of a 3-D network."""
        return self.mode == "3d" and getattr(self, "volumetric", "slices") != "slices"

    def key(self) -> tuple:
        """Everything that changes the network input, for cache keys."""
        return (
            self.mode,
            self.intensity,
            tuple(self.windows or ()),
            tuple(float(p) for p in self.percentiles),
            self.slices if self.mode == "2.5d" else None,
            self.n_slices if self.mode == "2.5d" and self.slices == "adjacent" else None,
            self.slice_selection if self.mode == "3d" and not self.is_volumetric else None,
            tuple(self.size),
            int(self.in_chans),
            tuple(self.mean),
            tuple(self.std),
        ) + ((self.volumetric,) if self.is_volumetric else ())

    # ------------------------------------------------------------------ per sample
    def scale(self, img: np.ndarray, raw_dtype=None) -> np.ndarray:
        """Intensity-scaled image with a trailing channel axis (float32 in [0, 1])."""
        channel_axis = -1 if (self.mode == "2d" and img.ndim == 3) else None
        return scale_intensity(
            img,
            method=self.intensity,
            windows=self.windows,
            percentiles=tuple(self.percentiles),
            channel_axis=channel_axis,
            raw_dtype=raw_dtype,
        )

    def network_images(
        self, img: np.ndarray, mask: np.ndarray | None, raw_dtype=None
    ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """The scaled network images of one sample and their masks.

        2-D images ``(h, w, c)``; for a volumetric network, the one scaled volume
        ``(d, h, w, c)`` with its mask.
        """
        scaled = self.scale(img, raw_dtype)
        if self.mode == "2d" or self.is_volumetric:
            return [scaled], [mask]
        return to_slices(
            scaled,
            mask,
            mode=self.mode,
            slices=self.slices,
            n_slices=self.n_slices,
            slice_selection=self.slice_selection,
        )

    # ------------------------------------------------------------------ batches
    def _stack(self, imgs: list[np.ndarray]) -> torch.Tensor:
        arr = np.stack([np.asarray(im, dtype=np.float32) for im in imgs])
        spatial = 3 if self.is_volumetric else 2
        if arr.ndim == spatial + 1:
            arr = arr[..., None]
        t = torch.from_numpy(arr)
        t = t.permute(0, 4, 1, 2, 3) if spatial == 3 else t.permute(0, 3, 1, 2)
        c = t.shape[1]
        if c != self.in_chans and c != 1 and self.in_chans != 1:
            raise ValueError(
                f"images have {c} intensity channel(s) but the network was set up for "
                f"{self.in_chans}; give images like those seen in fit (same channels, same CT "
                "windows)."
            )
        if self.in_chans == 1 and c != 1:
            t = t.mean(dim=1, keepdim=True)
        if spatial == 3:
            if tuple(t.shape[2:]) != tuple(self.size):
                t = resize_volumes(t, self.size)
        elif tuple(t.shape[2:]) != tuple(self.size):
            t = F.interpolate(
                t.contiguous(),
                size=self.size,
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        if t.shape[1] != self.in_chans:
            t = t.expand(-1, self.in_chans, *t.shape[2:])
        return t

    def _stack_masks(self, imgs, masks) -> torch.Tensor:
        ms = []
        spatial = 3 if self.is_volumetric else 2
        for img, m in zip(imgs, masks):
            hw = np.shape(img)[:spatial]
            ms.append(np.ones(hw, dtype=np.float32) if m is None else np.asarray(m, np.float32))
        mt = torch.from_numpy(np.stack(ms))[:, None]
        if tuple(mt.shape[2:]) != tuple(self.size):
            mt = F.interpolate(mt, size=self.size, mode="area")
        return mt

    def to_tensor(
        self, imgs: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised NCHW float32 batch of scaled 2-D images, and their resized masks.

        For a volumetric network: the NCDHW batch of scaled volumes. Images of one shape are
        resized together; a batch of mixed shapes is resized in groups of equal shape. Masks
        (``None`` entries: the whole image) are area-averaged onto the same grid, giving the
        fraction of each input pixel inside the mask.
        """
        imgs = list(imgs)
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(imgs):
            groups.setdefault(np.shape(im), []).append(i)
        if len(groups) == 1:
            x = self._stack(imgs)
        else:
            x = torch.empty((len(imgs), self.in_chans, *self.size), dtype=torch.float32)
            for rows in groups.values():
                x[rows] = self._stack([imgs[i] for i in rows])
        view = (1, -1) + (1,) * (x.dim() - 2)
        mean_t = torch.tensor(self.mean, dtype=torch.float32).view(view)
        std_t = torch.tensor(self.std, dtype=torch.float32).view(view)
        if mean_t.shape[1] != self.in_chans:
            mean_t = mean_t.mean(1, keepdim=True)
            std_t = std_t.mean(1, keepdim=True)
        x = ((x - mean_t) / std_t).contiguous()
        mt = None
        if masks is not None and any(m is not None for m in masks):
            if len(groups) == 1:
                mt = self._stack_masks(imgs, masks)
            else:
                mt = torch.empty((len(imgs), 1, *self.size), dtype=torch.float32)
                for rows in groups.values():
                    mt[rows] = self._stack_masks([imgs[i] for i in rows], [masks[i] for i in rows])
        return x, mt

    def iter_batches(
        self, data, rows: Sequence[int], batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, np.ndarray]]:
        """Yield ``(x, m, owners)`` batches of network images for the samples ``rows``.

        ``data`` is an :class:`~skrtl._imaging.ImageInput`; ``owners[j]`` is the sample of
        network image ``j`` (volumes in slice-wise 3-D mode give several images, volumes of
        a volumetric network one). Only one batch of
        network inputs is held in memory at a time.
        """
        imgs_b: list = []
        masks_b: list = []
        owners: list[int] = []
        use_masks = data.masks is not None
        for i in rows:
            mask = data.masks[i] if use_masks else None
            ims, ms = self.network_images(data.images[i], mask, data.dtype(i))
            for im, m in zip(ims, ms):
                imgs_b.append(im)
                masks_b.append(m)
                owners.append(i)
                if len(imgs_b) == batch_size:
                    x, m_t = self.to_tensor(imgs_b, masks_b if use_masks else None)
                    yield x, m_t, np.asarray(owners, dtype=np.intp)
                    imgs_b, masks_b, owners = [], [], []
        if imgs_b:
            x, m_t = self.to_tensor(imgs_b, masks_b if use_masks else None)
            yield x, m_t, np.asarray(owners, dtype=np.intp)
