"""Medical image files written with SimpleITK for the I/O tests (no skrtl code involved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: a sagittal acquisition: rows along P, columns towards inferior, slices stacked along R
SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def rotation(axis, degrees: float) -> np.ndarray:
    """Rotation matrix about ``axis`` (physical x, y, z)."""
    a = np.asarray(axis, dtype=float)
    a /= np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def sitk_volume(values_kji, *, spacing, origin, direction):
    """A SimpleITK image from a numpy ``(k, j, i)`` array and ITK-order geometry."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(values_kji)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(s) for s in origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    return img


def physical_points(img) -> np.ndarray:
    """Physical (x, y, z) position of every voxel, shape (k, j, i, 3)."""
    size = img.GetSize()
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    sp = np.asarray(img.GetSpacing())
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1) * sp
    return np.asarray(img.GetOrigin()) + ijk @ d.T


def write_dicom_series(
    folder: Path,
    hu_kji: np.ndarray,
    *,
    spacing,
    origin,
    direction,
    series_uid: str,
    description: str,
    modality: str = "CT",
    slope=1.0,
    intercept=-1024.0,
    prefix: str = "im",
    skip=(),
) -> list[Path]:
    """One DICOM file per slice ``k``; pixel values are real-world (HU) values.

    GDCM stores ``(value - intercept) / slope`` and writes the rescale tags. ``slope`` may be a
    sequence (one per slice). Slices listed in ``skip`` are not written (missing slices).
    """
    import locale

    import SimpleITK as sitk

    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer switches the C locale to "C"
    try:
        return _write_series(
            sitk,
            folder,
            hu_kji,
            spacing,
            origin,
            direction,
            series_uid,
            description,
            modality,
            slope,
            intercept,
            prefix,
            skip,
        )
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(
    sitk,
    folder,
    hu_kji,
    spacing,
    origin,
    direction,
    series_uid,
    description,
    modality,
    slope,
    intercept,
    prefix,
    skip,
):
    folder.mkdir(parents=True, exist_ok=True)
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    sp = np.asarray(spacing, dtype=float)
    org = np.asarray(origin, dtype=float)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    slopes = np.broadcast_to(np.asarray(slope, dtype=float), (hu_kji.shape[0],))
    for k in range(hu_kji.shape[0]):
        if k in skip:
            continue
        pix = hu_kji[k]
        sl = sitk.GetImageFromArray(pix.astype(np.float32 if modality == "PT" else np.int16))
        sl.SetSpacing((float(sp[0]), float(sp[1])))
        ipp = org + k * sp[2] * d[:, 2]
        iop = list(d[:, 0]) + list(d[:, 1])
        tags = {
            "0008|0060": modality,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1",
            "0020|000e": series_uid,
            "0008|103e": description,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in ipp),
            "0020|0037": "\\".join(f"{v:.6f}" for v in iop),
            "0018|0050": f"{sp[2]:g}",
            "0028|1052": f"{intercept:g}",
            "0028|1053": f"{slopes[k]:g}",
        }
        if modality == "PT":
            tags.update({"0028|0100": "16", "0028|0101": "16", "0028|0102": "15"})
            tags["0028|0103"] = "1"
        for tag, val in tags.items():
            sl.SetMetaData(tag, val)
        path = folder / f"{prefix}{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        files.append(path)
    return files
