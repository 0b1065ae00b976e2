"""Tiny cohorts of NIfTI files written with SimpleITK for the cohort / extract tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: array-order spacing (z, y, x) of the test volumes, mm
SPACING = (2.0, 0.8, 0.7)


def lesion_volume(rng, shape=(10, 32, 30), *, malignant: int = 0, second_label: bool = False):
    """int16 volume and uint8 label map: 1 = a box lesion, optionally 2 = a second structure."""
    vol = rng.normal(0, 20 + 30 * malignant, size=shape).astype(np.int16)
    mask = np.zeros(shape, np.uint8)
    z0 = int(rng.integers(1, shape[0] - 5))
    y0, x0 = (int(rng.integers(4, s - 10)) for s in shape[1:])
    mask[z0 : z0 + 4, y0 : y0 + 7, x0 : x0 + 6] = 1
    vol[mask == 1] += 80
    if second_label:
        mask[0, :3, :3] = 2
    return vol, mask


def write_nifti(path: Path, array, spacing=SPACING) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.asarray(array))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK order (x, y, z)
    sitk.WriteImage(img, str(path))


def write_cohort(folder: Path, n: int = 8, *, seed: int = 0, second_label=(2, 5)) -> Path:
    """``n`` cases (volumes + label maps) and ``cohort.csv`` in PyRadiomics' batch layout.

    Columns: ``patient``, ``Image``, ``Mask``, ``Label`` (1), ``hospital`` (A / B),
    ``age``, ``malignant`` (0 / 1), ``time``, ``event``. The masks of the rows
    ``second_label`` also hold a structure 2, so that a label is needed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % 2
        vol, mask = lesion_volume(rng, malignant=y, second_label=i in second_label)
        write_nifti(folder / f"img{i}.nii.gz", vol)
        write_nifti(folder / f"seg{i}.nii.gz", mask)
        rows.append(
            {
                "patient": f"P{i:02d}",
                "Image": f"img{i}.nii.gz",
                "Mask": f"seg{i}.nii.gz",
                "Label": 1,
                "hospital": "AB"[(i // 2) % 2],
                "age": 40 + 3 * i,
                "malignant": y,
                "time": 10.0 + i,
                "event": int(i % 3 == 0),
            }
        )
    csv = folder / "cohort.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def memory_twin(frame: pd.DataFrame) -> pd.DataFrame:
    """The in-memory image frame of a file frame (images as stored: int16; selected masks)."""
    from skrtl import iter_cases, make_image_frame

    images, masks, spacing = [], [], []
    for case in iter_cases(frame):
        images.append(case.image.array.astype(np.int16))
        masks.append(case.mask)
        spacing.append(case.image.spacing)
    extra = {c: frame[c].to_numpy() for c in frame.columns if c not in ("image", "mask",
             "mask_label", "series_uid", "spacing", "site")}  # fmt: skip
    return make_image_frame(
        images,
        masks=masks,
        spacing=spacing,
        sites=frame["site"].to_numpy() if "site" in frame.columns else None,
        index=frame.index,
        **extra,
    )
