"""Reading medical images and masks from files (DICOM, NIfTI, NRRD, MetaImage, PNG, JPEG, ...).

Every file is read with SimpleITK (GDCM for DICOM). What comes out is a :class:`MedicalImage`:
a float32 numpy array plus its geometry, in **skrtl's array conventions**:

* Volumes are ``(z, y, x)`` arrays, 2-D images ``(y, x)`` or ``(y, x, c)``.
* Volumes are **reoriented to one canonical orientation**, by default DICOM's ``"LPS"``:
  ``array[z]`` is an axial slice, ``z`` increases from inferior to superior, ``y`` (rows) from
  anterior to posterior and ``x`` (columns) from the patient's right to left. So an axial
  slice shown with ``imshow(array[z])`` is in the radiological display convention (anterior
  up, patient right on the left of the screen) whatever the scanner, the acquisition plane
  (sagittal and coronal series included) or the file format (NIfTI's RAS storage included).
  Reorientation only permutes and flips axes (no interpolation); an oblique acquisition
  keeps a residual rotation, recorded in ``direction``.
* ``spacing``, ``origin`` and ``direction`` are given in **array-axis order**: ``spacing`` is
  ``(dz, dy, dx)`` in mm; ``origin`` is the physical position (mm) of the centre of voxel
  ``array[0, 0, 0]`` with its coordinates listed as ``(z, y, x)``, that is
  ``(S, P, L)`` -- the reverse of ITK's / DICOM's ``(x, y, z)``; ``direction[a]`` is the
  unit vector of array axis ``a``, with its coordinates in the same ``(z, y, x)`` order
  (the identity after reorientation to LPS, for non-oblique images). The physical position
  of voxel index ``i`` is ``origin + (i * spacing) @ direction``.
* DICOM intensities are the DICOM *modality values*: rescale slope and intercept are applied
  (per slice), so CT comes out in Hounsfield units; other modalities are left as stored
  (no SUV conversion for PET, no vendor-private scaling for MR). ``MONOCHROME1`` images
  (some X-rays) are inverted by GDCM so that high values are bright; the original
  photometric interpretation is kept in ``MedicalImage.meta``.
* 2-D images (X-ray, ultrasound, PNG / JPEG / TIFF / BMP) keep their stored row / column
  order. Raster formats carry no physical spacing: ``spacing_known`` is ``False`` (pass
  ``spacing=`` to set it); a raster image saved as RGB(A) whose channels are equal is read as
  grey ``(y, x)``, and an alpha channel is dropped.

:func:`read_mask` reads a segmentation onto the grid of its image (geometry checked within a
tolerance, one structure of a multi-label mask selected with ``label=``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "ImageHeader",
    "ImageReadError",
    "compare_geometry",
    "MaskGeometryError",
    "MedicalImage",
    "list_dicom_series",
    "read_header",
    "read_image",
    "read_mask",
    "select_label",
    "write_image",
]

PathLike = str | os.PathLike

#: SimpleITK ImageIO name -> format name used in messages and ``MedicalImage.format``.
_IO_FORMATS = {
    "GDCMImageIO": "DICOM",
    "NiftiImageIO": "NIfTI",
    "NrrdImageIO": "NRRD",
    "MetaImageIO": "MetaImage",
    "PNGImageIO": "PNG",
    "JPEGImageIO": "JPEG",
    "TIFFImageIO": "TIFF",
    "BMPImageIO": "BMP",
}
#: formats without a patient coordinate system (no reorientation, spacing unknown)
_RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
_SUPPORTED = (
    "DICOM series folders and files, NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage "
    "(.mha, .mhd), PNG, JPEG, TIFF, BMP"
)
#: DICOM modalities whose multi-frame files are 2-D clips (time), not volumes
_CLIP_MODALITIES = ("US", "XA", "RF", "ES", "XC", "OP", "IVUS", "SC", "OT", "DX", "CR", "MG")
#: DICOM tags kept in ``MedicalImage.meta`` (no patient identifiers)
_DICOM_TAGS = {
    "Modality": "0008|0060",
    "SeriesInstanceUID": "0020|000e",
    "StudyInstanceUID": "0020|000d",
    "SeriesDescription": "0008|103e",
    "SeriesNumber": "0020|0011",
    "ImageType": "0008|0008",
    "Manufacturer": "0008|0070",
    "ManufacturerModelName": "0008|1090",
    "InstitutionName": "0008|0080",
    "StationName": "0008|1010",
    "BodyPartExamined": "0018|0015",
    "SliceThickness": "0018|0050",
    "KVP": "0018|0060",
    "ConvolutionKernel": "0018|1210",
    "MagneticFieldStrength": "0018|0087",
    "RepetitionTime": "0018|0080",
    "EchoTime": "0018|0081",
    "PhotometricInterpretation": "0028|0004",
    "RescaleType": "0028|1054",
    "Units": "0054|1001",
    "NumberOfFrames": "0028|0008",
}
_ORIENT_AXES = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


class ImageReadError(ValueError):
    """A file could not be read as an image: corrupt, unsupported, or an ambiguous DICOM folder.

    Attributes
    ----------
    path : str
        The file or folder that failed.
    """

    def __init__(self, message: str, path: PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class MaskGeometryError(ValueError):
    """A mask does not lie on its image's voxel grid (size, spacing, origin or direction).

    Attributes
    ----------
    image_path, mask_path : str or None
    differences : dict
        ``{field: (image value, mask value)}`` for every field that differs.
    """

    def __init__(self, message: str, *, image_path=None, mask_path=None, differences=None):
        super().__init__(message)
        self.image_path = image_path
        self.mask_path = mask_path
        self.differences = dict(differences or {})


# --------------------------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------------------------
@dataclass(eq=False, repr=False)
class ImageHeader:
    """Geometry and identification of an image file, read without its pixels.

    The geometry is the one :func:`read_image` returns (after reorientation), so a header
    tells the array shape and spacing a full read will give. See the module documentation
    for the axis conventions.

    Attributes
    ----------
    shape : tuple of int
        Array shape, ``(z, y, x)`` for volumes, ``(y, x)`` or ``(y, x, c)`` for 2-D images,
        ``(t, y, x[, c])`` for multi-frame clips.
    spacing : tuple of float
        mm per voxel along each spatial array axis.
    origin : tuple of float
        Physical position (mm) of voxel 0, coordinates in array-axis order.
    direction : ndarray of shape (ndim, ndim)
        ``direction[a]``: unit vector of array axis ``a`` (array-axis coordinate order).
    layout : {"zyx", "yx", "yxc", "tyx", "tyxc"}
        Meaning of the array axes.
    path : str
    format : str
        ``"DICOM"``, ``"NIfTI"``, ``"NRRD"``, ``"MetaImage"``, ``"PNG"``, ...
    modality : str or None
        DICOM Modality (``"CT"``, ``"MR"``, ``"PT"``, ``"US"``, ...), or the ``modality``
        passed to the reader; ``None`` when unknown.
    series_uid : str or None
        DICOM SeriesInstanceUID.
    orientation : str or None
        Orientation code of the array (``"LPS"``), ``None`` for 2-D images.
    spacing_known : bool
        Whether the spacing comes from the file (``False`` for PNG / JPEG / BMP / TIFF and
        DICOM without pixel spacing: then it is 1.0 per axis).
    meta : dict
        Further header information: selected DICOM tags (by keyword; no patient identifiers),
        ``original_orientation``, ``n_files``, ``stored_pixel_type``, ...
    """

    shape: tuple
    spacing: tuple
    origin: tuple
    direction: np.ndarray
    layout: str
    path: str | None = None
    format: str | None = None
    modality: str | None = None
    series_uid: str | None = None
    orientation: str | None = None
    spacing_known: bool = True
    meta: dict = field(default_factory=dict)

    @property
    def spatial_ndim(self) -> int:
        """Number of spatial axes (3 for volumes, 2 for images and clips)."""
        return len(self.spacing)

    @property
    def spatial_shape(self) -> tuple:
        """Shape of the spatial axes only (no channel or time axis)."""
        if self.layout.startswith("t"):
            return tuple(self.shape[1:3])
        return tuple(self.shape[: self.spatial_ndim])

    def __repr__(self) -> str:
        sp = tuple(round(s, 4) for s in self.spacing)
        return (
            f"{type(self).__name__}(shape={self.shape!r}, layout={self.layout!r}, spacing={sp!r}, "
            f"modality={self.modality!r}, format={self.format!r}, path={self.path!r})"
        )


@dataclass(eq=False, repr=False)
class MedicalImage(ImageHeader):
    """A medical image read from a file: float32 pixels plus geometry and header information.

    Built by :func:`read_image`. All the attributes of :class:`ImageHeader`, plus:

    Attributes
    ----------
    array : ndarray of float32
        The pixels, in the layout given by ``layout`` (``(z, y, x)`` volumes in the canonical
        orientation).
    rescale : tuple of float or None
        ``(slope, intercept)`` applied to DICOM stored values (``None`` when the file has
        none; the first slice's values when they vary per slice, see
        ``meta["rescale_varies"]``).

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import MedicalImage
    >>> img = MedicalImage.from_array(np.zeros((4, 8, 8)), spacing=(2.5, 0.7, 0.7))
    >>> img.shape, img.spacing, img.layout
    ((4, 8, 8), (2.5, 0.7, 0.7), 'zyx')
    """

    array: np.ndarray = None  # type: ignore[assignment]
    rescale: tuple | None = None

    def __post_init__(self):
        if self.array is not None:
            self.shape = tuple(int(s) for s in self.array.shape)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_array(
        cls,
        array,
        *,
        spacing=None,
        origin=None,
        direction=None,
        layout: str | None = None,
        modality: str | None = None,
        path: str | None = None,
    ) -> MedicalImage:
        """Wrap an in-memory array (no file) in a :class:`MedicalImage`.

        Parameters
        ----------
        array : array-like
            ``(z, y, x)`` volume, ``(y, x)`` or ``(y, x, c)`` image.
        spacing : float or sequence of float, optional
            mm per spatial axis (array order); unknown (1.0, ``spacing_known=False``) if not
            given.
        origin, direction : optional
            Array-axis order (see the module documentation); zeros and identity by default.
        layout : {"zyx", "yx", "yxc"}, optional
            Needed only to tell a ``(y, x, c)`` image from a ``(z, y, x)`` volume: by default a
            3-D array is a volume when ``spacing`` has 3 values or its last axis is longer
            than 4, else a channel-last image.
        modality, path : str, optional
        """
        arr = np.asarray(array)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError(f"array must be numeric, got dtype {arr.dtype!r}.")
        arr = arr.astype(np.float32, copy=False)
        sp = None if spacing is None else np.atleast_1d(np.asarray(spacing, dtype=float))
        if layout is None:
            if arr.ndim == 2:
                layout = "yx"
            elif arr.ndim == 3:
                layout = "zyx" if (sp is not None and sp.size == 3) or arr.shape[-1] > 4 else "yxc"
            else:
                raise ValueError(
                    f"array must be 2-D or 3-D (a (z, y, x) volume, a (y, x) or (y, x, c) "
                    f"image), got shape {arr.shape!r}."
                )
        if layout not in ("zyx", "yx", "yxc"):
            raise ValueError(f"layout must be 'zyx', 'yx' or 'yxc', got {layout!r}.")
        nsp = 3 if layout == "zyx" else 2
        if arr.ndim != (nsp + (layout == "yxc")):
            raise ValueError(f"an array of shape {arr.shape!r} does not have layout {layout!r}.")
        known = sp is not None
        if sp is None:
            sp = np.ones(nsp)
        elif sp.size == 1:
            sp = np.repeat(sp, nsp)
        if sp.size != nsp or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ValueError(
                f"spacing must be {nsp} finite positive values (mm per array axis) for an "
                f"image of layout {layout!r}, got {spacing!r}."
            )
        org = np.zeros(nsp) if origin is None else np.asarray(origin, dtype=float)
        dirm = np.eye(nsp) if direction is None else np.asarray(direction, dtype=float)
        if org.shape != (nsp,) or dirm.shape != (nsp, nsp):
            raise ValueError(
                f"origin must have {nsp} values and direction shape ({nsp}, {nsp}); got "
                f"{org.shape!r} and {dirm.shape!r}."
            )
        return cls(
            shape=arr.shape,
            spacing=tuple(float(v) for v in sp),
            origin=tuple(float(v) for v in org),
            direction=dirm,
            layout=layout,
            path=path,
            format=None,
            modality=modality,
            orientation=None,
            spacing_known=known,
            array=arr,
        )

    # ------------------------------------------------------------------ helpers
    def index_to_physical(self, index) -> np.ndarray:
        """Physical position (mm, array-axis coordinate order) of voxel ``index`` (may be float).

        Parameters
        ----------
        index : array-like of shape (spatial_ndim,) or (n, spatial_ndim)

        Returns
        -------
        ndarray of the same shape
        """
        idx = np.asarray(index, dtype=float)
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.direction

    def physical_to_index(self, point) -> np.ndarray:
        """Continuous voxel index of a physical point (inverse of :meth:`index_to_physical`)."""
        p = np.asarray(point, dtype=float) - np.asarray(self.origin)
        return (p @ np.linalg.inv(self.direction)) / np.asarray(self.spacing)

    def with_array(self, array, **changes) -> MedicalImage:
        """A copy with new pixels (and any changed attribute, e.g. ``spacing``, ``origin``)."""
        arr = np.asarray(array, dtype=np.float32)
        return replace(self, array=arr, shape=arr.shape, meta=dict(self.meta), **changes)

    def to_sitk(self):
        """This image as a ``SimpleITK.Image`` (ITK axis order, same physical geometry).

        Volumes and 2-D images only (multi-frame clips have no single geometry).
        """
        sitk = _sitk()
        if self.layout.startswith("t"):
            raise ValueError("to_sitk does not convert multi-frame clips; pick a frame first.")
        img = sitk.GetImageFromArray(
            np.ascontiguousarray(self.array), isVector=self.layout == "yxc"
        )
        _set_itk_geometry(img, self)
        return img

    def __repr__(self) -> str:
        sp = tuple(round(s, 4) for s in self.spacing)
        return (
            f"{type(self).__name__}(shape={self.shape!r}, layout={self.layout!r}, spacing={sp!r}, "
            f"modality={self.modality!r}, orientation={self.orientation!r}, "
            f"path={self.path!r})"
        )


# --------------------------------------------------------------------------------------------
# SimpleITK plumbing
# --------------------------------------------------------------------------------------------
def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - SimpleITK is a core dependency
        raise ImportError(
            "Reading medical image files needs SimpleITK: pip install SimpleITK"
        ) from exc
    return sitk


def _itk_direction(direction: np.ndarray) -> tuple:
    """Array-order direction -> ITK's row-major flat direction (and back: it is an involution)."""
    d = np.asarray(direction, dtype=float)
    return tuple(float(v) for v in d[::-1, ::-1].T.ravel())


def _array_direction(itk_flat, n: int) -> np.ndarray:
    d = np.asarray(itk_flat, dtype=float).reshape(n, n)
    return np.ascontiguousarray(d[::-1, ::-1].T)


def _set_itk_geometry(img, geom) -> None:
    img.SetSpacing(tuple(float(v) for v in geom.spacing[::-1]))
    img.SetOrigin(tuple(float(v) for v in geom.origin[::-1]))
    img.SetDirection(_itk_direction(geom.direction))


def _check_exists(path: PathLike, what: str) -> Path:
    if path is None or (isinstance(path, float) and np.isnan(path)):
        raise FileNotFoundError(f"no {what} path given (the cell is empty).")
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise FileNotFoundError(
            f"{what} file {os.fspath(path)!r} does not exist (looked for {str(p.absolute())!r}). "
            "Check the path; in a cohort CSV, relative paths are resolved against the CSV's "
            "folder or base_dir."
        )
    return p


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    msg = next((ln for ln in lines if "ERROR" in ln or "rror" in ln), lines[-1] if lines else "")
    return msg.replace("sitk::ERROR: ", "")


def _is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _unreadable(p: Path, what: str, exc: Exception | None = None) -> ImageReadError:
    """The clearest error we can give for a file SimpleITK cannot read."""
    modality = _pydicom_modality(p)
    if modality is not None or _is_dicom_file(p):
        if modality in ("RTSTRUCT", "SEG", "RTPLAN", "RTDOSE", "SR", "PR", "KO"):
            hint = (
                f"it is a DICOM {modality} object, not an image. Convert it to a label image "
                "(NIfTI / NRRD) first, e.g. with dcmrtstruct2nii, rt-utils or platipy for "
                "RTSTRUCT, dcmqi / highdicom / pydicom-seg for SEG."
            )
        else:
            hint = (
                "it is a DICOM file without readable pixel data (a non-image object, or pixel "
                "data in a compression SimpleITK/GDCM cannot decode); decompress it (e.g. "
                "gdcmconv --raw) or export the images again."
            )
        return ImageReadError(f"cannot read {what} {str(p)!r}: {hint}", p)
    detail = f" ({_first_line(exc)})" if exc is not None else ""
    return ImageReadError(
        f"cannot read {what} {str(p)!r}{detail}: not a readable image. Supported: {_SUPPORTED}. "
        "If the extension is right the file is probably truncated or corrupt: export it again.",
        p,
    )


def _pydicom_modality(p: Path) -> str | None:
    try:  # pydicom only to name a DICOM object SimpleITK cannot read
        import pydicom

        ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
        return str(ds.get("Modality", "")) or None
    except Exception:
        return None


def _file_reader(p: Path, what: str):
    """An ``ImageFileReader`` whose header has been read (raises ImageReadError)."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    io_name = reader.GetImageIOFromFileName(str(p))
    if not io_name:
        raise _unreadable(p, what)
    reader.SetImageIO(io_name)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(p, what, exc) from None
    return reader, _IO_FORMATS.get(io_name, io_name.replace("ImageIO", ""))


def _meta_get(getter, keys, key: str) -> str | None:
    if key not in keys:
        return None
    try:
        val = getter(key).strip()
    except (RuntimeError, UnicodeDecodeError):  # binary values
        return None
    return val or None


def _dicom_meta(getter, keys) -> dict:
    out = {}
    for name, tag in _DICOM_TAGS.items():
        val = _meta_get(getter, keys, tag)
        if val is not None:
            out[name] = val
    return out


def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(v) for v in text.replace(",", "\\").split("\\") if v.strip()]
    except ValueError:
        return None


def _dicom_spacing_known(getter, keys) -> bool:
    for tag in ("0028|0030", "0018|1164"):
        vals = _floats(_meta_get(getter, keys, tag))
        if vals and len(vals) >= 2 and all(v > 0 for v in vals[:2]):
            return True
    return False


def _rescale(getter, keys) -> tuple | None:
    slope = _floats(_meta_get(getter, keys, "0028|1053"))
    inter = _floats(_meta_get(getter, keys, "0028|1052"))
    if slope is None and inter is None:
        return None
    return (slope[0] if slope else 1.0, inter[0] if inter else 0.0)


# --------------------------------------------------------------------------------------------
# orientation
# --------------------------------------------------------------------------------------------
def _check_orientation(orientation) -> str | None:
    if orientation is None:
        return None
    code = str(orientation).upper()
    axes = [_ORIENT_AXES.get(c, (None, 0))[0] for c in code]
    if len(code) != 3 or None in axes or sorted(axes) != [0, 1, 2]:
        raise ValueError(
            f"orientation must be a 3-letter DICOM orientation code with one of L/R, P/A, S/I "
            f"each (e.g. 'LPS', 'RAS'), or None to keep the stored order; got {orientation!r}."
        )
    return code


def _orient_plan(itk_direction, target: str):
    """(perm, flips) so that ITK axis ``t`` of the output is input axis ``perm[t]``."""
    sitk = _sitk()
    current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        tuple(float(v) for v in itk_direction)
    )
    perm, flips = [], []
    for t in range(3):
        axis, sign = _ORIENT_AXES[target[t]]
        c = next(i for i in range(3) if _ORIENT_AXES[current[i]][0] == axis)
        perm.append(c)
        flips.append(_ORIENT_AXES[current[c]][1] != sign)
    return current, perm, flips


def _reorient_geometry(size, spacing, origin, itk_direction, perm, flips):
    """ITK geometry after permuting / flipping index axes (what DICOMOrient does)."""
    d = np.asarray(itk_direction, dtype=float).reshape(3, 3)
    org = np.asarray(origin, dtype=float).copy()
    new_d = np.empty((3, 3))
    for t, (c, f) in enumerate(zip(perm, flips)):
        new_d[:, t] = -d[:, c] if f else d[:, c]
        if f:
            org = org + (size[c] - 1) * spacing[c] * d[:, c]
    new_size = tuple(int(size[c]) for c in perm)
    new_spacing = tuple(float(spacing[c]) for c in perm)
    return new_size, new_spacing, tuple(org), tuple(new_d.ravel())


def _reorient_array(arr: np.ndarray, perm, flips) -> np.ndarray:
    """Apply an ITK-axis (perm, flips) plan to a numpy ``(z, y, x)`` array (a view)."""
    # numpy axis of ITK axis c is 2 - c; output numpy axis 2 - t takes input numpy axis 2 - perm[t]
    axes = [2 - perm[2 - a] for a in range(3)] + list(range(3, arr.ndim))
    out = np.transpose(arr, axes)
    for t, f in enumerate(flips):
        if f:
            out = np.flip(out, axis=2 - t)
    return out


# --------------------------------------------------------------------------------------------
# DICOM folders
# --------------------------------------------------------------------------------------------
def list_dicom_series(folder: PathLike) -> pd.DataFrame:
    """The DICOM series in a folder (not its subfolders), one row per SeriesInstanceUID.

    Parameters
    ----------
    folder : str or path

    Returns
    -------
    pandas.DataFrame
        Columns ``series_uid``, ``modality``, ``description``, ``n_files``, ``rows``,
        ``columns``, ``first_file``; empty when the folder holds no DICOM image.

    Examples
    --------
    >>> from skrtl import list_dicom_series
    >>> list_dicom_series("patient01/CT")  # doctest: +SKIP
                   series_uid modality       description  n_files  rows  columns  first_file
    0  1.2.826.0.1.3680...   CT  "AX 2.5mm STD" ...
    """
    sitk = _sitk()
    p = _check_exists(folder, "DICOM folder")
    if not p.is_dir():
        raise NotADirectoryError(f"{str(p)!r} is not a folder.")
    rows = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), uid)
        info = {"series_uid": uid, "modality": None, "description": None, "n_files": len(files)}
        info.update(rows=None, columns=None, first_file=files[0] if files else None)
        if files:
            try:
                reader, _ = _file_reader(Path(files[0]), "DICOM file")
                keys = reader.GetMetaDataKeys()
                info["modality"] = _meta_get(reader.GetMetaData, keys, "0008|0060")
                info["description"] = _meta_get(reader.GetMetaData, keys, "0008|103e")
                size = reader.GetSize()
                info["rows"], info["columns"] = int(size[1]), int(size[0])
            except ImageReadError:
                pass
        rows.append(info)
    cols = ["series_uid", "modality", "description", "n_files", "rows", "columns", "first_file"]
    return pd.DataFrame(rows, columns=cols)


def _series_listing(table: pd.DataFrame) -> str:
    return "\n".join(
        f"  - {r.series_uid}  modality={r.modality}  description={r.description!r}  "
        f"{r.n_files} file(s)  {r.rows}x{r.columns}"
        for r in table.itertuples()
    )


def _series_files(p: Path, series_uid: str | None, what: str) -> tuple[list[str], str]:
    sitk = _sitk()
    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)))
    if not ids:
        entries = sorted(os.listdir(p))
        subdirs = [e for e in entries if (p / e).is_dir()]
        files = [e for e in entries if (p / e).is_file()]
        hint = (
            f" It has subfolders {subdirs[:5]!r}: point the path at the series folder itself."
            if subdirs
            else ""
        )
        raise ImageReadError(
            f"{what} folder {str(p)!r} holds no DICOM image series ({len(files)} file(s), e.g. "
            f"{files[:3]!r}).{hint} A folder path is read as one DICOM series; pass a file path "
            "for NIfTI / NRRD / MHA / PNG.",
            p,
        )
    if series_uid is None:
        if len(ids) > 1:
            table = list_dicom_series(p)
            raise ImageReadError(
                f"{what} folder {str(p)!r} holds {len(ids)} DICOM series; choose one with "
                f"series_uid=... (a 'series_uid' column in a cohort):\n{_series_listing(table)}",
                p,
            )
        series_uid = ids[0]
    elif series_uid not in ids:
        table = list_dicom_series(p)
        raise ImageReadError(
            f"series_uid={series_uid!r} is not in {what} folder {str(p)!r}; it holds:\n"
            f"{_series_listing(table)}",
            p,
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), series_uid))
    return files, series_uid


def _check_slices(reader, n: int, p: Path, irregular: str, tolerance: float) -> dict:
    """Orientation consistency and slice-spacing regularity of a series (raises or warns)."""
    keys0 = reader.GetMetaDataKeys(0)
    if "0020|0032" not in keys0 or "0020|0037" not in keys0 or n < 2:
        return {"slice_positions_checked": False}
    iops, ipps = [], []
    for k in range(n):
        iop = (
            _floats(reader.GetMetaData(k, "0020|0037"))
            if reader.HasMetaDataKey(k, "0020|0037")
            else None
        )
        ipp = (
            _floats(reader.GetMetaData(k, "0020|0032"))
            if reader.HasMetaDataKey(k, "0020|0032")
            else None
        )
        if not iop or not ipp or len(iop) != 6 or len(ipp) != 3:
            return {"slice_positions_checked": False}
        iops.append(iop)
        ipps.append(ipp)
    iops, ipps = np.asarray(iops), np.asarray(ipps)
    if np.abs(iops - iops[0]).max() > 1e-3:
        n_orient = len({tuple(np.round(r, 3)) for r in iops})
        raise ImageReadError(
            f"DICOM series {str(p)!r} mixes {n_orient} slice orientations (a localizer or a "
            "multi-planar series under one SeriesInstanceUID); it is not one volume. Export the "
            "planes as separate series, or read single files.",
            p,
        )
    row, col = iops[0, :3], iops[0, 3:]
    normal = np.cross(row, col)
    pos = ipps @ normal
    order = np.argsort(pos)
    pos, ipps = pos[order], ipps[order]
    gaps = np.diff(pos)
    med = float(np.median(gaps))
    info = {"slice_positions_checked": True, "slice_gap_min": float(gaps.min())}
    info["slice_gap_max"] = float(gaps.max())
    if med <= 1e-6 or gaps.min() <= 1e-3 * max(med, 1e-3):
        raise ImageReadError(
            f"DICOM series {str(p)!r}: several images share one slice position "
            f"({n} images at {len(np.unique(np.round(pos, 3)))} positions): a multi-echo, "
            "dynamic or multi-phase series. Split it (e.g. by EchoTime or "
            "TemporalPositionIdentifier) into one folder per volume.",
            p,
        )
    drift = (ipps - ipps[0]) - np.outer(pos - pos[0], normal)
    drift = float(np.linalg.norm(drift, axis=1).max())
    problems = []
    if np.abs(gaps - med).max() > tolerance * med:
        problems.append(
            f"slice gaps range from {gaps.min():.4g} to {gaps.max():.4g} mm (median {med:.4g}): "
            "missing slices or irregular spacing"
        )
    if drift > tolerance * med * (n - 1):
        problems.append(
            f"slice origins drift {drift:.3g} mm in-plane across the stack (gantry tilt or "
            "sheared acquisition)"
        )
    if problems:
        msg = (
            f"DICOM series {str(p)!r}: " + "; ".join(problems) + ". Read as one volume, its "
            "geometry would be wrong. Fix the series (e.g. dcm2niix corrects gantry tilt), or "
            "pass irregular_slices='warn' to read it anyway with the mean slice spacing."
        )
        if irregular == "error":
            raise ImageReadError(msg, p)
        warnings.warn(msg, UserWarning, stacklevel=4)
        info["irregular_slices"] = True
    return info


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
@dataclass
class _Raw:
    """What a reader produced before layout / orientation decisions."""

    size: tuple  # ITK order
    spacing: tuple
    origin: tuple
    direction: tuple  # ITK flat
    ncomp: int
    fmt: str
    path: Path
    meta: dict
    modality: str | None = None
    series_uid: str | None = None
    spacing_known: bool = True
    rescale: tuple | None = None
    image: object = None  # sitk.Image when pixels were read


def _header_raw(
    p: Path, *, series_uid, what: str, read_pixels: bool, irregular: str, slice_tolerance: float
) -> _Raw:
    sitk = _sitk()
    if p.is_dir():
        files, uid = _series_files(p, series_uid, what)
        if len(files) == 1:
            return _header_raw(
                Path(files[0]),
                series_uid=None,
                what=what,
                read_pixels=read_pixels,
                irregular=irregular,
                slice_tolerance=slice_tolerance,
            )
        first, fmt = _file_reader(Path(files[0]), what)
        keys = first.GetMetaDataKeys()
        meta = _dicom_meta(first.GetMetaData, keys)
        meta["n_files"] = len(files)
        raw = _Raw(
            size=(),
            spacing=(),
            origin=(),
            direction=(),
            ncomp=first.GetNumberOfComponents(),
            fmt="DICOM",
            path=p,
            meta=meta,
            modality=meta.get("Modality"),
            series_uid=uid,
            spacing_known=_dicom_spacing_known(first.GetMetaData, keys),
            rescale=_rescale(first.GetMetaData, keys),
        )
        if read_pixels:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()
            reader.SetOutputPixelType(sitk.sitkFloat32)
            try:
                img = reader.Execute()
            except RuntimeError as exc:
                raise ImageReadError(
                    f"cannot read DICOM series {uid!r} in {str(p)!r}: {_first_line(exc)}. A "
                    "slice may be corrupt or of another size; check the folder.",
                    p,
                ) from None
            meta.update(_check_slices(reader, len(files), p, irregular, slice_tolerance))
            rescales = {
                _rescale(lambda k, i=i: reader.GetMetaData(i, k), reader.GetMetaDataKeys(i))
                for i in range(len(files))
            }
            if len(rescales) > 1:
                meta["rescale_varies"] = True
            raw.image = img
            raw.size, raw.spacing = img.GetSize(), img.GetSpacing()
            raw.origin, raw.direction = img.GetOrigin(), img.GetDirection()
            meta["stored_pixel_type"] = _sitk().GetPixelIDValueAsString(first.GetPixelID())
        else:
            last, _ = _file_reader(Path(files[-1]), what)
            o0, o1 = np.asarray(first.GetOrigin()), np.asarray(last.GetOrigin())
            d = np.asarray(first.GetDirection()).reshape(3, 3)
            dz = abs(float((o1 - o0) @ d[:, 2])) / (len(files) - 1)
            size = first.GetSize()
            raw.size = (size[0], size[1], len(files))
            sp = first.GetSpacing()
            raw.spacing = (sp[0], sp[1], dz if dz > 0 else sp[2])
            # GDCM sorts files along the slice normal: the first is the lowest position
            raw.origin = first.GetOrigin() if (o1 - o0) @ d[:, 2] >= 0 else last.GetOrigin()
            raw.direction = first.GetDirection()
            meta["stored_pixel_type"] = _sitk().GetPixelIDValueAsString(first.GetPixelID())
        return raw

    reader, fmt = _file_reader(p, what)
    keys = reader.GetMetaDataKeys()
    meta: dict = {}
    raw = _Raw(
        size=reader.GetSize(),
        spacing=reader.GetSpacing(),
        origin=reader.GetOrigin(),
        direction=reader.GetDirection(),
        ncomp=reader.GetNumberOfComponents(),
        fmt=fmt,
        path=p,
        meta=meta,
    )
    meta["stored_pixel_type"] = _sitk().GetPixelIDValueAsString(reader.GetPixelID())
    if fmt == "DICOM":
        meta.update(_dicom_meta(reader.GetMetaData, keys))
        raw.modality = meta.get("Modality")
        raw.series_uid = meta.get("SeriesInstanceUID")
        raw.spacing_known = _dicom_spacing_known(reader.GetMetaData, keys) or any(
            abs(s - 1.0) > 1e-9 for s in raw.spacing[:2]
        )
        raw.rescale = _rescale(reader.GetMetaData, keys)
        if raw.modality in ("SEG", "RTSTRUCT"):
            raise _unreadable(p, what)
        if series_uid is not None and raw.series_uid not in (None, series_uid):
            raise ImageReadError(
                f"{what} {str(p)!r} belongs to series {raw.series_uid!r}, not the requested "
                f"series_uid={series_uid!r}.",
                p,
            )
    elif fmt == "NIfTI":
        if read_pixels:
            _check_nifti_complete(p, what)
        for key in ("scl_slope", "scl_inter", "descrip", "qform_code_name", "sform_code_name"):
            val = _meta_get(reader.GetMetaData, keys, key)
            if val is not None:
                meta[key] = val
    elif fmt in _RASTER_FORMATS:
        raw.spacing_known = False
    if read_pixels:
        try:
            raw.image = reader.Execute()
        except RuntimeError as exc:
            extra = (
                " (a .mhd header needs the data file named in its ElementDataFile line)"
                if p.suffix.lower() == ".mhd"
                else ""
            )
            raise ImageReadError(
                f"cannot read the pixels of {what} {str(p)!r} ({fmt}): {_first_line(exc)}"
                f"{extra}. The file is probably truncated or corrupt: export it again.",
                p,
            ) from None
    return raw


def _nifti_data_end(header: bytes) -> int | None:
    """vox_offset + data size from a NIfTI-1 / NIfTI-2 header (None if it is not one)."""
    import struct

    if len(header) < 348:
        return None
    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset, minimum = int(struct.unpack(endian + "f", header[108:112])[0]), 352
            break
        if size == 540 and len(header) >= 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset, minimum = int(struct.unpack(endian + "q", header[168:176])[0]), 544
            break
    else:
        return None
    if not 1 <= int(dims[0]) <= 7 or bitpix <= 0:
        return None
    n = int(np.prod([max(1, int(d)) for d in dims[1 : int(dims[0]) + 1]], dtype=np.int64))
    return max(offset, minimum) + n * int(bitpix) // 8


def _check_nifti_complete(p: Path, what: str) -> None:
    """ITK zero-fills truncated NIfTI files silently: refuse them instead."""
    import zlib

    gz = p.suffix.lower() == ".gz"
    try:
        with open(p, "rb") as fh:
            head = fh.read(1 << 16 if gz else 540)
        if gz:  # decompress what is there, even from a truncated stream
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 540)
    except (OSError, zlib.error):
        head = b""
    end = _nifti_data_end(head)
    if end is None:
        return  # an Analyze pair or an unusual header: leave it to ITK
    if not gz:
        have = p.stat().st_size
    else:
        with open(p, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = int.from_bytes(fh.read(4), "little")
        if isize == end % 2**32:
            return
        # the gzip trailer disagrees (truncated, or a multi-member file): count exactly
        have = 0
        dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    have += len(dec.decompress(chunk))
                    while dec.unused_data:  # concatenated gzip members
                        rest = dec.unused_data
                        dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
                        have += len(dec.decompress(rest))
        except zlib.error:
            pass
    if have < end:
        raise ImageReadError(
            f"{what} {str(p)!r} is truncated: its NIfTI header describes {end} bytes but the "
            f"file holds {have}. ITK would fill the missing voxels with zeros; copy or export "
            "the file again.",
            p,
        )


def _resolve(
    raw: _Raw, *, orientation: str | None, frame: int | None, what: str
) -> tuple[dict, object]:
    """Decide the layout and canonical geometry; returns (header fields, pixel plan)."""
    size, ndim = tuple(raw.size), len(raw.size)
    sitk_img = raw.image
    p = raw.path
    fmt = raw.fmt
    if ndim == 4:
        if frame is None:
            raise ImageReadError(
                f"{what} {str(p)!r} is a 4-D image of size {size!r} (x, y, z, t); pass "
                f"frame=<0..{size[3] - 1}> to read one volume.",
                p,
            )
        if not 0 <= frame < size[3]:
            raise ValueError(
                f"frame={frame!r} is out of range for {size[3]} frames of {str(p)!r}."
            )
        if sitk_img is not None:
            sitk_img = sitk_img[:, :, :, int(frame)]
        d4 = np.asarray(raw.direction).reshape(4, 4)
        size, ndim = size[:3], 3
        raw = replace(
            raw,
            size=size,
            spacing=tuple(raw.spacing[:3]),
            origin=tuple(raw.origin[:3]),
            direction=tuple(d4[:3, :3].ravel()),
            image=sitk_img,
        )
        raw.meta["frame"] = int(frame)
        frame = None
    if ndim not in (2, 3):
        raise ImageReadError(f"{what} {str(p)!r} has {ndim} dimensions; 2, 3 or 4 expected.", p)
    ncomp = raw.ncomp
    # --- layout
    if ndim == 3 and fmt == "DICOM" and (size[2] == 1 or raw.meta.get("n_files") is None):
        n_frames = size[2]
        if n_frames == 1:
            layout = "yxc" if ncomp > 1 else "yx"
        elif ncomp > 1 or raw.modality in _CLIP_MODALITIES or raw.modality is None:
            layout = "tyxc" if ncomp > 1 else "tyx"
        else:
            layout = "zyx"  # multi-frame CT / MR / PET / NM volume
    elif ndim == 3:
        if ncomp > 1:
            raise ImageReadError(
                f"{what} {str(p)!r} is a 3-D image with {ncomp} components per voxel (vector or "
                "colour volume); skrtl reads scalar volumes. Split the components first.",
                p,
            )
        layout = "zyx"
    else:
        layout = "yxc" if ncomp > 1 else "yx"
    if frame is not None and not layout.startswith("t"):
        raise ValueError(
            f"frame={frame!r} was given but {what} {str(p)!r} is not a multi-frame clip or a 4-D "
            f"image (layout {layout!r}); leave frame=None."
        )
    if layout.startswith("t") and frame is not None:
        if not 0 <= frame < size[2]:
            raise ValueError(
                f"frame={frame!r} is out of range for {size[2]} frames of {str(p)!r}."
            )
        layout = layout[1:]
    fields: dict = {
        "path": str(p),
        "format": fmt,
        "modality": raw.modality,
        "series_uid": raw.series_uid,
        "spacing_known": raw.spacing_known,
        "meta": raw.meta,
    }
    fields["layout"] = layout
    plan: dict = {"frame": frame, "layout": layout, "perm": None, "flips": None}
    if layout == "zyx":
        itk_size, itk_sp, itk_org, itk_dir = size, raw.spacing, raw.origin, raw.direction
        if orientation is not None and fmt not in _RASTER_FORMATS:
            current, perm, flips = _orient_plan(raw.direction, orientation)
            raw.meta["original_orientation"] = current
            itk_size, itk_sp, itk_org, itk_dir = _reorient_geometry(
                size, raw.spacing, raw.origin, raw.direction, perm, flips
            )
            raw.meta["reoriented"] = current != orientation
            plan.update(perm=perm, flips=flips)
            fields["orientation"] = orientation
        else:
            fields["orientation"] = None
        fields.update(
            shape=tuple(int(s) for s in itk_size[::-1]),
            spacing=tuple(float(s) for s in itk_sp[::-1]),
            origin=tuple(float(s) for s in itk_org[::-1]),
            direction=_array_direction(itk_dir, 3),
        )
    else:
        sp = tuple(float(s) for s in raw.spacing[:2][::-1])
        org = tuple(float(s) for s in raw.origin[:2][::-1])
        d = np.asarray(raw.direction, dtype=float).reshape(ndim, ndim)[:2, :2]
        shape = (int(size[1]), int(size[0]))
        if layout.startswith("t"):
            shape = (int(size[2]),) + shape
        if layout.endswith("c"):
            shape = shape + (int(ncomp),)
        if fmt in _RASTER_FORMATS:
            sp, org, d = (1.0, 1.0), (0.0, 0.0), np.eye(2)
        fields.update(
            shape=shape,
            spacing=sp,
            origin=org,
            direction=_array_direction(tuple(d.ravel()), 2),
            orientation=None,
        )
    if not fields["spacing_known"]:
        fields["spacing"] = tuple(1.0 for _ in fields["spacing"])
    return fields, (plan, sitk_img)


def _pixels(sitk_img, plan: dict) -> np.ndarray:
    """Pixels of a SimpleITK image in the planned layout, as float32 (one copy)."""
    sitk = _sitk()
    arr = sitk.GetArrayViewFromImage(sitk_img)
    layout = plan["layout"]
    if arr.ndim == 3 + (sitk_img.GetNumberOfComponentsPerPixel() > 1) and layout in ("yx", "yxc"):
        arr = arr[plan["frame"] if plan["frame"] is not None else 0]
    if plan["perm"] is not None:
        arr = _reorient_array(arr, plan["perm"], plan["flips"])
    return np.array(arr, dtype=np.float32, order="C")


def _raw_values(sitk_img, plan: dict) -> np.ndarray:
    """Like :func:`_pixels` but keeping the stored dtype (masks)."""
    sitk = _sitk()
    arr = sitk.GetArrayViewFromImage(sitk_img)
    if arr.ndim == 3 + (sitk_img.GetNumberOfComponentsPerPixel() > 1) and plan["layout"] in (
        "yx",
        "yxc",
    ):
        arr = arr[plan["frame"] if plan["frame"] is not None else 0]
    if plan["perm"] is not None:
        arr = _reorient_array(arr, plan["perm"], plan["flips"])
    return np.ascontiguousarray(arr)


def _check_common(frame, irregular_slices, slice_tolerance):
    if frame is not None and (not isinstance(frame, Integral) or isinstance(frame, bool)):
        raise TypeError(f"frame must be an int or None, got {frame!r}.")
    if irregular_slices not in ("error", "warn"):
        raise ValueError(f"irregular_slices must be 'error' or 'warn', got {irregular_slices!r}.")
    if not (isinstance(slice_tolerance, int | float) and 0 < slice_tolerance < 1):
        raise ValueError(f"slice_tolerance must be in (0, 1), got {slice_tolerance!r}.")


def read_header(
    path: PathLike,
    *,
    series_uid: str | None = None,
    orientation: str | None = "LPS",
    frame: int | None = None,
) -> ImageHeader:
    """Read an image's geometry and identification without its pixels (fast).

    Gives the shape, spacing, origin and direction that :func:`read_image` would return with
    the same arguments. For a DICOM series the slice spacing is estimated from the first and
    last slice positions (the full read checks every slice). A raster image saved as RGB with
    equal channels has 3 channels here but is read as grey by :func:`read_image`.

    Parameters
    ----------
    path : str or path
        An image file or a DICOM series folder.
    series_uid, orientation, frame
        As in :func:`read_image`.

    Returns
    -------
    ImageHeader
    """
    orientation = _check_orientation(orientation)
    _check_common(frame, "error", 0.1)
    p = _check_exists(path, "image")
    raw = _header_raw(
        p,
        series_uid=series_uid,
        what="image",
        read_pixels=False,
        irregular="error",
        slice_tolerance=0.1,
    )
    fields, _ = _resolve(raw, orientation=orientation, frame=frame, what="image")
    return ImageHeader(**fields)


def read_image(
    path: PathLike,
    *,
    series_uid: str | None = None,
    orientation: str | None = "LPS",
    frame: int | None = None,
    spacing=None,
    modality: str | None = None,
    irregular_slices: str = "error",
    slice_tolerance: float = 0.1,
) -> MedicalImage:
    """Read a medical image file or DICOM series into a :class:`MedicalImage`.

    Parameters
    ----------
    path : str or path
        A DICOM series folder, a single DICOM file (CT / MR slice, X-ray, ultrasound, multi-frame),
        NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
        ``.mhd``), PNG, JPEG, TIFF or BMP. The format is detected from the content.
    series_uid : str, optional
        SeriesInstanceUID to read when a folder holds several series (the error raised
        without it lists them, with description and number of files).
    orientation : str or None, default="LPS"
        Canonical orientation of volumes (a DICOM orientation code: ``"LPS"`` makes
        ``array[z]`` an axial slice in radiological display, ``"RAS"`` is NIfTI's world
        convention). ``None`` keeps the stored axis order. 2-D images are never reoriented.
    frame : int, optional
        For a 4-D image (NIfTI time series, ...) or a multi-frame 2-D clip (ultrasound cine):
        the frame to read. A clip without ``frame`` is read whole, ``(t, y, x[, c])``.
    spacing : float or sequence of float, optional
        Override the spacing (mm, array-axis order), e.g. the known pixel size of a PNG.
    modality : str, optional
        Set / override the modality (NIfTI and raster files carry none), e.g. ``"CT"``.
    irregular_slices : {"error", "warn"}, default="error"
        A DICOM series with missing slices, irregular slice gaps or in-plane drift (gantry
        tilt) does not form a regular volume: raise, or warn and read it with the mean slice
        spacing (what ITK does silently).
    slice_tolerance : float, default=0.1
        Tolerated deviation of slice gaps from their median, as a fraction of it.

    Returns
    -------
    MedicalImage

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ImageReadError
        Unreadable, corrupt or unsupported file; a DICOM folder with several series and no
        ``series_uid``, or none; a DICOM RTSTRUCT / SEG object (convert it to a label image).

    Examples
    --------
    >>> from skrtl import read_image
    >>> ct = read_image("patient01/CT")  # doctest: +SKIP
    >>> ct.array.shape, ct.spacing, ct.modality  # doctest: +SKIP
    ((120, 512, 512), (2.5, 0.78, 0.78), 'CT')
    """
    orientation = _check_orientation(orientation)
    _check_common(frame, irregular_slices, slice_tolerance)
    p = _check_exists(path, "image")
    raw = _header_raw(
        p,
        series_uid=series_uid,
        what="image",
        read_pixels=True,
        irregular=irregular_slices,
        slice_tolerance=slice_tolerance,
    )
    rescale = raw.rescale
    fields, (plan, sitk_img) = _resolve(raw, orientation=orientation, frame=frame, what="image")
    arr = _pixels(sitk_img, plan)
    if plan["layout"] == "yxc" and arr.shape[-1] == 4 and fields["format"] in _RASTER_FORMATS:
        arr = np.ascontiguousarray(arr[..., :3])  # RGBA: the alpha channel carries no image
        fields["meta"]["alpha_dropped"] = True
    if (
        plan["layout"] == "yxc"
        and fields["format"] in _RASTER_FORMATS
        and all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, arr.shape[-1]))
    ):  # a grey image saved as RGB (exported X-rays, BMP palettes)
        arr = np.ascontiguousarray(arr[..., 0])
        plan["layout"] = fields["layout"] = "yx"
        fields["meta"]["grey_from_rgb"] = True
    if fields["modality"] is None and modality is not None:
        fields["modality"] = str(modality)
    elif modality is not None and str(modality) != fields["modality"]:
        fields["meta"]["file_modality"] = fields["modality"]
        fields["modality"] = str(modality)
    img = MedicalImage(**fields, array=arr, rescale=rescale)
    if spacing is not None:
        sp = np.atleast_1d(np.asarray(spacing, dtype=float))
        nsp = len(img.spacing)
        sp = np.repeat(sp, nsp) if sp.size == 1 else sp
        if sp.size != nsp or np.any(~np.isfinite(sp)) or np.any(sp <= 0):
            raise ValueError(
                f"spacing must be {nsp} positive values (mm, array-axis order) for "
                f"{str(p)!r}, got {spacing!r}."
            )
        img.meta["file_spacing"] = img.spacing if img.spacing_known else None
        img.spacing = tuple(float(v) for v in sp)
        img.spacing_known = True
    return img


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def _label_summary(values: np.ndarray, counts: np.ndarray, limit: int = 12) -> str:
    parts = [f"{_fmt_label(v)} ({int(c)} voxels)" for v, c in zip(values[:limit], counts[:limit])]
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return ", ".join(parts) + more


def _fmt_label(v) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def select_label(mask, label=None, *, name: str = "mask") -> np.ndarray:
    """Boolean mask of one structure (or several) of a label map.

    Parameters
    ----------
    mask : array-like
        Binary or multi-label mask (0 = background). Boolean masks are returned as they are.
    label : int, sequence of int or None, default=None
        The label value to select; a sequence selects the union of those labels. ``None``
        accepts a mask with a single non-zero value (binary masks, 0/255 masks) and raises
        when there are several: skrtl never silently merges structures (PyRadiomics would
        take label 1).
    name : str
        How the mask is named in error messages (e.g. its file path).

    Returns
    -------
    ndarray of bool

    Raises
    ------
    ValueError
        The mask is empty; the label is absent (the message lists the labels present with
        their voxel counts); several labels and ``label=None``; non-integer values (a
        probability map: threshold it first); NaN values.

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import select_label
    >>> m = np.array([[0, 1, 2], [2, 2, 0]])
    >>> select_label(m, 2).astype(int)
    array([[0, 0, 1],
           [1, 1, 0]])
    """
    m = np.asarray(mask)
    if m.dtype == bool:
        if label is not None:
            labels = _as_labels(label)
            if labels != [1]:
                if not m.any():
                    raise ValueError(f"{name} is empty (no non-zero voxel).")
                raise ValueError(
                    f"label={label!r} is not in {name}: it is a boolean mask (label 1 only)."
                )
        if not m.any():
            raise ValueError(
                f"{name} is empty (no non-zero voxel): features need a region of interest. Fix "
                "or drop that case."
            )
        return m
    if not np.issubdtype(m.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {m.dtype!r}.")
    nz = m[m != 0]
    if nz.size == 0:
        raise ValueError(
            f"{name} is empty (no non-zero voxel): features need a region of interest. Fix or "
            "drop that case."
        )
    if np.issubdtype(m.dtype, np.floating):
        if not np.isfinite(nz).all():
            raise ValueError(f"{name} contains NaN or infinite values.")
        frac = nz[nz != np.round(nz)]
        if frac.size:
            raise ValueError(
                f"{name} holds non-integer values (e.g. {float(frac[0])!r}): a probability map "
                "or an interpolated mask, not a label map. Threshold it first (e.g. mask > 0.5) "
                "or resample masks with nearest neighbour."
            )
    values, counts = np.unique(nz, return_counts=True)
    if label is None:
        if values.size > 1:
            raise ValueError(
                f"{name} has {values.size} labels: {_label_summary(values, counts)}. Choose the "
                "structure with label=<int> (or a list of labels for their union)."
            )
        return m != 0
    labels = _as_labels(label)
    absent = [lab for lab in labels if lab not in set(values.tolist())]
    if absent:
        raise ValueError(
            f"label {absent[0]!r} is not in {name}; labels present: "
            f"{_label_summary(values, counts)}. Pass one of them as label=."
        )
    if len(labels) == 1:
        return m == labels[0]
    return np.isin(m, labels)


def _as_labels(label) -> list:
    items = (
        list(label)
        if isinstance(label, Sequence | np.ndarray) and not isinstance(label, str)
        else [label]
    )
    out = []
    for lab in items:
        if isinstance(lab, bool) or not isinstance(lab, Integral | np.integer | float):
            raise TypeError(f"label must be a positive int or a list of them, got {label!r}.")
        if float(lab) != int(lab) or int(lab) <= 0:
            raise ValueError(f"label must be a positive integer (0 is background), got {label!r}.")
        out.append(int(lab))
    if not out:
        raise ValueError("label is an empty list; give at least one label value.")
    return out


def compare_geometry(image: ImageHeader, mask: ImageHeader, *, tolerance: float = 1e-3) -> dict:
    """Differences between the voxel grids of an image and its mask (empty dict: they match).

    Compares the spatial size, then -- when both carry a physical spacing -- spacing, origin
    and direction, with the tolerance of :func:`read_mask`. Works on headers
    (:func:`read_header`, read with the image's orientation) as well as on images.

    Parameters
    ----------
    image, mask : ImageHeader or MedicalImage
    tolerance : float, default=1e-3
        Spacing and origin may differ by ``tolerance`` times the smallest image spacing (mm),
        direction cosines by ``tolerance``.

    Returns
    -------
    dict
        ``{field: (image value, mask value)}`` for ``"size"``, ``"spacing"``, ``"origin"``,
        ``"direction"``.
    """
    if image.spatial_ndim == 2 and mask.layout == "zyx" and mask.shape[0] == 1:
        if tuple(image.spatial_shape) != tuple(mask.shape[1:]):
            return {"size": (tuple(image.spatial_shape), tuple(mask.shape[1:]))}
        return {}
    return _geometry_differences(image, mask, tolerance)


def _geometry_differences(ref: ImageHeader, mask: ImageHeader, tol: float) -> dict:
    diffs = {}
    if tuple(ref.spatial_shape) != tuple(mask.spatial_shape):
        diffs["size"] = (tuple(ref.spatial_shape), tuple(mask.spatial_shape))
        return diffs
    if not (ref.spacing_known and mask.spacing_known):
        return diffs  # raster / uncalibrated side: only the pixel grid can be compared
    scale = float(min(ref.spacing))
    rs, ms = np.asarray(ref.spacing), np.asarray(mask.spacing)
    if np.abs(rs - ms).max() > tol * scale:
        diffs["spacing"] = (ref.spacing, mask.spacing)
    ro, mo = np.asarray(ref.origin), np.asarray(mask.origin)
    if np.abs(ro - mo).max() > tol * scale:
        diffs["origin"] = (ref.origin, mask.origin)
    if np.abs(np.asarray(ref.direction) - np.asarray(mask.direction)).max() > tol:
        diffs["direction"] = (
            np.round(ref.direction, 4).tolist(),
            np.round(mask.direction, 4).tolist(),
        )
    return diffs


def _fmt_geom(v):
    if isinstance(v, tuple) and v and isinstance(v[0], float):
        return tuple(round(x, 4) for x in v)
    return v


def read_mask(
    path: PathLike,
    *,
    reference: ImageHeader | None = None,
    label=None,
    geometry_tolerance: float = 1e-3,
    resample: bool = False,
    series_uid: str | None = None,
) -> np.ndarray:
    """Read a segmentation mask onto its image's grid and select one structure.

    Parameters
    ----------
    path : str or path
        Mask file (NIfTI, NRRD, MHA, PNG, ... or a DICOM series of label images). DICOM SEG /
        RTSTRUCT objects are not read: convert them to a label image first.
    reference : MedicalImage or ImageHeader, optional
        The image the mask belongs to. The mask is reoriented like it, and its geometry
        checked: size, then (when both carry a physical spacing) spacing, origin and
        direction. Without it the mask is read on its own (reoriented to LPS).
    label : int, sequence of int or None, default=None
        Structure to select (see :func:`select_label`): ``None`` requires a single non-zero
        value.
    geometry_tolerance : float, default=1e-3
        Like PyRadiomics' ``geometryTolerance``: spacing and origin may differ by up to
        ``geometry_tolerance`` times the smallest image spacing (in mm), direction cosines by
        ``geometry_tolerance``.
    resample : bool, default=False
        Opt-in: resample a mask whose geometry differs onto the image grid (nearest
        neighbour, outside = background) instead of raising.
    series_uid : str, optional
        For a DICOM folder holding several series.

    Returns
    -------
    ndarray of bool
        Same spatial shape as the reference's array.

    Raises
    ------
    MaskGeometryError
        The geometry differs beyond the tolerance and ``resample=False``; the message names both
        files and every differing field.
    ValueError
        Empty mask, absent label, several labels without ``label``, or (after resampling) a
        mask that lies outside the image.
    """
    if not (isinstance(geometry_tolerance, int | float) and geometry_tolerance >= 0):
        raise ValueError(f"geometry_tolerance must be a number >= 0, got {geometry_tolerance!r}.")
    p = _check_exists(path, "mask")
    orientation = "LPS" if reference is None else reference.orientation
    raw = _header_raw(
        p,
        series_uid=series_uid,
        what="mask",
        read_pixels=True,
        irregular="error",
        slice_tolerance=0.1,
    )
    if raw.ncomp > 1:
        raw = _scalar_mask(raw)
    fields, (plan, sitk_img) = _resolve(raw, orientation=orientation, frame=None, what="mask")
    header = ImageHeader(**fields)
    name = f"mask {str(p)!r}"
    ref_name = (
        "<in-memory image>" if reference is None or not reference.path else repr(reference.path)
    )
    if reference is None:
        return select_label(_raw_values(sitk_img, plan), label, name=name)
    if reference.layout.startswith("t"):
        raise ValueError(
            f"image {reference.path!r} is a multi-frame clip; read one frame (frame=) before "
            "pairing it with a mask."
        )
    if reference.spatial_ndim == 2 and header.layout == "zyx" and header.shape[0] == 1:
        # a 2-D mask stored as a one-slice volume (NIfTI from 2-D tools)
        plan = dict(plan, perm=None, flips=None, layout="yx")
        header = _squeeze_header(raw)
    diffs = _geometry_differences(reference, header, geometry_tolerance)
    if not diffs:
        values = _raw_values(sitk_img, plan)
        if values.shape != tuple(reference.spatial_shape):
            values = values.reshape(reference.spatial_shape)
        return select_label(values, label, name=name)
    can_resample = reference.spacing_known and header.spacing_known
    if not (resample and can_resample):
        lines = "; ".join(
            f"{k}: image {_fmt_geom(a)!r} vs mask {_fmt_geom(b)!r}" for k, (a, b) in diffs.items()
        )
        hint = (
            " If it is, resample it onto the image grid (nearest neighbour) with resample=True "
            "(resample_mask=True in load_case / read_cohort)."
            if can_resample
            else " Without a physical spacing on both sides the mask must have the image's size."
        )
        raise MaskGeometryError(
            f"mask {str(p)!r} does not match image {ref_name} "
            f"(tolerance {geometry_tolerance:g}): {lines}. Is it the mask of this image?{hint}",
            image_path=reference.path,
            mask_path=str(p),
            differences=diffs,
        )
    values = _resample_onto(sitk_img, reference)
    if not np.any(values):
        raise ValueError(
            f"{name} lies outside image {ref_name}: after resampling onto the image "
            "grid it is empty. Is it the mask of this image?"
        )
    return select_label(values, label, name=name)


def _scalar_mask(raw: _Raw) -> _Raw:
    """An RGB(A) mask (e.g. a PNG) whose channels agree, as a scalar image."""
    sitk = _sitk()
    img = raw.image
    chans = [
        sitk.VectorIndexSelectionCast(img, i) for i in range(img.GetNumberOfComponentsPerPixel())
    ]
    arrs = [sitk.GetArrayViewFromImage(c) for c in chans[:3]]
    if any(not np.array_equal(arrs[0], a) for a in arrs[1:]):
        raise ValueError(
            f"mask {str(raw.path)!r} is a colour image whose channels differ; save masks as "
            "single-channel label images."
        )
    return replace(raw, image=chans[0], ncomp=1)


def _squeeze_header(raw: _Raw) -> ImageHeader:
    sp = tuple(float(s) for s in raw.spacing[:2][::-1])
    org = tuple(float(s) for s in raw.origin[:2][::-1])
    d = np.asarray(raw.direction, dtype=float).reshape(3, 3)[:2, :2]
    return ImageHeader(
        shape=(int(raw.size[1]), int(raw.size[0])),
        spacing=sp if raw.spacing_known else (1.0, 1.0),
        origin=org,
        direction=_array_direction(tuple(d.ravel()), 2),
        layout="yx",
        path=str(raw.path),
        format=raw.fmt,
        spacing_known=raw.spacing_known and raw.fmt not in _RASTER_FORMATS,
    )


def _resample_onto(mask_img, reference: ImageHeader) -> np.ndarray:
    """Nearest-neighbour resampling of a SimpleITK mask onto ``reference``'s grid."""
    sitk = _sitk()
    nsp = reference.spatial_ndim
    if mask_img.GetDimension() != nsp:
        if mask_img.GetDimension() == 3 and nsp == 2 and mask_img.GetSize()[2] == 1:
            mask_img = mask_img[:, :, 0]
        else:
            raise MaskGeometryError(
                f"mask is {mask_img.GetDimension()}-D but image {reference.path!r} is {nsp}-D.",
                image_path=reference.path,
            )
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in reference.spatial_shape[::-1]])
    f.SetOutputSpacing([float(s) for s in reference.spacing[::-1]])
    f.SetOutputOrigin([float(s) for s in reference.origin[::-1]])
    f.SetOutputDirection(_itk_direction(reference.direction))
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(0)
    f.SetOutputPixelType(mask_img.GetPixelID())
    return sitk.GetArrayFromImage(f.Execute(mask_img))


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def write_image(
    image,
    path: PathLike,
    *,
    spacing=None,
    origin=None,
    direction=None,
    compress: bool = True,
) -> Path:
    """Write an image or mask to NIfTI / NRRD / MHA / PNG (format from the extension; no DICOM).

    Parameters
    ----------
    image : MedicalImage or ndarray
        A :class:`MedicalImage`, or a ``(z, y, x)`` / ``(y, x)`` array in skrtl's axis
        conventions. Boolean arrays are written as ``uint8`` (masks); other arrays keep their
        dtype.
    path : str or path
        Output file, e.g. ``case01.nii.gz``.
    spacing, origin, direction : optional
        Geometry of an array (array-axis order); ignored for a :class:`MedicalImage`.
    compress : bool, default=True
        Compress where the format allows it.

    Returns
    -------
    pathlib.Path
    """
    sitk = _sitk()
    out = Path(os.fspath(path))
    if out.suffix.lower() in (".dcm", ".dicom", ".ima") or out.is_dir():
        raise ValueError(
            f"write_image does not write DICOM ({str(out)!r}): a valid DICOM file needs patient, "
            "study and series information skrtl does not have. Write NIfTI (.nii.gz), NRRD or "
            "MHA instead."
        )
    if isinstance(image, MedicalImage):
        geom = image
        arr = image.array
    else:
        arr = np.asarray(image)
        geom = MedicalImage.from_array(
            arr.astype(np.float32) if arr.dtype == bool else arr,
            spacing=spacing,
            origin=origin,
            direction=direction,
        )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if geom.layout.startswith("t"):
        raise ValueError("write_image does not write multi-frame clips.")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=geom.layout == "yxc")
    _set_itk_geometry(img, geom)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(img, str(out), useCompression=compress)
    except RuntimeError as exc:
        raise ImageReadError(f"cannot write {str(out)!r}: {_first_line(exc)}", out) from None
    return out
