"""Cohort tables of file paths: read_cohort validation, lazy per-case loading, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _io_fixtures import write_dicom_series

sitk = pytest.importorskip("SimpleITK")

from skrtl import (  # noqa: E402
    COHORT_COLUMNS,
    CohortError,
    MaskGeometryError,
    is_lazy_frame,
    iter_cases,
    load_case,
    make_image_frame,
    read_cohort,
    read_image,
)

SPACING = (2.0, 0.8, 0.7)  # (z, y, x) mm


def _write(arr, path, spacing=SPACING, origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    img.SetOrigin(tuple(float(s) for s in origin[::-1]))
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def cohort(tmp_path):
    """Four cases with two-label masks, relative paths, clinical columns, a site column."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "seg").mkdir()
    rows, arrays = [], []
    for i in range(4):
        img = rng.normal(0, 100, size=(6, 12, 10)).astype(np.int16)
        lab = np.zeros(img.shape, np.uint8)
        lab[1:3, 2:6, 2:5] = 1
        lab[3:5, 6:10, 5:9] = 2
        _write(img, tmp_path / "img" / f"c{i}.nii.gz")
        _write(lab, tmp_path / "seg" / f"c{i}.nrrd")
        arrays.append((img, lab))
        rows.append(
            {
                "patient": f"P{i}",
                "Image": f"img/c{i}.nii.gz",
                "Mask": f"seg/c{i}.nrrd",
                "hospital": "AB"[i % 2],
                "age": 50 + i,
                "stage": ["I", "II", "III", "II"][i],
                "Label": 1 + i % 2,
            }
        )
    csv = tmp_path / "cohort.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, arrays


def test_read_cohort_pyradiomics_csv(cohort):
    csv, arrays = cohort
    X = read_cohort(csv, label="Label", site="hospital", id="patient")
    assert list(X.index) == ["P0", "P1", "P2", "P3"] and X.index.name == "patient"
    assert list(X.columns) == ["image", "mask", "mask_label", "spacing", "site", "age", "stage"]
    assert X["image"].iloc[1] == str(csv.parent / "img" / "c1.nii.gz")  # relative to the CSV
    assert list(X["mask_label"]) == [1, 2, 1, 2]
    assert X["spacing"].iloc[0] == pytest.approx(SPACING)  # from the header, array order
    assert list(X["site"]) == ["A", "B", "A", "B"]
    assert list(X["age"]) == [50, 51, 52, 53]
    assert is_lazy_frame(X)
    assert set(X.columns) - set(COHORT_COLUMNS) == {"age", "stage"}  # the clinical columns
    # the frame is row-split like any image frame; each case loads on its own
    cases = list(iter_cases(X.iloc[[3, 1]]))
    assert [c.index for c in cases] == ["P3", "P1"]
    img, lab = arrays[3]
    np.testing.assert_array_equal(cases[0].image.array, img)
    np.testing.assert_array_equal(cases[0].mask, lab == 2)  # per-row label 2


def test_lowercase_columns_constant_label_and_base_dir(cohort, tmp_path):
    csv, arrays = cohort
    df = pd.read_csv(csv).rename(columns={"Image": "image", "Mask": "mask"})
    X = read_cohort(df, label=2, base_dir=csv.parent, validate="exists")
    assert "spacing" not in X.columns  # headers not read
    assert list(X["mask_label"]) == [2, 2, 2, 2]
    assert list(X.columns) == [
        "image",
        "mask",
        "mask_label",
        "patient",
        "hospital",
        "age",
        "stage",
        "Label",
    ]  # an int label leaves the Label column to the clinical columns
    case = next(iter_cases(X))
    np.testing.assert_array_equal(case.mask, arrays[0][1] == 2)
    union = read_cohort(df, label=[1, 2], base_dir=csv.parent, validate="none")
    assert next(iter_cases(union)).mask.sum() == (arrays[0][1] > 0).sum()


def test_all_bad_rows_are_reported_at_once(cohort):
    csv, _ = cohort
    df = pd.read_csv(csv)
    df.loc[0, "Image"] = "img/missing.nii.gz"
    df.loc[2, "Mask"] = "seg/absent.nrrd"
    bad_geom = csv.parent / "seg" / "moved.nrrd"
    _write(np.ones((6, 12, 10), np.uint8), bad_geom, origin=(5.0, 0.0, 0.0))
    df.loc[3, "Mask"] = "seg/moved.nrrd"
    df.to_csv(csv, index=False)
    with pytest.raises(CohortError) as exc:
        read_cohort(csv, label="Label", id="patient")
    msg = str(exc.value)
    assert msg.startswith("3 of 4 cases of the cohort are unusable")
    assert "case 'P0' [image]" in msg and "missing.nii.gz" in msg
    assert "case 'P2' [mask]" in msg and "absent.nrrd" in msg
    assert "case 'P3' [mask]" in msg and "moved.nrrd" in msg and "origin" in msg
    assert "errors='drop'" in msg
    table = exc.value.errors
    assert list(table["case"]) == ["P0", "P2", "P3"]
    assert list(table["error"]) == ["FileNotFoundError", "FileNotFoundError", "MaskGeometryError"]
    with pytest.warns(UserWarning, match="dropped 3 of 4 cases"):
        X = read_cohort(csv, label="Label", id="patient", errors="drop")
    assert list(X.index) == ["P1"] and len(X.attrs["cohort_errors"]) == 3
    # opting in to resampling accepts the displaced mask
    with pytest.warns(UserWarning, match="dropped 2 of 4 cases"):
        ok = read_cohort(csv, label="Label", id="patient", errors="drop", resample_mask=True)
    assert "P3" in ok.index


def test_full_validation_checks_labels(cohort):
    csv, _ = cohort
    with pytest.raises(CohortError, match=r"(?s)4 of 4 cases.*has 2 labels.*label='Label'"):
        read_cohort(csv, validate="full")  # the hint names PyRadiomics' Label column
    with pytest.raises(CohortError, match=r"label 3 is not in mask") as exc:
        read_cohort(csv, label=3, validate="full")
    assert len(exc.value.errors) == 4
    X = read_cohort(csv, label="Label", validate="full")
    assert len(X) == 4


def test_bad_tables_and_parameters(cohort):
    csv, _ = cohort
    df = pd.read_csv(csv)
    with pytest.raises(ValueError, match=r"image='scan' is not a column.*'Image'"):
        read_cohort(df, image="scan", base_dir=csv.parent)
    with pytest.raises(ValueError, match=r"site='center' is not a column"):
        read_cohort(df, site="center", base_dir=csv.parent)
    dup = df.assign(patient=["P0", "P0", "P1", "P2"])
    with pytest.raises(ValueError, match=r"duplicate values \['P0'\]"):
        read_cohort(dup, id="patient", base_dir=csv.parent, validate="none")
    with pytest.raises(ValueError, match="validate must be one of"):
        read_cohort(df, validate="deep")
    with pytest.raises(ValueError, match="positive integer"):
        read_cohort(df, label=0)
    bad_label = df.assign(Label=["1", "x", "0", "2"])
    with pytest.raises(CohortError, match=r"(?s)case 1 \[mask_label\].*case 2 \[mask_label\]"):
        read_cohort(bad_label, label="Label", base_dir=csv.parent, validate="none")
    with pytest.raises(TypeError, match="make_image_frame"):
        read_cohort(pd.DataFrame({"image": [np.zeros((4, 4))]}))
    with pytest.raises(FileNotFoundError, match="cohort table"):
        read_cohort(csv.parent / "nope.csv")
    (csv.parent / "img" / "broken.nii.gz").write_bytes(b"\x1f\x8b broken")
    corrupt = df.copy()
    corrupt.loc[2, "Image"] = "img/broken.nii.gz"
    with pytest.raises(CohortError, match=r"case 2 \[image\]: cannot read image .*broken"):
        read_cohort(corrupt, label="Label", base_dir=csv.parent)
    empty_image = df.copy()
    empty_image.loc[1, "Image"] = ""
    with pytest.raises(CohortError, match=r"case 1 \[image\]: no image path"):
        read_cohort(empty_image, label="Label", base_dir=csv.parent)


def test_dicom_folders_with_series_uid_column(tmp_path):
    hu = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    geom = {"spacing": (0.5, 0.5, 2.0), "origin": (0, 0, 0), "direction": np.eye(3)}
    uid_a, uid_b = "1.2.826.0.1.3680043.8.498.201", "1.2.826.0.1.3680043.8.498.202"
    write_dicom_series(tmp_path / "p1", hu, series_uid=uid_a, description="a", **geom)
    write_dicom_series(
        tmp_path / "p1", hu + 7, series_uid=uid_b, description="b", prefix="b", **geom
    )
    df = pd.DataFrame({"image": ["p1", "p1"], "uid": [uid_a, None]})
    with pytest.raises(CohortError, match=r"case 1 \[image\].*holds 2 DICOM series"):
        read_cohort(df, base_dir=tmp_path, series_uid="uid")
    df.loc[1, "uid"] = uid_b
    X = read_cohort(df, base_dir=tmp_path, series_uid="uid")
    assert list(X["series_uid"]) == [uid_a, uid_b]
    a, b = (c.image for c in iter_cases(X))
    np.testing.assert_array_equal(b.array - a.array, 7)
    assert X["spacing"].iloc[0] == pytest.approx((2.0, 0.5, 0.5))


def test_load_case_same_result_from_files_and_memory(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.normal(size=(5, 8, 9)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[1:4, 2:5, 3:7] = 2
    _write(img, tmp_path / "i.nii.gz")
    _write(lab, tmp_path / "m.nii.gz")
    files = read_cohort(
        pd.DataFrame({"image": ["i.nii.gz"], "mask": ["m.nii.gz"]}), base_dir=tmp_path, label=2
    )
    memory = make_image_frame([img], masks=[lab], spacing=SPACING, mask_label=[2])
    (f,), (m,) = list(iter_cases(files)), list(iter_cases(memory))
    np.testing.assert_array_equal(f.image.array, m.image.array)
    np.testing.assert_array_equal(f.mask, m.mask)
    assert f.image.spacing == pytest.approx(m.image.spacing)
    assert not is_lazy_frame(memory)
    # load_case directly: a path, an array, or an already read MedicalImage
    med = read_image(tmp_path / "i.nii.gz")
    for image in (tmp_path / "i.nii.gz", str(tmp_path / "i.nii.gz"), med):
        got, mask = load_case(image, tmp_path / "m.nii.gz", label=2)
        np.testing.assert_array_equal(mask, lab == 2)
    got, mask = load_case(img, lab, label=2, spacing=SPACING)
    assert got.layout == "zyx" and got.spacing == SPACING and mask.sum() == (lab == 2).sum()
    assert load_case(img[0], None)[1] is None
    assert load_case(np.zeros((8, 9, 3)), None, mode="2d")[0].layout == "yxc"
    assert load_case(np.zeros((8, 9, 3)), None, mode="3d")[0].layout == "zyx"


def test_load_case_errors(tmp_path):
    img = np.zeros((4, 6, 7), np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[1, 1, 1] = 1
    _write(lab, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="in-memory array but its mask is a file"):
        load_case(img, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match=r"shape \(4, 6\) but the image's spatial shape"):
        load_case(img, lab[:, :, 1])
    with pytest.raises(ValueError, match="is empty"):
        load_case(img, np.zeros_like(lab))
    with pytest.raises(ValueError, match="label 2 is not in mask"):
        load_case(img, lab, label=2)
    _write(img, tmp_path / "i.nii.gz", spacing=(1.0, 1.0, 1.0))
    with pytest.raises(MaskGeometryError, match="spacing"):
        load_case(tmp_path / "i.nii.gz", tmp_path / "m.nii.gz")
    got, m = load_case(tmp_path / "i.nii.gz", tmp_path / "m.nii.gz", resample_mask=True)
    assert m.shape == got.shape and m.any()


def test_iter_cases_keeps_going_and_reports(tmp_path):
    img = np.ones((3, 4, 5), np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[1, 1:3, 1:3] = 1
    _write(img, tmp_path / "ok.nii.gz")
    _write(lab, tmp_path / "ok_m.nii.gz")
    _write(np.zeros_like(lab), tmp_path / "empty_m.nii.gz")
    df = pd.DataFrame(
        {
            "image": ["ok.nii.gz", "ok.nii.gz", "ok.nii.gz"],
            "mask": ["ok_m.nii.gz", "empty_m.nii.gz", "ok_m.nii.gz"],
        },
        index=["a", "b", "c"],
    )
    X = read_cohort(df, base_dir=tmp_path)  # headers are fine: the empty mask shows on loading
    with pytest.raises(ValueError, match="is empty"):
        list(iter_cases(X))
    cases = list(iter_cases(X, errors="return"))
    assert [c.error is None for c in cases] == [True, False, True]
    assert cases[1].image is None and "empty_m.nii.gz" in str(cases[1].error)
    assert [c.position for c in iter_cases(X, rows=[2, 0])] == [2, 0]
    labelled = X.assign(mask_label=[1, 1, 1])
    with pytest.raises(ValueError, match="mask_label=1 but label=2"):
        next(iter_cases(labelled, label=2))
    with pytest.raises(TypeError, match="image frame"):
        next(iter_cases(np.zeros((2, 4, 4))))
