"""``skrtl extract``: one row per case, an errors file, resumable, parallel = serial."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from _cohort_fixtures import lesion_volume, write_cohort, write_nifti

import skrtl._extract as extract_module
from skrtl import extract_cohort, read_radiomics_params
from skrtl.cli import main

FAST = ["--input-size", "32", "--precision", "fp32", "--id-column", "patient", "--quiet"]


@pytest.fixture
def good_cohort(tmp_path):
    return write_cohort(tmp_path / "data", n=5, second_label=())


@pytest.fixture
def params_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(
        "imageType:\n  Original: {}\nfeatureClass:\n  firstorder: [Mean, Energy]\n"
        "  shape: [VoxelVolume]\nsetting:\n  binWidth: 25\n  label: 1\n"
    )
    return p


def test_one_row_per_case_and_an_errors_row_per_bad_case(tmp_path, params_file):
    csv = write_cohort(tmp_path / "data", n=7)
    folder = csv.parent
    table = pd.read_csv(csv)
    rng = np.random.default_rng(5)
    vol, _ = lesion_volume(rng)
    write_nifti(folder / "empty.nii.gz", np.zeros(vol.shape, np.uint8))
    write_nifti(folder / "shifted.nii.gz", np.ones(vol.shape, np.uint8), spacing=(3, 1, 1))
    (folder / "corrupt.nii.gz").write_bytes(b"this is not an image")
    table.loc[1, "Image"] = "missing.nii.gz"
    table.loc[2, "Mask"] = "empty.nii.gz"
    table.loc[3, "Mask"] = "shifted.nii.gz"
    table.loc[4, "Image"] = "corrupt.nii.gz"
    table.to_csv(csv, index=False)
    out = tmp_path / "out" / "features.csv"
    rc = main(["extract", str(csv), "-o", str(out), "--params", str(params_file), *FAST])
    assert rc == 1  # some cases failed
    feats = pd.read_csv(out)
    assert feats["patient"].tolist() == ["P00", "P05", "P06"]  # table order, good cases only
    assert list(feats.columns[: len(table.columns)]) == list(table.columns)  # columns kept
    assert feats["Image"].tolist() == table.loc[[0, 5, 6], "Image"].tolist()
    cnn = [c for c in feats.columns if c.startswith("cnn_")]
    assert len(cnn) == 1280 and np.isfinite(feats[cnn].to_numpy()).all()
    assert {"original_firstorder_Mean", "original_shape_VoxelVolume"} <= set(feats.columns)
    errors = pd.read_csv(tmp_path / "out" / "features.errors.csv")
    assert errors["case"].tolist() == ["P01", "P02", "P03", "P04"]
    assert set(errors["stage"]) == {"load"}
    why = dict(zip(errors["case"], errors["message"]))
    assert "missing.nii.gz" in why["P01"] and "does not exist" in why["P01"]
    assert "empty.nii.gz" in why["P02"] and "empty" in why["P02"]
    assert "shifted.nii.gz" in why["P03"] and "does not match" in why["P03"]
    assert "corrupt.nii.gz" in why["P04"]
    assert errors.loc[errors["case"] == "P01", "error"].item() == "FileNotFoundError"


def test_resume_after_interrupt_and_crash_recomputes_nothing(tmp_path, good_cohort, monkeypatch):
    clean = tmp_path / "clean" / "f.csv"
    assert main(["extract", str(good_cohort), "-o", str(clean), *FAST]) == 0
    assert not (tmp_path / "clean" / "f.errors.csv").exists()
    real = extract_module.load_case
    loaded = []

    def loader(fail_at, exc):
        def load(image, *args, **kwargs):
            if len(loaded) == fail_at:
                raise exc
            loaded.append(os.path.basename(image))
            return real(image, *args, **kwargs)

        return load

    out = tmp_path / "run" / "f.csv"
    # Ctrl-C during case 3: cases 0-2 are saved, exit status 130, no partial output
    monkeypatch.setattr(extract_module, "load_case", loader(3, KeyboardInterrupt()))
    assert main(["extract", str(good_cohort), "-o", str(out), *FAST]) == 130
    assert loaded == ["img0.nii.gz", "img1.nii.gz", "img2.nii.gz"] and not out.exists()
    # a hard crash (an exception that is not a case failure) during case 4
    loaded.clear()
    monkeypatch.setattr(extract_module, "load_case", loader(1, SystemExit("killed")))
    with pytest.raises(SystemExit):
        extract_cohort(good_cohort, out, id_column="patient", input_size=32, precision="fp32",
                       verbose=0)  # fmt: skip
    assert loaded == ["img3.nii.gz"]  # cases 0-2 were not recomputed
    # the rerun computes only the last case and gives the clean run's output
    loaded.clear()
    monkeypatch.setattr(extract_module, "load_case", loader(-1, None))
    res = extract_cohort(
        good_cohort, out, id_column="patient", input_size=32, precision="fp32", verbose=0
    )
    assert loaded == ["img4.nii.gz"]
    assert (res.n_reused, res.n_computed, res.n_failed, res.exit_code) == (4, 1, 0, 0)
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(clean))
    # nothing left to do
    loaded.clear()
    assert main(["extract", str(good_cohort), "-o", str(out), *FAST]) == 0
    assert loaded == []


def test_changed_settings_or_files_are_recomputed(tmp_path, good_cohort, monkeypatch):
    out = tmp_path / "f.csv"
    kw = dict(id_column="patient", input_size=32, precision="fp32", verbose=0)
    first = extract_cohort(good_cohort, out, **kw)
    assert first.n_computed == 5
    other = extract_cohort(good_cohort, out, pooling="max", **kw)
    assert (other.n_computed, other.n_reused) == (5, 0)
    assert other.settings_hash != first.settings_hash
    again = extract_cohort(good_cohort, out, **kw)
    assert (again.n_computed, again.n_reused) == (0, 5)
    rng = np.random.default_rng(9)
    vol, mask = lesion_volume(rng)
    write_nifti(good_cohort.parent / "img2.nii.gz", vol + 7)  # an edited image
    write_nifti(good_cohort.parent / "seg2.nii.gz", mask)
    edited = extract_cohort(good_cohort, out, **kw)
    assert (edited.n_computed, edited.n_reused) == (1, 4)


def test_jobs_2_gives_the_serial_output(tmp_path, good_cohort):
    serial, parallel = tmp_path / "serial.csv", tmp_path / "parallel.csv"
    assert main(["extract", str(good_cohort), "-o", str(serial), *FAST]) == 0
    assert main(["extract", str(good_cohort), "-o", str(parallel), "--jobs", "2", *FAST]) == 0
    # worker processes run torch with their own thread count: equal up to float rounding
    pd.testing.assert_frame_equal(
        pd.read_csv(parallel), pd.read_csv(serial), check_exact=False, rtol=1e-4, atol=1e-4
    )


def test_options_reach_the_extractors(tmp_path, good_cohort, params_file):
    out = tmp_path / "f.csv"
    args = ["extract", str(good_cohort), "-o", str(out), *FAST]
    assert main([*args, "--no-cnn", "--params", str(params_file), "--label", "Label"]) == 0
    feats = pd.read_csv(out)
    assert not [c for c in feats.columns if c.startswith("cnn_")]
    assert {c for c in feats.columns if c.startswith("original_")} == {
        "original_shape_VoxelVolume",
        "original_firstorder_Energy",
        "original_firstorder_Mean",
    }
    assert main([*args, "--layers", "3,final", "--pooling", "avgmax", "--mode", "2d"]) == 0
    cols = pd.read_csv(out).columns
    assert any(c.startswith("cnn_l3_avg_") for c in cols)
    assert any(c.startswith("cnn_l9_max_") for c in cols)
    # warnings of a case (a lesion cut by a fixed field of view) come back with the case
    res = extract_cohort(good_cohort, tmp_path / "g.csv", id_column="patient", size_mm=6,
                         target_spacing=0.5, input_size=32, verbose=0)  # fmt: skip
    assert any(
        n.startswith("case 'P00': UserWarning") and "extends beyond" in n for n in res.notes
    )


def test_usage_errors_exit_2(tmp_path, good_cohort, capsys):
    out = str(tmp_path / "f.csv")
    assert main(["extract", str(good_cohort), "-o", out, "--no-cnn", "--quiet"]) == 2
    assert "nothing to extract" in capsys.readouterr().err
    assert main(["extract", str(tmp_path / "nope.csv"), "-o", out, "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["extract", str(good_cohort), "-o", out, "--label", "Lbl", "--quiet"]) == 2
    assert "label='Lbl' is not a column" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["extract", str(good_cohort), "-o", str(blocker / "f.csv"), "--quiet"]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["extract", str(good_cohort), "-o", out, "--jobs", "0"])
    assert "positive integer or -1" in capsys.readouterr().err


def test_read_radiomics_params(tmp_path, params_file):
    spec = read_radiomics_params(params_file)
    assert spec["features"] == {"firstorder": ["Mean", "Energy"], "shape": ["VoxelVolume"]}
    assert spec["settings"] == {"binWidth": 25, "label": 1}
    assert spec["image_types"] == {"Original": {}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("featureclass:\n  glcm: []\n")
    with pytest.raises(ValueError, match=r"unknown sections \['featureclass'\]"):
        read_radiomics_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        read_radiomics_params(bad)
