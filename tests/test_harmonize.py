"""Tests of the image-level harmonizers (spacing, histogram matching, intensity)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

from skrtl._harmonize import (
    CT_WINDOWS,
    HarmonizationWarning,
    HistogramMatcher,
    IntensityStandardizer,
    IntensityWindow,
    SpacingResampler,
)
from skrtl._imaging import make_image_frame


def _images(n=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs = []
    for _ in range(n):
        cy, cx = rng.integers(4, size - 4, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
        imgs.append((100 * blob + rng.normal(0, 5, (size, size)) + 50).astype(np.float32))
    return np.stack(imgs)


# --------------------------------------------------------------------------------------------
# SpacingResampler
# --------------------------------------------------------------------------------------------
def test_resampler_to_given_spacing_updates_images_masks_spacing():
    imgs = [np.arange(400, dtype=np.float32).reshape(20, 20), np.ones((10, 10), np.float32)]
    masks = [np.zeros((20, 20), bool), np.zeros((10, 10), bool)]
    masks[0][4:8, 4:8] = True
    masks[1][2:4, 2:4] = True
    X = make_image_frame(imgs, masks=masks, spacing=[(0.5, 0.5), (1.0, 1.0)], sites=["a", "b"])
    out = SpacingResampler(target_spacing=1.0).fit_transform(X)
    assert isinstance(out, pd.DataFrame)
    assert [im.shape for im in out["image"]] == [(10, 10), (10, 10)]
    assert [m.shape for m in out["mask"]] == [(10, 10), (10, 10)]
    assert out["mask"].iloc[0].dtype == bool and out["mask"].iloc[0].sum() == 4
    assert list(out["spacing"]) == [(1.0, 1.0), (1.0, 1.0)]
    assert list(out["site"]) == ["a", "b"]
    # the already-conform image is unchanged
    np.testing.assert_allclose(out["image"].iloc[1], imgs[1])
    # linear resampling of a linear ramp keeps it (nearly) linear, mean preserved
    assert out["image"].iloc[0].mean() == pytest.approx(imgs[0].mean(), rel=0.02)


def test_resampler_median_target_is_learnt_in_fit_and_3d():
    vols = [np.ones((4, 8, 8), np.float32), np.ones((8, 8, 8), np.float32)] * 2
    spacing = [(2.0, 1.0, 1.0), (1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (3.0, 0.5, 0.5)]
    masks = [np.ones(v.shape, bool) for v in vols]
    X = make_image_frame(vols, masks=masks, spacing=spacing)
    r = SpacingResampler().fit(X)
    np.testing.assert_allclose(r.target_spacing_, [2.0, 1.0, 1.0])
    out = r.transform(X)
    assert out["image"].iloc[0].shape == (4, 8, 8)
    assert out["image"].iloc[1].shape == (4, 8, 8)
    assert out["image"].iloc[3].shape == (12, 4, 4)
    assert out["mask"].iloc[3].shape == (12, 4, 4)


def test_resampler_keeps_a_tiny_lesion():
    img = np.zeros((40, 40), np.float32)
    m = np.zeros((40, 40), bool)
    m[21, 21] = True
    X = make_image_frame([img], masks=[m], spacing=[(0.25, 0.25)])
    out = SpacingResampler(target_spacing=2.0).fit_transform(X)
    assert out["mask"].iloc[0].shape == (5, 5)
    assert out["mask"].iloc[0].sum() >= 1


def test_resampler_needs_spacing_and_valid_target():
    with pytest.raises(ValueError, match="'spacing' column"):
        SpacingResampler().fit(_images())
    X = make_image_frame(list(_images(2)), spacing=[(1.0, 1.0)] * 2)
    with pytest.raises(ValueError, match="target_spacing"):
        SpacingResampler(target_spacing=(1.0, 1.0, 1.0)).fit(X)


# --------------------------------------------------------------------------------------------
# HistogramMatcher
# --------------------------------------------------------------------------------------------
def test_image_level_matching_maps_quantiles_to_reference_monotonically():
    ref = _images(8)
    shifted = (0.004 * ref**2 + 30).astype(np.float32)  # monotone intensity remap
    hm = HistogramMatcher(n_quantiles=51).fit(ref)
    out = hm.transform(shifted)
    assert isinstance(out, np.ndarray) and out.shape == shifted.shape and out.dtype == np.float32
    for o in out:
        q = np.percentile(o, hm.levels_)
        np.testing.assert_allclose(q, hm.reference_quantiles_, atol=2.0)
    # order of intensities inside each image preserved
    i = np.argsort(shifted[0].ravel())
    assert np.all(np.diff(out[0].ravel()[i]) >= -1e-4)
    # the remap is undone up to the per-image vs average-reference difference
    assert np.abs(out - ref).mean() < 0.15 * np.abs(shifted - ref).mean()


def test_site_level_matching_uses_site_quantiles_learnt_in_fit():
    a = _images(6, seed=1)
    b = (0.5 * _images(6, seed=2) + 200).astype(np.float32)
    X = make_image_frame(np.concatenate([a, b]), sites=["A"] * 6 + ["B"] * 6)
    hm = HistogramMatcher(level="site", reference_site="A").fit(X)
    assert set(hm.site_quantiles_) == {"A", "B"}
    out = hm.transform(X)
    assert isinstance(out, pd.DataFrame) and list(out["site"]) == list(X["site"])
    np.testing.assert_allclose(np.stack(out["image"].iloc[:6]), a, atol=1e-3)
    b_out = np.stack(out["image"].iloc[6:])
    assert abs(b_out.mean() - a.mean()) < 2.0
    # transform of a single row does not depend on the other rows
    one = hm.transform(X.iloc[[7]])
    np.testing.assert_array_equal(one["image"].iloc[0], out["image"].iloc[7])


def test_site_level_unseen_site():
    X = make_image_frame(_images(4), sites=["A", "A", "B", "B"])
    hm = HistogramMatcher(level="site").fit(X)
    Xn = make_image_frame(_images(2, seed=5) * 2, sites=["C", "C"])
    with pytest.raises(ValueError, match=r"sites \['C'\] were not seen in fit"):
        hm.transform(Xn)
    with pytest.warns(HarmonizationWarning, match="'C' was not seen"):
        out = clone(hm).set_params(unseen="batch").fit(X).transform(Xn)
    assert abs(np.stack(out["image"]).mean() - _images(4).mean()) < 5.0
    with pytest.raises(ValueError, match="needs site labels"):
        HistogramMatcher(level="site").fit(_images(4))


def test_matching_statistics_inside_masks():
    imgs = _images(4)
    masks = np.zeros(imgs.shape, bool)
    masks[:, 4:12, 4:12] = True
    X = make_image_frame(imgs, masks=masks)
    q_in = HistogramMatcher().fit(X).reference_quantiles_
    q_all = HistogramMatcher(use_mask=False).fit(X).reference_quantiles_
    expected = np.mean(
        [np.percentile(im[m], np.linspace(0, 100, 101)) for im, m in zip(imgs, masks)], 0
    )
    np.testing.assert_allclose(q_in, expected)
    assert not np.allclose(q_in, q_all)
    assert "mask" in HistogramMatcher().fit_transform(X).columns


def test_histogram_matcher_rejects_bad_range_and_nan():
    with pytest.raises(ValueError, match="quantile_range"):
        HistogramMatcher(quantile_range=(50, 10)).fit(_images(2))
    bad = _images(2)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        HistogramMatcher().fit(bad)


# --------------------------------------------------------------------------------------------
# IntensityStandardizer
# --------------------------------------------------------------------------------------------
def test_ct_window():
    hu = np.array([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]], dtype=np.float32)
    out = IntensityStandardizer(method="window", window=(40, 400)).fit_transform(hu)
    np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.5, 1.0, 1.0])


def test_zscore_inside_mask_and_percentile():
    imgs = _images(3) * 3 + 7
    masks = np.zeros(imgs.shape, bool)
    masks[:, 2:10, 2:10] = True
    X = make_image_frame(imgs, masks=masks, sites=["a", "b", "c"])
    out = IntensityStandardizer(method="zscore").fit_transform(X)
    for im, m in zip(out["image"], masks):
        assert im[m].mean() == pytest.approx(0.0, abs=1e-4)
        assert im[m].std() == pytest.approx(1.0, abs=1e-4)
    p = IntensityStandardizer(method="percentile", use_mask=False).fit_transform(imgs)
    assert p.min() == 0.0 and p.max() == 1.0
    mm = IntensityStandardizer(method="minmax").fit_transform(imgs)
    np.testing.assert_allclose(mm.reshape(3, -1).max(1), 1.0)


def test_intensity_bad_window():
    with pytest.raises(ValueError, match="width > 0"):
        IntensityStandardizer(method="window", window=(40, 0)).fit(_images(1))


# --------------------------------------------------------------------------------------------
# IntensityWindow
# --------------------------------------------------------------------------------------------
def test_intensity_window_single_and_several_windows_as_channels():
    hu = np.array([[[-1000.0, -160.0, 40.0], [240.0, 500.0, 3000.0]]], dtype=np.float32)
    one = IntensityWindow(windows=(40, 400)).fit_transform(hu)
    assert one.shape == hu.shape and one.dtype == np.float32
    np.testing.assert_allclose(one[0], [[0.0, 0.0, 0.5], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(IntensityWindow().fit_transform(hu), one)  # soft tissue preset
    iw = IntensityWindow(windows=["soft_tissue", "lung", (400, 1800)]).fit(hu)
    assert iw.windows_ == [CT_WINDOWS["soft_tissue"], CT_WINDOWS["lung"], (400.0, 1800.0)]
    three = iw.transform(hu)
    assert three.shape == (1, 2, 3, 3)
    np.testing.assert_allclose(three[..., 0], one)
    lung_lo = -600 - 750
    np.testing.assert_allclose(three[0, 0, 0, 1], (-1000 - lung_lo) / 1500, rtol=1e-6)
    assert three.min() >= 0.0 and three.max() <= 1.0
    hu_out = IntensityWindow(windows="lung", output="hu").fit_transform(hu)
    assert hu_out.min() == -1000.0 and hu_out.max() == 150.0


def test_intensity_window_frame_volumes_and_errors():
    vols = [np.full((3, 4, 4), 40.0, np.float32), np.full((5, 4, 4), 1000.0, np.float32)]
    masks = [np.ones(v.shape, bool) for v in vols]
    X = make_image_frame(vols, masks=masks, spacing=[(1.0, 1.0, 1.0)] * 2, sites=["a", "b"])
    out = IntensityWindow(windows="soft_tissue").fit_transform(X)
    assert list(out.columns) == list(X.columns) and list(out["site"]) == ["a", "b"]
    assert out["image"].iloc[1].shape == (5, 4, 4) and out["image"].iloc[1].max() == 1.0
    with pytest.raises(ValueError, match="stacks them as channels of 2-D"):
        IntensityWindow(windows=["lung", "bone"]).fit(X)
    for bad in ["bones", (40, 0), [(40, -1)], [], "x", [("a", 3)]]:
        with pytest.raises(ValueError, match="is not valid"):
            IntensityWindow(windows=bad).fit(_images(1))
    with pytest.raises(ValueError, match="output"):
        IntensityWindow(output="HU").fit(_images(1))


@pytest.mark.parametrize(
    "est",
    [
        HistogramMatcher(),
        IntensityStandardizer(),
        IntensityWindow(windows=[(50, 100), (60, 40)]),
    ],
    ids=lambda e: type(e).__name__,
)
def test_set_output_pandas_gives_an_image_frame(est):
    imgs = _images(3)
    out = clone(est).set_output(transform="pandas").fit_transform(imgs)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == ["image"]
    ref = clone(est).fit_transform(imgs)
    np.testing.assert_allclose(np.stack(out["image"]), ref)
    X = make_image_frame(imgs, sites=["a", "b", "c"])
    fitted = clone(est).fit(X)
    assert list(fitted.get_feature_names_out()) == ["image", "site"]
    out_f = make_pipeline(clone(est)).set_output(transform="pandas").fit_transform(X)
    assert list(out_f.columns) == ["image", "site"] and out_f.index.equals(X.index)
