"""Handcrafted radiomics transformer (PyRadiomics wrapper) and deep + handcrafted fusion."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.feature_selection import SelectKBest, VarianceThreshold, f_classif
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import FeatureUnion, make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl._imaging import make_image_frame
from skrtl._radiomics import RadiomicsFeatures, otsu_mask

radiomics = pytest.importorskip("radiomics")
sitk = pytest.importorskip("SimpleITK")


def _lesions(n=12, size=32, seed=0, ndim=2):
    """Bright noisy ellipses (class 1: textured and larger) on a darker background."""
    rng = np.random.default_rng(seed)
    shape = (size,) * ndim if ndim == 2 else (8, size, size)
    grids = np.meshgrid(*[np.arange(s) - s / 2 for s in shape], indexing="ij")
    images, masks, y = [], [], []
    for i in range(n):
        label = i % 2
        radius = (5 + 3 * label + rng.uniform(-1, 1)) * np.ones(ndim)
        if ndim == 3:
            radius[0] = 3
        m = sum((g / r) ** 2 for g, r in zip(grids, radius)) <= 1
        img = rng.normal(50, 5, size=shape)
        img[m] += 60 + rng.normal(0, 5 + 15 * label, size=m.sum())
        images.append(img)
        masks.append(m)
        y.append(label)
    return np.stack(images), np.stack(masks), np.array(y)


@pytest.fixture(scope="module")
def frame2d():
    images, masks, y = _lesions()
    X = make_image_frame(
        images, masks=masks, spacing=(0.7, 0.5), index=[f"p{i}" for i in range(len(y))]
    )
    return X, y


def test_values_and_names_equal_pyradiomics(frame2d):
    X, _ = frame2d
    settings = {"binWidth": 10}
    rad = RadiomicsFeatures(settings=settings)
    F = rad.fit_transform(X.iloc[:3])
    names = rad.get_feature_names_out()
    assert F.shape == (3, names.size) and F.dtype == np.float64
    assert {
        "original_firstorder_Mean",
        "original_glcm_Contrast",
        "original_shape2D_Perimeter",
    } <= set(names)
    assert {n.split("_")[1] for n in names} == {
        "firstorder",
        "shape2D",
        "glcm",
        "glrlm",
        "glszm",
        "gldm",
        "ngtdm",
    }
    # reference: PyRadiomics called directly on sample 1 (skrtl reads images as float32)
    from radiomics import featureextractor

    ext = featureextractor.RadiomicsFeatureExtractor(**settings)
    ext.enableAllFeatures()
    img = sitk.GetImageFromArray(X["image"].iloc[1].astype(np.float32).astype(np.float64))
    img.SetSpacing((0.5, 0.7))  # SimpleITK order (x, y) = reversed array axes
    msk = sitk.GetImageFromArray(X["mask"].iloc[1].astype(np.uint8))
    msk.CopyInformation(img)
    ref = {k: float(v) for k, v in ext.execute(img, msk).items() if not k.startswith("diag")}
    assert set(ref) == set(names)
    np.testing.assert_allclose(F[1], [ref[n] for n in names], rtol=1e-10)
    # transform reproduces fit_transform; fit alone fixes the same names
    np.testing.assert_allclose(rad.transform(X.iloc[:3]), F)
    assert list(clone(rad).fit(X.iloc[:2]).get_feature_names_out()) == list(names)


def test_spacing_gives_physical_shape_features(frame2d):
    X, _ = frame2d
    rad = RadiomicsFeatures(features={"shape": ["PixelSurface"]})
    area = rad.fit_transform(X.iloc[:2])[:, 0]
    n_pix = np.array([m.sum() for m in X["mask"].iloc[:2]])
    np.testing.assert_allclose(area, n_pix * 0.7 * 0.5)
    no_spacing = make_image_frame(list(X["image"].iloc[:2]), masks=list(X["mask"].iloc[:2]))
    np.testing.assert_allclose(rad.fit_transform(no_spacing)[:, 0], n_pix)


def test_volumes_3d_and_filters():
    images, masks, _ = _lesions(n=2, size=24, ndim=3)
    X = make_image_frame(images, masks=masks, spacing=(2.0, 1.0, 1.0))
    rad = RadiomicsFeatures(
        features={"shape": ["VoxelVolume"], "firstorder": ["Mean"]},
        image_types={"Original": {}, "LoG": {"sigma": [1.0]}, "Wavelet": {}},
    )
    F = rad.fit_transform(X)
    names = list(rad.get_feature_names_out())
    assert rad.ndim_ == 3
    assert "original_shape_VoxelVolume" in names
    assert "log-sigma-1-0-mm-3D_firstorder_Mean" in names
    assert "wavelet-LLH_firstorder_Mean" in names
    assert len(names) == 1 + 1 + 1 + 8  # shape + original + LoG + 8 wavelet bands
    vol = F[:, names.index("original_shape_VoxelVolume")]
    np.testing.assert_allclose(vol, masks.reshape(2, -1).sum(axis=1) * 2.0)
    with pytest.raises(ValueError, match="fitted on 3-D"):
        rad.transform(make_image_frame(images[:, 4], masks=masks[:, 4]))


def test_set_output_pandas_keeps_patient_index(frame2d):
    X, _ = frame2d
    rad = RadiomicsFeatures(features=["firstorder"]).set_output(transform="pandas")
    out = rad.fit_transform(X.iloc[:3])
    assert isinstance(out, pd.DataFrame)
    assert list(out.index) == ["p0", "p1", "p2"]
    assert list(out.columns) == list(rad.get_feature_names_out())
    assert isinstance(rad.transform(X.iloc[3:5]), pd.DataFrame)


def test_missing_masks_whole_and_otsu(frame2d):
    X, _ = frame2d
    images = np.stack(X["image"].iloc[:2].to_list())
    with pytest.raises(ValueError, match="has no mask.*missing_mask"):
        RadiomicsFeatures().fit(images)
    area = {"features": {"shape": ["PixelSurface"]}}
    whole = RadiomicsFeatures(**area, missing_mask="whole").fit_transform(images)
    np.testing.assert_allclose(whole[:, 0], 32 * 32)
    otsu = RadiomicsFeatures(**area, missing_mask="otsu").fit_transform(images)
    np.testing.assert_allclose(otsu[:, 0], [otsu_mask(im).sum() for im in images])
    # Otsu finds the bright lesion: close to the true mask
    m_true = X["mask"].iloc[0]
    m_otsu = otsu_mask(images[0])
    assert (m_true & m_otsu).sum() / (m_true | m_otsu).sum() > 0.8
    assert otsu_mask(np.ones((5, 5))).all()


def test_bad_masks_give_clear_errors(frame2d):
    X, _ = frame2d
    images = list(X["image"].iloc[:3])
    masks = [m.copy() for m in X["mask"].iloc[:3]]
    masks[1][:] = False
    with pytest.raises(ValueError, match="mask 1 is empty.*missing_mask"):
        RadiomicsFeatures().fit(make_image_frame(images, masks=masks))
    masks[1][5, 5] = True  # a single pixel: PyRadiomics cannot compute texture
    bad = make_image_frame(images, masks=masks)
    with pytest.raises(ValueError, match="sample 1.*errors='nan'"):
        RadiomicsFeatures(features=["firstorder"]).fit_transform(bad)
    F = RadiomicsFeatures(features=["firstorder"], errors="nan").fit_transform(bad)
    assert np.isnan(F[1]).all() and np.isfinite(F[[0, 2]]).all()


def test_bad_parameters(frame2d):
    X, _ = frame2d
    with pytest.raises(ValueError, match="unknown feature class 'glcmx'"):
        RadiomicsFeatures(features=["glcmx"]).fit(X.iloc[:1])
    with pytest.raises(ValueError, match="unknown image type 'Gabor'"):
        RadiomicsFeatures(image_types={"Gabor": {}}).fit(X.iloc[:1])
    with pytest.raises(ValueError, match="mode"):
        RadiomicsFeatures(mode="4d").fit(X.iloc[:1])
    with pytest.raises(ValueError, match="spacing has 3 values"):
        RadiomicsFeatures().fit(
            make_image_frame(
                list(X["image"].iloc[:1]), masks=list(X["mask"].iloc[:1]), spacing=(1, 1, 1)
            )
        )
    with pytest.raises(ValueError, match="feature matrix"):
        RadiomicsFeatures().fit(np.zeros((5, 4)))


def test_clear_import_error_without_the_extra(monkeypatch, frame2d):
    X, _ = frame2d
    monkeypatch.setitem(sys.modules, "radiomics", None)
    with pytest.raises(ImportError, match=r'pip install "skrtl\[radiomics\]"'):
        RadiomicsFeatures().fit(X.iloc[:1])


def test_parallel_equals_sequential(frame2d):
    from joblib import parallel_config

    X, _ = frame2d
    rad = RadiomicsFeatures(features=["firstorder", "glcm"], settings={"binWidth": 10})
    ref = rad.fit_transform(X.iloc[:4])
    with parallel_config(backend="threading"):
        par = clone(rad).set_params(n_jobs=2, verbose=1).fit_transform(X.iloc[:4])
    np.testing.assert_allclose(par, ref)


def test_pipeline_cross_validation_on_image_frame(frame2d):
    X, y = frame2d
    pipe = make_pipeline(
        RadiomicsFeatures(features=["firstorder", "glcm"], settings={"binWidth": 10}),
        VarianceThreshold(),
        StandardScaler(),
        SelectKBest(f_classif, k=5),
        LogisticRegression(),
    )
    scores = cross_val_score(pipe, X, y, cv=StratifiedKFold(3), scoring="roc_auc")
    assert scores.mean() > 0.8


@pytest.mark.skipif(
    importlib.util.find_spec("skrtl._features") is None,
    reason="skrtl._features (PretrainedCNNFeatures) not available",
)
def test_deep_and_handcrafted_fusion_in_one_pipeline(frame2d):
    from skrtl._features import PretrainedCNNFeatures

    X, y = frame2d
    deep = PretrainedCNNFeatures(input_size=32, batch_size=8)
    fusion = FeatureUnion(
        [
            ("deep", deep),
            ("radiomics", RadiomicsFeatures(features=["firstorder"], settings={"binWidth": 10})),
        ]
    )
    pipe = make_pipeline(
        fusion,
        SimpleImputer(),
        VarianceThreshold(),
        StandardScaler(),
        SelectKBest(f_classif, k=10),
        LogisticRegression(max_iter=500),
    )
    pipe.fit(X, y)
    names = pipe[0].get_feature_names_out()
    n_rad = sum(n.startswith("radiomics__original_firstorder") for n in names)
    assert n_rad == 18 and len(names) > n_rad
    assert pipe.predict_proba(X).shape == (len(y), 2)


def _two_structures():
    """Two different regions in one label map: 1 = bright, small; 2 = darker, larger."""
    rng = np.random.default_rng(5)
    images, labels = [], []
    for _ in range(3):
        img = rng.normal(40, 5, size=(32, 32))
        lab = np.zeros((32, 32), np.uint8)
        lab[4:12, 4:12] = 1
        lab[16:30, 14:30] = 2
        img[lab == 1] += 100
        img[lab == 2] += rng.normal(20, 10, size=(lab == 2).sum())
        images.append(img)
        labels.append(lab)
    return images, labels


def test_label_selects_one_structure_like_pyradiomics_setting():
    images, labels = _two_structures()
    X = make_image_frame(images, masks=labels, spacing=(0.5, 0.5))
    feats = {"firstorder": ["Mean"], "shape2D": ["PixelSurface"]}
    only2 = make_image_frame(images, masks=[lab == 2 for lab in labels], spacing=(0.5, 0.5))
    ref = RadiomicsFeatures(features=feats).fit_transform(only2)
    for rad in (
        RadiomicsFeatures(features=feats, label=2),
        RadiomicsFeatures(features=feats, settings={"label": 2}),  # PyRadiomics' own setting
        RadiomicsFeatures(features=feats, label=2, settings={"label": 2}),
    ):
        np.testing.assert_allclose(rad.fit_transform(X), ref)
    names = list(RadiomicsFeatures(features=feats, label=2).fit(X).get_feature_names_out())
    area = ref[:, names.index("original_shape2D_PixelSurface")]
    np.testing.assert_allclose(area, (labels[0] == 2).sum() * 0.25)
    union = RadiomicsFeatures(features=feats, label=[1, 2]).fit_transform(X)
    assert union[0, names.index("original_shape2D_PixelSurface")] == (labels[0] > 0).sum() * 0.25


def test_label_errors_instead_of_a_silent_union():
    images, labels = _two_structures()
    X = make_image_frame(images, masks=labels)
    with pytest.raises(ValueError, match=r"mask 0 has 2 labels: 1 \(64 voxels\).*label="):
        RadiomicsFeatures(features=["firstorder"]).fit(X)
    with pytest.raises(ValueError, match=r"label 3 is not in .*mask 0; labels present: 1"):
        RadiomicsFeatures(features=["firstorder"], label=3).fit(X)
    with pytest.raises(ValueError, match="disagree"):
        RadiomicsFeatures(features=["firstorder"], label=1, settings={"label": 2}).fit(X)
    fitted = RadiomicsFeatures(features=["firstorder"], label=1).fit(X)
    only2 = [np.where(lab == 2, 2, 0).astype(np.uint8) for lab in labels]
    with pytest.raises(ValueError, match="label 1 is not in"):
        fitted.transform(make_image_frame(images, masks=only2))
