"""Every estimator on a cohort of files (read_cohort), exactly as on an in-memory frame."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from _cohort_fixtures import SPACING, lesion_volume, memory_twin, write_cohort

import skrtl._cohort as cohort_module
from skrtl import (
    AdaBN,
    ComBatHarmonizer,
    FineTuneClassifier,
    HarmonizationWarning,
    HistogramMatcher,
    IntensityStandardizer,
    IntensityWindow,
    LesionCropper,
    PretrainedCNNFeatures,
    RadiomicsFeatures,
    SpacingResampler,
    case_cache_info,
    clear_case_cache,
    clear_feature_cache,
    lesion_slice,
    make_image_frame,
    read_cohort,
    read_image_frame,
)

CNN = dict(mode="2.5d", input_size=32, batch_size=4, precision="fp32")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    csv = write_cohort(tmp_path_factory.mktemp("cohort"), n=8)
    X = read_cohort(csv, label="Label", site="hospital", id="patient")
    y = X.pop("malignant").to_numpy()
    X = X.drop(columns=["time", "event"])
    return X, y, memory_twin(X)


@pytest.fixture
def count_reads(monkeypatch):
    """Number of image files read through the cohort loader."""
    calls = []
    real = cohort_module.read_image
    clear_case_cache()

    def counting(path, **kwargs):
        calls.append(str(path))
        return real(path, **kwargs)

    monkeypatch.setattr(cohort_module, "read_image", counting)
    return calls


# --------------------------------------------------------------------------------------------
# the lazy input
# --------------------------------------------------------------------------------------------
def test_file_frame_reads_headers_only(cohort, count_reads):
    X, _, twin = cohort
    data = read_image_frame(X, mode="2.5d")
    assert data.lazy and len(data) == 8 and not count_reads
    assert data.shape(0) == twin["image"].iat[0].shape
    np.testing.assert_allclose(data.spacing[0], SPACING, rtol=1e-6)
    assert data.dtype(0) == np.dtype(np.int16)  # the stored type drives intensity="auto"
    assert data.has_mask(3) and data.case_name(2) == "case 'P02'"
    img, mask = data.images[2], data.masks[2]  # one load for the image and its mask
    assert count_reads == [X["image"].iat[2]]
    np.testing.assert_array_equal(img, twin["image"].iat[2])
    np.testing.assert_array_equal(mask, twin["mask"].iat[2])


def test_cnn_features_from_files_equal_memory_and_load_each_case_once(cohort, count_reads):
    X, _, twin = cohort
    clear_feature_cache()
    fe = PretrainedCNNFeatures(**CNN).fit(X)
    assert not count_reads  # fit reads headers only
    F = fe.transform(X)
    assert len(count_reads) == len(X)  # each case loaded once
    np.testing.assert_array_equal(F, fe.transform(twin))
    count_reads.clear()
    np.testing.assert_array_equal(fe.transform(X), F)
    assert not count_reads  # cache hits are keyed by file identity: nothing loaded
    F3 = PretrainedCNNFeatures(**{**CNN, "mode": "3d"}, cache=False).fit(X).transform(X)
    assert np.isfinite(F3).all() and not np.allclose(F3, F)
    assert not count_reads  # decoded cases are kept in the bounded case cache
    assert case_cache_info()["entries"] == len(X)


def test_case_cache_is_bounded_and_follows_the_files(cohort, count_reads, tmp_path):
    X, _, _ = cohort
    fe = PretrainedCNNFeatures(**CNN, cache=False).fit(X)
    F = fe.transform(X)
    assert len(count_reads) == len(X)
    try:
        case_cache_info(max_mb=0)  # off: every pass decodes the files again
        count_reads.clear()
        np.testing.assert_array_equal(fe.transform(X), F)
        assert len(count_reads) == len(X) and case_cache_info()["entries"] == 0
    finally:
        case_cache_info(max_mb=256)
    with pytest.raises(ValueError, match="max_mb"):
        case_cache_info(max_mb=-1)


def test_header_errors_come_before_any_pixel(cohort, count_reads):
    X, _, _ = cohort
    with pytest.raises(ValueError, match=r"case 'P00'.*is a volume.*LesionCropper\(mode='2d'\)"):
        PretrainedCNNFeatures(input_size=32).fit(X)
    bad = X.copy()
    bad["image"] = bad["image"].to_numpy().copy()
    bad.iloc[1, bad.columns.get_loc("image")] = "/nonexistent/ct.nii.gz"
    bad.iloc[4, bad.columns.get_loc("image")] = "/nonexistent/ct2.nii.gz"
    with pytest.raises(ValueError, match=r"cannot read 2 of 8 cases[\s\S]*P01[\s\S]*P04"):
        PretrainedCNNFeatures(**CNN).fit(bad)
    assert not count_reads


def test_one_mask_rule_for_files_and_arrays(cohort, tmp_path):
    X, _, twin = cohort
    unlabelled = X.drop(columns=["mask_label"])
    fe = PretrainedCNNFeatures(**CNN, cache=False).fit(unlabelled)
    with pytest.raises(ValueError, match=r"seg2\.nii\.gz' has 2 labels: 1 .*label="):
        fe.transform(unlabelled)
    rng = np.random.default_rng(1)
    vol, mask = lesion_volume(rng, second_label=True)
    frame = make_image_frame([vol], masks=[mask])
    with pytest.raises(ValueError, match=r"mask 0 has 2 labels"):
        PretrainedCNNFeatures(**CNN).fit(frame).transform(frame)
    labelled = make_image_frame([vol], masks=[mask], mask_label=[1])
    only1 = make_image_frame([vol], masks=[mask == 1])
    fe = PretrainedCNNFeatures(**CNN, cache=False).fit(only1)
    np.testing.assert_array_equal(fe.transform(labelled), fe.transform(only1))
    with pytest.raises(ValueError, match="label 3 is not in"):
        fe.transform(make_image_frame([vol], masks=[mask], mask_label=[3]))


def test_finetune_and_adabn_on_file_frames(cohort):
    X, y, twin = cohort
    kw = dict(CNN, max_epochs=1, n_estimators=1, validation_fraction=None, random_state=0)
    kw.pop("precision")
    p_files = FineTuneClassifier(**kw).fit(X, y).predict_proba(X)
    p_mem = FineTuneClassifier(**kw).fit(twin, y).predict_proba(twin)
    np.testing.assert_allclose(p_files, p_mem, atol=1e-6)
    src = (X["site"] == "A").to_numpy()
    with pytest.warns(HarmonizationWarning, match="site 'B' come from 4 network image"):
        ada = AdaBN(PretrainedCNNFeatures(**CNN, cache=False)).fit(X[src], X_target=X[~src])
    with pytest.warns(HarmonizationWarning):
        ada_mem = AdaBN(PretrainedCNNFeatures(**CNN, cache=False))
        ada_mem.fit(twin[src], X_target=twin[~src])
    np.testing.assert_allclose(ada.transform(X), ada_mem.transform(twin), atol=1e-5)


def test_radiomics_from_files_per_row_label_and_workers(cohort):
    X, _, twin = cohort
    rad = dict(features={"firstorder": ["Mean", "Energy"], "shape": ["VoxelVolume"]})
    F = RadiomicsFeatures(**rad).fit_transform(X)
    np.testing.assert_allclose(F, RadiomicsFeatures(**rad).fit_transform(twin))
    names = list(RadiomicsFeatures(**rad).fit(X).get_feature_names_out())
    volume = [(m > 0).sum() * np.prod(SPACING) for m in twin["mask"]]
    np.testing.assert_allclose(F[:, names.index("original_shape_VoxelVolume")], volume)
    from joblib import parallel_config

    with parallel_config(backend="threading"):  # the worker path, without process start-up
        np.testing.assert_allclose(RadiomicsFeatures(**rad, n_jobs=2).fit_transform(X), F)
    with pytest.raises(ValueError, match="mask_label=1 but label=2"):
        RadiomicsFeatures(**rad, label=2).fit(X)
    both = RadiomicsFeatures(**rad, passthrough=["age"])
    out = both.fit_transform(X)
    assert out.shape == (8, F.shape[1] + 1)
    np.testing.assert_array_equal(out[:, -1], X["age"].to_numpy())
    assert both.get_feature_names_out()[-1] == "age"


def test_image_transformers_return_in_memory_frames(cohort):
    X, _, twin = cohort
    for est in (
        SpacingResampler(target_spacing=1.0),
        HistogramMatcher(level="site"),
        IntensityWindow(windows="soft_tissue"),
        IntensityStandardizer(method="zscore"),
    ):
        out = est.fit(X).transform(X)
        ref = type(est)(**est.get_params()).fit(twin).transform(twin)
        assert list(out.columns) == ["image", "mask", "spacing", "site", "age"], est
        assert out.index.equals(X.index)
        for a, b in zip(out["image"], ref["image"]):
            assert isinstance(a, np.ndarray)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        for a, b in zip(out["mask"], ref["mask"]):
            assert a.dtype == bool
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(np.stack(out["spacing"]), np.stack(ref["spacing"]), rtol=1e-6)


def test_memory_warning_for_large_file_frames(cohort, monkeypatch):
    import skrtl._harmonize as harmonize

    X, _, _ = cohort
    monkeypatch.setattr(harmonize, "_MAX_IN_MEMORY_BYTES", 1000)
    with pytest.warns(UserWarning, match="GiB as float32 arrays.*LesionCropper"):
        IntensityWindow().fit(X).transform(X)


# --------------------------------------------------------------------------------------------
# lesion crops
# --------------------------------------------------------------------------------------------
def test_lesion_cropper_files_equal_memory_and_views(cohort):
    X, _, twin = cohort
    crop = LesionCropper(size_mm=12, target_spacing=1.0).fit(X)
    out = crop.transform(X)
    assert list(out.columns) == list(crop.get_feature_names_out())
    assert list(out.columns) == ["image", "mask", "spacing", "site", "age"]
    ref = LesionCropper(size_mm=12, target_spacing=1.0).fit_transform(twin)
    for a, b in zip(out["image"], ref["image"]):
        assert a.shape == (12, 12, 12)
        np.testing.assert_allclose(a, b)
    assert out["spacing"].iat[0] == (1.0, 1.0, 1.0)
    flat = LesionCropper(mode="2d", margin_mm=2).fit_transform(X)
    for i in range(len(X)):
        box = LesionCropper(margin_mm=2).fit_transform(twin.iloc[[i]])
        img, m, _ = lesion_slice(box["image"].iat[0], box["mask"].iat[0])
        np.testing.assert_array_equal(flat["image"].iat[i], img)
        np.testing.assert_array_equal(flat["mask"].iat[i], m)
    assert len(flat["spacing"].iat[0]) == 2
    F = PretrainedCNNFeatures(**{**CNN, "mode": "2d"}).fit(flat).transform(flat)
    assert F.shape == (8, 1280) and np.isfinite(F).all()


def test_lesion_cropper_errors_and_warnings(cohort):
    X, _, twin = cohort
    with pytest.warns(UserWarning, match=r"case 'P0\d'.*extends beyond"):
        LesionCropper(size_mm=2).fit_transform(X.iloc[:2])
    with pytest.raises(ValueError, match="margin_mm .* or size_mm"):
        LesionCropper(margin_mm=5, size_mm=20).fit(X)
    with pytest.raises(ValueError, match="do not fit 3-D cases"):
        LesionCropper(size_mm=(10, 10)).fit(X)
    no_mask = twin.drop(columns=["mask"])
    with pytest.raises(ValueError, match="case 'P00' has no mask.*size_mm"):
        LesionCropper().fit_transform(no_mask)
    centred = LesionCropper(size_mm=8).fit_transform(no_mask)
    assert "mask" not in centred.columns
    with pytest.raises(ValueError, match="fitted on 3D cases but got 2D"):
        LesionCropper().fit(X).transform(make_image_frame([np.zeros((20, 20))]))
    # uint8 images stay uint8, so that intensity="auto" still divides them by 255
    img = np.zeros((40, 40), np.uint8)
    img[10:20, 10:20] = 200
    frame = make_image_frame([img], masks=[img > 0], spacing=(0.5, 0.5))
    out = LesionCropper(margin_mm=2).fit_transform(frame)
    assert out["image"].iat[0].dtype == np.uint8 and out["image"].iat[0].shape == (18, 18)
    with pytest.warns(UserWarning, match="no spacing"):
        LesionCropper(margin_mm=2).fit_transform(make_image_frame([img], masks=[img > 0]))


# --------------------------------------------------------------------------------------------
# clinical columns through a pipeline
# --------------------------------------------------------------------------------------------
def test_passthrough_columns(cohort):
    X, _, _ = cohort
    fe = PretrainedCNNFeatures(**CNN, passthrough=["site", "age"])
    with pytest.raises(ValueError, match=r"\['site'\] are not numeric.*set_output"):
        fe.fit(X)
    out = fe.set_output(transform="pandas").fit(X).transform(X)
    assert isinstance(out, pd.DataFrame) and out.index.equals(X.index)
    assert list(out.columns[-2:]) == ["site", "age"] and out.shape[1] == fe.n_features_out_
    assert out["site"].tolist() == X["site"].tolist()
    assert list(fe.get_feature_names_out()) == list(out.columns)
    num = PretrainedCNNFeatures(**CNN, passthrough="age").fit(X).transform(X)
    assert num.shape == (8, 1281) and num.dtype == np.float64
    np.testing.assert_array_equal(num[:, -1], X["age"].to_numpy())
    with pytest.raises(ValueError, match=r"\['weight'\] are not in the image frame"):
        PretrainedCNNFeatures(**CNN, passthrough=["weight"]).fit(X)
    arrays = np.zeros((2, 10, 16, 16))
    with pytest.raises(ValueError, match="needs an image frame"):
        PretrainedCNNFeatures(**CNN, passthrough=["age"]).fit(arrays)


def test_cohort_pipeline_cross_validates(cohort):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.pipeline import Pipeline

    X, y, _ = cohort
    pipe = Pipeline(
        [
            ("crop", LesionCropper(size_mm=12, target_spacing=1.0)),
            ("cnn", PretrainedCNNFeatures(**CNN, passthrough=["site", "age"])),
            ("combat", ComBatHarmonizer(covariates=["age"])),
            ("clf", LogisticRegression(max_iter=500)),
        ]
    ).set_output(transform="pandas")
    strata = X["site"].astype(str).to_numpy() + y.astype(str)  # every site in every fold
    cv = StratifiedKFold(2, shuffle=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = cross_validate(pipe, X, y, cv=cv.split(X, strata), error_score="raise")
    assert res["test_score"].shape == (2,) and np.isfinite(res["test_score"]).all()


def test_reader_settings_of_read_cohort_reach_the_estimators(tmp_path):
    from _cohort_fixtures import write_nifti

    rng = np.random.default_rng(3)
    rows = []
    for i in range(2):
        vol, mask = lesion_volume(rng)
        write_nifti(tmp_path / f"img{i}.nii.gz", vol)
        coarse = mask[:, ::2, ::2]  # the mask drawn on a coarser in-plane grid
        write_nifti(tmp_path / f"seg{i}.nii.gz", coarse, spacing=(2.0, 1.6, 1.4))
        rows.append({"image": f"img{i}.nii.gz", "mask": f"seg{i}.nii.gz"})
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="does not match image"):
        read_cohort(tmp_path / "c.csv")
    X = read_cohort(tmp_path / "c.csv", resample_mask=True)
    crops = LesionCropper(margin_mm=2).fit_transform(X.iloc[[1, 0]])  # attrs survive indexing
    assert all(m.any() for m in crops["mask"])
