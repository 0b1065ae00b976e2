"""Regression tests of the reliability issue: concurrency, layouts, memory, offline, errors."""

from __future__ import annotations

import time
import tracemalloc
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

import skrtl._backbone as backbone
from skrtl import (
    AdaBN,
    BackboneWeightsError,
    ComBatHarmonizer,
    FineTuneClassifier,
    HarmonizationWarning,
    PretrainedCNNFeatures,
    clear_feature_cache,
    load_backbone,
    make_image_frame,
    mmd_test,
)

FAST = dict(input_size=32, precision="fp32")


def _sites(n=8, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random((n, 32, 32)).astype(np.float32)
    b = (0.3 * rng.random((n, 32, 32)) ** 2 + 0.6).astype(np.float32)  # another scanner
    return make_image_frame(a, sites=["A"] * n), make_image_frame(b, sites=["B"] * n)


# --------------------------------------------------------------------------------------------
# 1. AdaBN under concurrency
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [False, True])
def test_adabn_concurrent_transforms_keep_each_sites_statistics(cache):
    clear_feature_cache()
    fa, fb = _sites()
    ada = AdaBN(PretrainedCNNFeatures(cache=cache, **FAST)).fit(fa, X_target=fb)
    plain = PretrainedCNNFeatures(cache=cache, **FAST).fit(fa)
    ref = {"A": ada.transform(fa), "B": ada.transform(fb), "plain": plain.transform(fb)}
    assert not np.allclose(ref["B"], ref["plain"], atol=1e-4)  # adaptation changes site B
    jobs = [("A", lambda: ada.transform(fa)), ("B", lambda: ada.transform(fb))]
    jobs.append(("plain", lambda: plain.transform(fb)))
    with ThreadPoolExecutor(4) as pool:
        futures = [(k, pool.submit(f)) for _ in range(8) for k, f in jobs]
        results = [(k, fut.result()) for k, fut in futures]
    wrong = [k for k, out in results if not np.allclose(out, ref[k], rtol=1e-5, atol=1e-6)]
    assert not wrong, f"{len(wrong)} of {len(results)} concurrent calls got other statistics"
    # nothing wrong was stored in the feature cache either
    for _ in range(3):
        np.testing.assert_allclose(ada.transform(fb), ref["B"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(plain.transform(fb), ref["plain"], rtol=1e-5, atol=1e-6)


def test_adabn_refuses_target_rows_of_a_source_site():
    fa, fb = _sites()
    ada = AdaBN(PretrainedCNNFeatures(**FAST)).fit(fa)
    with pytest.raises(ValueError, match=r"source sites \['A'\]"):
        ada.adapt(fa)
    # so transform(X_fit) always equals fit_transform(X_fit)
    out = AdaBN(PretrainedCNNFeatures(**FAST)).fit_transform(fa, X_target=fb)
    np.testing.assert_allclose(ada.transform(fa), out, rtol=1e-5, atol=1e-6)


def test_adabn_warns_on_statistics_of_a_single_image_and_refuses_nan_sites():
    fa, fb = _sites()
    with pytest.warns(HarmonizationWarning, match="come from 1 network image"):
        AdaBN(PretrainedCNNFeatures(**FAST)).fit(fa, X_target=fb.iloc[:1])
    bad = fb.copy()
    bad.loc[bad.index[2], "site"] = np.nan
    with pytest.raises(ValueError, match=r"missing \(NaN / None\) for 1 rows"):
        AdaBN(PretrainedCNNFeatures(**FAST)).fit(fa, X_target=bad)


def test_adabn_unseen_batch_adapts_on_the_fly():
    fa, fb = _sites()
    ada = AdaBN(PretrainedCNNFeatures(**FAST), unseen="batch").fit(fa)
    adapted = AdaBN(PretrainedCNNFeatures(**FAST)).fit(fa, X_target=fb).transform(fb)
    with pytest.warns(HarmonizationWarning, match="not adapted"):
        got = ada.transform(fb)
    np.testing.assert_allclose(got, adapted, rtol=1e-4, atol=1e-5)
    assert ada.domains_ == []  # nothing stored


# --------------------------------------------------------------------------------------------
# 2. volumes and channel-first images in mode="2d"
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [PretrainedCNNFeatures, FineTuneClassifier])
def test_volumes_and_channel_first_images_are_refused_in_2d(make):
    rng = np.random.default_rng(0)
    y = np.arange(4) % 2
    est = make(input_size=32)
    vols = rng.random((4, 28, 32, 32)).astype(np.float32)
    with pytest.raises(ValueError, match=r"volume \(D, H, W\).*mode='2.5d' or mode='3d'"):
        est.fit(vols, y)
    with pytest.raises(ValueError, match="volume"):
        est.fit(make_image_frame(list(vols)), y)
    rgb_first = rng.random((4, 3, 32, 32)).astype(np.float32)
    with pytest.raises(ValueError, match=r"channel-first .*np.moveaxis\(X, 1, -1\)"):
        est.fit(rgb_first, y)
    # channel-last RGB is the supported layout
    assert make(input_size=32).fit(np.moveaxis(rgb_first, 1, -1), y) is not None


# --------------------------------------------------------------------------------------------
# 5. mmd_test memory
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["rbf", "laplacian", "linear"])
def test_mmd_memory_is_bounded_by_kernel_matrices(kernel):
    rng = np.random.default_rng(0)
    n, d = 300, 1280
    Xs, Xt = rng.normal(size=(n, d)), rng.normal(0.2, 1, size=(n, d))
    tracemalloc.start()
    res = mmd_test(Xs, Xt, kernel=kernel, n_permutations=50, random_state=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kernel_bytes = (2 * n) ** 2 * 8
    assert peak < 12 * kernel_bytes + 4 * Xs.nbytes  # an (n, n, d) array would be 3.7 GB
    assert res.p_value < 0.05


# --------------------------------------------------------------------------------------------
# 6. offline: fail fast, remember, embedded tags
# --------------------------------------------------------------------------------------------
def test_non_embedded_backbone_fails_fast_offline_and_remembers(monkeypatch):
    calls = {"probe": 0}

    def unreachable(host, port=443, timeout=3.0):
        calls["probe"] += 1
        return False

    monkeypatch.setattr(backbone, "_host_reachable", unreachable)
    monkeypatch.setattr(backbone, "_cached_hub_file", lambda name: None)
    monkeypatch.setattr(backbone, "_HUB_FAILURES", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(BackboneWeightsError, match="unreachable"):
        load_backbone("resnet18")
    with pytest.raises(BackboneWeightsError, match="remembered"):
        load_backbone("resnet18")
    assert time.perf_counter() - t0 < 10 and calls["probe"] == 1
    # HF_HUB_OFFLINE: no network probe at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneWeightsError, match="HF_HUB_OFFLINE"):
        load_backbone("resnet34")
    assert calls["probe"] == 1


def test_timm_tagged_names_of_embedded_weights_load_offline(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be asked for an embedded backbone")

    monkeypatch.setattr(backbone, "_load_from_hub", no_hub)
    tagged = load_backbone("tf_efficientnet_lite0.in1k")
    plain = load_backbone("tf_efficientnet_lite0")
    for (k, a), b in zip(tagged.state_dict().items(), plain.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), k


# --------------------------------------------------------------------------------------------
# unclear errors and questionable inputs
# --------------------------------------------------------------------------------------------
def test_clear_errors_for_bad_images_and_labels():
    rng = np.random.default_rng(0)
    X = rng.random((4, 32, 32)).astype(np.float32)
    fe = PretrainedCNNFeatures(**FAST)
    with pytest.raises(ValueError, match="beyond the float32 range"):
        fe.fit(np.full((2, 32, 32), 1e300))
    with pytest.raises(ValueError, match=r"complex .*np.abs"):
        fe.fit(X.astype(np.complex64))
    # a list of images of different sizes is a sequence of images
    out = fe.fit([X[0], X[1][:20, :24]]).transform([X[0], X[1][:20, :24]])
    assert out.shape[0] == 2
    with pytest.raises(ValueError, match=r"missing labels \(None / NaN\) at rows \[1\]"):
        FineTuneClassifier(input_size=32).fit(X, np.array([0, None, 1, 0], dtype=object))


def test_combat_names_the_nan_feature():
    X = pd.DataFrame({"f1": [1.0, 2.0, 3.0, 4.0], "f2": [1.0, np.nan, 2.0, 3.0]})
    X["site"] = ["a", "a", "b", "b"]
    with pytest.raises(ValueError, match=r"row 1 column 'f2'"):
        ComBatHarmonizer().fit(X)


def test_masked_pooling_on_a_one_by_one_map_warns():
    X = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    masks = np.zeros_like(X, dtype=bool)
    masks[:, 8:16, 8:16] = True
    with pytest.warns(UserWarning, match="1 x 1"):
        PretrainedCNNFeatures(**FAST).fit(make_image_frame(X, masks=masks))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PretrainedCNNFeatures(input_size=64, precision="fp32").fit(
            make_image_frame(X, masks=masks)
        )
