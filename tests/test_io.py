"""Reading images and masks from files: formats, orientation, HU, geometry checks, clear errors.

Fixtures are written here with SimpleITK (tmp_path); real DICOM files come from pydicom's and
pydicom-data's test files (tests using them skip when those packages are absent).
"""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest
from _io_fixtures import (
    SAGITTAL,
    physical_points,
    rotation,
    sitk_volume,
    write_dicom_series,
)

sitk = pytest.importorskip("SimpleITK")

from skrtl import (  # noqa: E402
    ImageReadError,
    MaskGeometryError,
    MedicalImage,
    compare_geometry,
    list_dicom_series,
    read_header,
    read_image,
    read_mask,
    select_label,
    write_image,
)

UID_A = "1.2.826.0.1.3680043.8.498.101"
UID_B = "1.2.826.0.1.3680043.8.498.102"
SPACING_ITK = (0.6, 0.8, 2.5)  # (x, y, z) mm: anisotropic


def _testdata(name: str):
    pydicom_data = pytest.importorskip("pydicom.data")
    try:
        path = pydicom_data.get_testdata_file(name, download=False)
    except Exception:  # pragma: no cover - depends on the installed data packages
        path = None
    if path is None:
        pytest.skip(f"pydicom test file {name!r} is not installed (pip install pydicom-data)")
    return path


def _pydicom_values(path):
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )


def _assert_same_physical_values(med: MedicalImage, sitk_img, values_kji):
    """Every voxel of the original lies, with its value, at its physical place in ``med``."""
    pts = physical_points(sitk_img)[..., ::-1].reshape(-1, 3)  # array-order coordinates
    idx = med.physical_to_index(pts)
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-3)
    got = med.array[tuple(np.round(idx).astype(int).T)]
    np.testing.assert_array_equal(got, np.asarray(values_kji, dtype=np.float32).ravel())


@pytest.fixture(scope="module")
def volume():
    """A CT-like volume stored with a non-identity (RAS-like, rotated) direction."""
    rng = np.random.default_rng(0)
    values = rng.integers(-1000, 1500, size=(6, 10, 12)).astype(np.int16)  # (k, j, i)
    direction = rotation((0, 0, 1), 10) @ np.diag([-1.0, -1.0, 1.0])
    img = sitk_volume(values, spacing=SPACING_ITK, origin=(12.0, -30.0, 5.0), direction=direction)
    return values, img


@pytest.fixture(scope="module")
def files(volume, tmp_path_factory):
    values, img = volume
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name in ("ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha", "ct.mhd"):
        sitk.WriteImage(img, str(root / name))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def dicom_two_series(tmp_path_factory):
    """A sagittal, slightly oblique CT series and a second axial series in one folder."""
    root = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 2000, size=(5, 7, 9)).astype(np.int16)
    direction = rotation((1, 1, 0), 20) @ SAGITTAL
    geom = {"spacing": SPACING_ITK, "origin": (10.0, -20.0, 30.0), "direction": direction}
    write_dicom_series(root, hu, series_uid=UID_A, description="sag oblique", **geom)
    other = rng.integers(-100, 100, size=(3, 7, 9)).astype(np.int16)
    write_dicom_series(
        root,
        other,
        spacing=(0.5, 0.5, 1.0),
        origin=(0, 0, 0),
        direction=np.eye(3),
        series_uid=UID_B,
        description="axial second",
        prefix="other",
    )
    return root, hu, sitk_volume(hu, **geom)


# --------------------------------------------------------------------------------------------
# formats and orientation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha", "ct.mhd"])
def test_volume_formats_read_canonical_lps(files, volume, name):
    values, img = volume
    med = read_image(files[name])
    assert med.layout == "zyx" and med.array.dtype == np.float32
    assert med.orientation == "LPS" and med.meta["reoriented"]
    # 10 degree rotation: LPS is the closest orientation, the residual rotation is kept
    np.testing.assert_allclose(
        np.abs(np.diag(med.direction)),
        np.cos(np.deg2rad(10)) * np.array([1, 1, 1])
        + np.array([1 - np.cos(np.deg2rad(10)), 0, 0]),
        atol=1e-6,
    )
    assert med.spacing == pytest.approx(SPACING_ITK[::-1])  # array order (z, y, x)
    assert med.shape == values.shape
    _assert_same_physical_values(med, img, values)
    head = read_header(files[name])
    assert head.shape == med.shape and head.spacing == pytest.approx(med.spacing)
    np.testing.assert_allclose(head.origin, med.origin)
    np.testing.assert_allclose(head.direction, med.direction)


def test_orientation_none_keeps_stored_order_and_ras_flips(files, volume):
    values, img = volume
    raw = read_image(files["ct.nii.gz"], orientation=None)
    np.testing.assert_array_equal(raw.array, values)
    ras = read_image(files["ct.nii.gz"], orientation="RAS")
    lps = read_image(files["ct.nii.gz"])
    np.testing.assert_array_equal(ras.array, lps.array[:, ::-1, ::-1])
    _assert_same_physical_values(ras, img, values)
    with pytest.raises(ValueError, match="3-letter DICOM orientation code"):
        read_image(files["ct.nii.gz"], orientation="LPX")


def test_dicom_series_choice_orientation_and_hu(dicom_two_series):
    root, hu, img = dicom_two_series
    with pytest.raises(ImageReadError, match="holds 2 DICOM series") as exc:
        read_image(root)
    msg = str(exc.value)
    for needle in (UID_A, UID_B, "sag oblique", "axial second", "5 file(s)", "3 file(s)"):
        assert needle in msg
    table = list_dicom_series(root)
    assert set(table["series_uid"]) == {UID_A, UID_B}
    assert dict(zip(table["series_uid"], table["n_files"])) == {UID_A: 5, UID_B: 3}

    med = read_image(root, series_uid=UID_A)
    assert med.modality == "CT" and med.series_uid == UID_A and med.rescale == (1.0, -1024.0)
    assert med.meta["original_orientation"] != "LPS" and med.orientation == "LPS"
    # the sagittal slices became an axial-indexed volume: z holds the former rows (0.8 mm)
    assert med.spacing == pytest.approx((0.8, 0.6, 2.5))
    assert med.meta["slice_positions_checked"]
    _assert_same_physical_values(med, img, hu)  # values are HU = stored + intercept
    head = read_header(root, series_uid=UID_A)
    assert head.shape == med.shape and head.spacing == pytest.approx(med.spacing)
    np.testing.assert_allclose(head.origin, med.origin, atol=1e-4)
    with pytest.raises(ImageReadError, match="is not in image folder"):
        read_image(root, series_uid="1.2.3.4")


def test_dicom_series_hu_equals_pydicom(dicom_two_series):
    pydicom = pytest.importorskip("pydicom")
    root, hu, img = dicom_two_series
    med = read_image(root, series_uid=UID_A)
    for path in sorted(root.glob("im*.dcm")):
        ds = pydicom.dcmread(path)
        assert float(ds.RescaleIntercept) == -1024.0
        ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        k = int(ds.InstanceNumber) - 1
        np.testing.assert_array_equal(ref, hu[k])  # the stored values are not HU ...
        assert not np.array_equal(ds.pixel_array, hu[k])  # ... the rescale matters
    assert med.array.min() == hu.min() and med.array.max() == hu.max()


def test_pet_series_per_slice_rescale_matches_pydicom(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    rng = np.random.default_rng(2)
    suv = rng.uniform(0, 12, size=(4, 6, 6)).astype(np.float32)
    slopes = [0.001, 0.0004, 0.002, 0.0008]
    write_dicom_series(
        tmp_path,
        suv,
        spacing=(2.0, 2.0, 3.0),
        origin=(0, 0, 0),
        direction=np.eye(3),
        series_uid=UID_A,
        description="pet",
        modality="PT",
        slope=slopes,
        intercept=0.0,
    )
    med = read_image(tmp_path)
    assert med.modality == "PT" and med.meta.get("rescale_varies")
    for path in sorted(tmp_path.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        k = int(ds.InstanceNumber) - 1
        np.testing.assert_allclose(med.array[k], ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(med.array[k], suv[k], atol=float(ds.RescaleSlope))


def test_irregular_series_raises_or_warns(tmp_path):
    hu = np.zeros((5, 4, 4), np.int16)
    write_dicom_series(
        tmp_path,
        hu,
        spacing=(1, 1, 2),
        origin=(0, 0, 0),
        direction=np.eye(3),
        series_uid=UID_A,
        description="gap",
        skip=(2,),
    )
    with pytest.raises(ImageReadError, match="missing slices or irregular spacing"):
        read_image(tmp_path)
    with pytest.warns(UserWarning, match="missing slices"):
        med = read_image(tmp_path, irregular_slices="warn")
    assert med.shape == (4, 4, 4) and med.meta["irregular_slices"]


def test_gantry_tilt_is_detected(tmp_path):
    # slices advance along z but the image plane is tilted: origins drift in-plane
    hu = np.zeros((4, 4, 4), np.int16)
    tilt = np.deg2rad(15)
    direction = np.array([[1, 0, 0], [0, np.cos(tilt), 0], [0, np.sin(tilt), 1.0]])
    write_dicom_series(
        tmp_path,
        hu,
        spacing=(1, 1, 2),
        origin=(0, 0, 0),
        direction=direction,
        series_uid=UID_A,
        description="tilt",
    )
    with pytest.raises(ImageReadError, match="gantry tilt"):
        read_image(tmp_path)


# --------------------------------------------------------------------------------------------
# real DICOM files nobody here wrote (pydicom / pydicom-data test files)
# --------------------------------------------------------------------------------------------
def test_real_ct_slice_spacing_and_hu():
    path = _testdata("CT_small.dcm")
    ds, ref = _pydicom_values(path)
    med = read_image(path)
    assert med.modality == "CT" and med.layout == "yx"
    assert med.spacing == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
    assert med.spacing_known and med.rescale == (1.0, -1024.0)
    np.testing.assert_array_equal(med.array, ref.astype(np.float32))
    assert med.array.min() < 0  # HU, not stored values


def test_real_mr_slice():
    path = _testdata("MR_small.dcm")
    ds, ref = _pydicom_values(path)
    med = read_image(path)
    assert med.modality == "MR"
    assert med.spacing == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
    np.testing.assert_array_equal(med.array, ref.astype(np.float32))


def test_real_mr_with_rescale_slope():
    path = _testdata("MR2_UNCR.dcm")
    ds, ref = _pydicom_values(path)
    assert float(ds.RescaleSlope) != 1.0
    med = read_image(path)
    np.testing.assert_allclose(med.array, ref, rtol=1e-6)  # the modality rescale is applied


def test_real_ct_series_from_pydicom_folder():
    import os

    pydicom = pytest.importorskip("pydicom")
    folder = os.path.join(
        os.path.dirname(_testdata("CT_small.dcm")), "dicomdirtests", "98892001", "CT5N"
    )
    if not os.path.isdir(folder):
        pytest.skip("pydicom's dicomdirtests folder is not installed")
    med = read_image(folder)
    dss = sorted(
        (pydicom.dcmread(os.path.join(folder, f)) for f in os.listdir(folder)),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    assert med.shape == (len(dss), int(dss[0].Rows), int(dss[0].Columns))
    gaps = np.diff([float(d.ImagePositionPatient[2]) for d in dss])
    assert med.spacing[0] == pytest.approx(float(np.median(gaps)))
    assert med.spacing[1:] == pytest.approx(tuple(float(v) for v in dss[0].PixelSpacing))
    ref = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss]
    )
    np.testing.assert_array_equal(med.array, ref)  # slice 0 is the most inferior
    assert med.origin[0] == pytest.approx(float(dss[0].ImagePositionPatient[2]))


def test_real_ultrasound_rgb_and_multiframe():
    path = _testdata("US1_UNCR.dcm")
    ds, _ = _pydicom_values(path)
    med = read_image(path)
    assert med.layout == "yxc" and med.shape == (480, 640, 3)
    assert not med.spacing_known
    np.testing.assert_array_equal(med.array, ds.pixel_array)
    clip = _testdata("examples_ybr_color.dcm")
    ds, _ = _pydicom_values(clip)
    whole = read_image(clip)
    assert whole.layout == "tyxc" and whole.shape == ds.pixel_array.shape
    one = read_image(clip, frame=3)
    assert one.layout == "yxc"
    np.testing.assert_array_equal(one.array, whole.array[3])
    with pytest.raises(ValueError, match="out of range"):
        read_image(clip, frame=999)


def test_real_monochrome1_is_inverted_and_flagged():
    path = _testdata("RG1_UNCR.dcm")
    ds, _ = _pydicom_values(path)
    med = read_image(path)
    assert med.meta["PhotometricInterpretation"] == "MONOCHROME1"
    np.testing.assert_array_equal(med.array, (2 ** int(ds.BitsStored) - 1) - ds.pixel_array)
    assert not med.spacing_known  # its PixelSpacing is 0.000\0.000


def test_rtstruct_and_seg_get_a_conversion_hint():
    with pytest.raises(ImageReadError, match="RTSTRUCT object, not an image.*rt-utils"):
        read_image(_testdata("rtstruct.dcm"))


# --------------------------------------------------------------------------------------------
# 2-D raster formats, 4-D, writing
# --------------------------------------------------------------------------------------------
def test_png_gray_rgb_rgba_and_spacing_override(tmp_path):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 255, size=(20, 30)).astype(np.uint8)
    rgb = rng.integers(0, 255, size=(20, 30, 3)).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(gray), str(tmp_path / "g.png"))
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.png"))
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "a.png"))
    sitk.WriteImage(sitk.GetImageFromArray(gray), str(tmp_path / "g.bmp"))
    sitk.WriteImage(sitk.GetImageFromArray(gray), str(tmp_path / "g.tif"))
    sitk.WriteImage(sitk.GetImageFromArray(gray), str(tmp_path / "g.jpg"))
    g = read_image(tmp_path / "g.png")
    assert g.layout == "yx" and g.format == "PNG" and not g.spacing_known
    np.testing.assert_array_equal(g.array, gray)
    c = read_image(tmp_path / "c.png")
    assert c.layout == "yxc"
    np.testing.assert_array_equal(c.array, rgb)
    a = read_image(tmp_path / "a.png")
    assert a.shape == (20, 30, 3) and a.meta["alpha_dropped"]
    for ext in ("bmp", "tif"):
        np.testing.assert_array_equal(read_image(tmp_path / f"g.{ext}").array, gray)
    jpg = read_image(tmp_path / "g.jpg")
    assert jpg.format == "JPEG" and np.abs(jpg.array - gray).mean() < 30  # lossy
    calibrated = read_image(tmp_path / "g.png", spacing=0.1)
    assert calibrated.spacing == (0.1, 0.1) and calibrated.spacing_known
    with pytest.raises(ValueError, match="spacing must be 2 positive values"):
        read_image(tmp_path / "g.png", spacing=(1, 1, 1))


def test_4d_nifti_needs_a_frame(tmp_path):
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # (t, z, y, x)
    img = sitk.JoinSeries([sitk.GetImageFromArray(arr[t]) for t in range(2)])
    sitk.WriteImage(img, str(tmp_path / "dyn.nii.gz"))
    with pytest.raises(ImageReadError, match="4-D image.*frame="):
        read_image(tmp_path / "dyn.nii.gz")
    med = read_image(tmp_path / "dyn.nii.gz", frame=1)
    assert med.layout == "zyx" and med.meta["frame"] == 1
    np.testing.assert_array_equal(med.array, arr[1])


def test_write_image_round_trip(tmp_path, files):
    med = read_image(files["ct.nrrd"])
    out = write_image(med, tmp_path / "copy.nii.gz")
    again = read_image(out)
    np.testing.assert_array_equal(again.array, med.array)
    assert again.spacing == pytest.approx(med.spacing)
    np.testing.assert_allclose(again.origin, med.origin, atol=1e-4)
    np.testing.assert_allclose(again.direction, med.direction, atol=1e-6)
    mask = np.zeros(med.shape, bool)
    mask[1:3] = True
    write_image(mask, tmp_path / "m.nii.gz", spacing=med.spacing)
    assert read_image(tmp_path / "m.nii.gz").array.sum() == mask.sum()


def test_medical_image_geometry_helpers():
    img = MedicalImage.from_array(np.zeros((4, 5, 6)), spacing=(2.0, 0.5, 0.7), origin=(1, 2, 3))
    assert img.layout == "zyx" and img.spacing_known
    p = img.index_to_physical([1, 2, 3])
    np.testing.assert_allclose(p, [3.0, 3.0, 5.1])
    np.testing.assert_allclose(img.physical_to_index(p), [1, 2, 3])
    back = img.to_sitk()
    assert back.GetSpacing() == (0.7, 0.5, 2.0) and back.GetOrigin() == (3.0, 2.0, 1.0)
    assert MedicalImage.from_array(np.zeros((8, 8, 3))).layout == "yxc"
    assert not MedicalImage.from_array(np.zeros((8, 8))).spacing_known
    with pytest.raises(ValueError, match="spacing must be 3"):
        MedicalImage.from_array(np.zeros((4, 5, 6)), spacing=(1, 1))
    assert "MedicalImage(shape=(4, 5, 6)" in repr(img)


# --------------------------------------------------------------------------------------------
# clear errors for bad files
# --------------------------------------------------------------------------------------------
def test_missing_corrupt_and_unsupported_files(tmp_path, files):
    with pytest.raises(FileNotFoundError, match=r"image file '.*nope\.nii\.gz' does not exist"):
        read_image(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image" * 10)
    with pytest.raises(ImageReadError, match=r"bad\.nii\.gz.*not a readable image") as exc:
        read_image(bad)
    assert exc.value.path == str(bad)
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(files["ct.nii.gz"].read_bytes())[:400]))
    with pytest.raises(ImageReadError, match=r"trunc\.nii\.gz' is truncated"):
        read_image(truncated)  # ITK alone would zero-fill it
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(files["ct.nii.gz"].read_bytes()[:300])
    with pytest.raises(ImageReadError, match="is truncated"):
        read_image(cut)
    plain = tmp_path / "cut.nii"
    plain.write_bytes(files["ct.nii"].read_bytes()[:700])
    with pytest.raises(ImageReadError, match="is truncated"):
        read_image(plain)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ImageReadError, match="Supported: DICOM"):
        read_image(txt)
    header_only = tmp_path / "lonely.mhd"
    header_only.write_text(files["ct.mhd"].read_text())  # its .raw data file is elsewhere
    with pytest.raises(ImageReadError, match="ElementDataFile"):
        read_image(header_only)


def test_folders_without_a_series(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="holds no DICOM image series"):
        read_image(tmp_path / "empty")
    (tmp_path / "patient" / "CT").mkdir(parents=True)
    with pytest.raises(ImageReadError, match=r"subfolders \['CT'\]"):
        read_image(tmp_path / "patient")


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(volume, tmp_path_factory):
    """A two-label mask on the volume's grid, stored in a different (flipped) orientation."""
    values, img = volume
    lab = np.zeros(values.shape, np.uint8)
    lab[1:3, 2:5, 3:7] = 1
    lab[3:5, 5:8, 6:10] = 2
    root = tmp_path_factory.mktemp("masks")
    mimg = sitk.GetImageFromArray(lab)
    mimg.CopyInformation(img)
    flipped = sitk.Flip(mimg, [True, False, True])  # same grid, stored RAS-flipped
    sitk.WriteImage(flipped, str(root / "labels.nrrd"))
    sitk.WriteImage(mimg, str(root / "labels.nii.gz"))
    empty = sitk.GetImageFromArray(np.zeros_like(lab))
    empty.CopyInformation(img)
    sitk.WriteImage(empty, str(root / "empty.nii.gz"))
    shifted = sitk.GetImageFromArray(lab)
    shifted.CopyInformation(img)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    shifted.SetOrigin(tuple(np.asarray(img.GetOrigin()) + d[:, 0] * SPACING_ITK[0]))  # +1 x
    sitk.WriteImage(shifted, str(root / "shifted.nii.gz"))
    tiny = sitk.GetImageFromArray(lab)
    tiny.CopyInformation(img)
    tiny.SetOrigin(tuple(np.asarray(img.GetOrigin()) + 1e-5))
    sitk.WriteImage(tiny, str(root / "tiny_shift.nii.gz"))
    coarse = sitk.GetImageFromArray(lab[:, :5, :6])
    coarse.SetSpacing(img.GetSpacing())
    coarse.SetOrigin(img.GetOrigin())
    coarse.SetDirection(img.GetDirection())
    sitk.WriteImage(coarse, str(root / "small.nii.gz"))
    far = sitk.GetImageFromArray(lab)
    far.CopyInformation(img)
    far.SetOrigin((500.0, 500.0, 500.0))
    sitk.WriteImage(far, str(root / "far.nii.gz"))
    turned = sitk.GetImageFromArray(lab)
    turned.CopyInformation(img)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    turned.SetDirection(tuple((rotation((0, 0, 1), 3) @ d).ravel()))  # 3 degrees off
    sitk.WriteImage(turned, str(root / "turned.nii.gz"))
    prob = sitk.GetImageFromArray(lab.astype(np.float32) * 0.45)
    prob.CopyInformation(img)
    sitk.WriteImage(prob, str(root / "prob.nii.gz"))
    return lab, root


def test_mask_label_selection_on_the_image_grid(files, labelled):
    lab, root = labelled
    image = read_image(files["ct.nii.gz"])
    canon_lab = read_image(root / "labels.nii.gz").array  # same grid: same canonical layout
    for name in ("labels.nrrd", "labels.nii.gz"):
        two = read_mask(root / name, reference=image, label=2)
        assert two.dtype == bool and two.shape == image.shape
        np.testing.assert_array_equal(two, canon_lab == 2)
        assert two.sum() == (lab == 2).sum()
        both = read_mask(root / name, reference=image, label=[1, 2])
        assert both.sum() == (lab > 0).sum()
    with pytest.raises(ValueError, match=r"has 2 labels: 1 \(24 voxels\), 2 \(24 voxels\)"):
        read_mask(root / "labels.nii.gz", reference=image)
    with pytest.raises(ValueError, match=r"label 3 is not in mask '.*labels\.nii\.gz'.*1 \(24"):
        read_mask(root / "labels.nii.gz", reference=image, label=3)
    with pytest.raises(ValueError, match="is empty"):
        read_mask(root / "empty.nii.gz", reference=image)
    with pytest.raises(ValueError, match="non-integer values.*Threshold"):
        read_mask(root / "prob.nii.gz", reference=image, label=1)


def test_mask_geometry_mismatch_names_both_files(files, labelled):
    lab, root = labelled
    image = read_image(files["ct.nii.gz"])
    with pytest.raises(MaskGeometryError) as exc:
        read_mask(root / "shifted.nii.gz", reference=image, label=1)
    msg = str(exc.value)
    assert "shifted.nii.gz" in msg and "ct.nii.gz" in msg and "origin" in msg
    assert "resample=True" in msg
    assert set(exc.value.differences) == {"origin"}
    with pytest.raises(MaskGeometryError, match="size: image .* vs mask"):
        read_mask(root / "small.nii.gz", reference=image, label=1)
    with pytest.raises(MaskGeometryError, match=r"turned\.nii\.gz.*ct\.nii\.gz.*direction"):
        read_mask(root / "turned.nii.gz", reference=image, label=1)
    # within the tolerance: accepted; a tolerance of 0 refuses it
    assert read_mask(root / "tiny_shift.nii.gz", reference=image, label=1).sum() == 24
    with pytest.raises(MaskGeometryError, match="origin"):
        read_mask(root / "tiny_shift.nii.gz", reference=image, label=1, geometry_tolerance=0)


def test_mask_resampling_is_opt_in_and_correct(files, labelled):
    lab, root = labelled
    image = read_image(files["ct.nii.gz"])
    exact = read_mask(root / "labels.nii.gz", reference=image, label=1)
    moved = read_mask(root / "shifted.nii.gz", reference=image, label=1, resample=True)
    # the mask's origin moved one voxel along ITK's i axis: on the image grid, its voxel
    # (k, j, i) lands on (k, j, i + 1)
    expected = sitk.GetImageFromArray(np.roll(lab == 1, 1, axis=2).astype(np.uint8))
    expected.CopyInformation(sitk.ReadImage(str(files["ct.nii.gz"])))
    sitk.WriteImage(expected, str(root / "expected.nii.gz"))
    want = read_mask(root / "expected.nii.gz", reference=image)
    assert moved.sum() == exact.sum() == want.sum()
    np.testing.assert_array_equal(moved, want)
    assert not np.array_equal(moved, exact)
    with pytest.raises(ValueError, match="lies outside image"):
        read_mask(root / "far.nii.gz", reference=image, label=1, resample=True)


def test_compare_geometry_on_headers(files, labelled):
    _, root = labelled
    head = read_header(files["ct.nii.gz"])
    assert compare_geometry(head, read_header(root / "labels.nrrd")) == {}
    diffs = compare_geometry(head, read_header(root / "shifted.nii.gz"))
    assert list(diffs) == ["origin"]


def test_2d_masks_png_and_one_slice_nifti(tmp_path):
    img = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    mask = np.zeros((12, 16), np.uint8)
    mask[3:6, 4:9] = 255
    sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / "img.png"))
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "mask.png"))
    rgb_mask = np.repeat(mask[..., None], 3, axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(rgb_mask, isVector=True), str(tmp_path / "rgb.png"))
    sitk.WriteImage(sitk.GetImageFromArray(mask[None] // 255), str(tmp_path / "m.nii.gz"))
    ref = read_image(tmp_path / "img.png")
    for name in ("mask.png", "rgb.png", "m.nii.gz"):
        m = read_mask(tmp_path / name, reference=ref)
        np.testing.assert_array_equal(m, mask > 0)
    sitk.WriteImage(sitk.GetImageFromArray(mask[:10]), str(tmp_path / "short.png"))
    with pytest.raises(MaskGeometryError, match=r"size: image \(12, 16\) vs mask \(10, 16\)"):
        read_mask(tmp_path / "short.png", reference=ref)
    odd = rgb_mask.copy()
    odd[0, 0, 1] = 7
    sitk.WriteImage(sitk.GetImageFromArray(odd, isVector=True), str(tmp_path / "odd.png"))
    with pytest.raises(ValueError, match="channels differ"):
        read_mask(tmp_path / "odd.png", reference=ref)


def test_select_label_rules():
    m = np.array([[0, 1, 2], [2, 2, 0]], dtype=np.int16)
    np.testing.assert_array_equal(select_label(m, 2), m == 2)
    np.testing.assert_array_equal(select_label(m, (1, 2)), m > 0)
    np.testing.assert_array_equal(select_label(m > 0), m > 0)
    np.testing.assert_array_equal(select_label(np.array([0, 255, 255])), [False, True, True])
    with pytest.raises(ValueError, match=r"2 labels: 1 \(1 voxels\), 2 \(3 voxels\)"):
        select_label(m)
    with pytest.raises(ValueError, match="label 5 is not in mask"):
        select_label(m, 5)
    with pytest.raises(ValueError, match="positive integer"):
        select_label(m, 0)
    with pytest.raises(TypeError, match="positive int"):
        select_label(m, "2")
    with pytest.raises(ValueError, match="is empty"):
        select_label(np.zeros(4))
    with pytest.raises(ValueError, match="boolean mask"):
        select_label(m > 0, 2)
    with pytest.raises(ValueError, match="NaN"):
        select_label(np.array([0.0, np.nan, 1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_label(np.array([0.0, 1.0, 1.0]), 1).sum() == 2


def test_write_image_refuses_dicom(tmp_path):
    with pytest.raises(ValueError, match="does not write DICOM.*NIfTI"):
        write_image(np.zeros((4, 5), np.int16), tmp_path / "slice.dcm", spacing=(0.5, 0.5))
