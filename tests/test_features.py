"""Tests of the frozen pretrained-CNN feature transformer (tiny images, single thread)."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import estimator_checks as ec

from skrtl._features import (
    PretrainedCNNFeatures,
    clear_feature_cache,
    feature_cache_info,
)
from skrtl._imaging import make_image_frame
from skrtl._inference import ConvAct, InferenceRunner
from skrtl.utils import bf16_supported

FAST = dict(input_size=32, batch_size=8, backend="torch")


def _blobs(n=12, size=32, seed=0):
    """Bright disc (class 1) or dark square (class 0) on noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    X = rng.normal(0.0, 0.1, (n, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    for i in range(n):
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        if y[i]:
            X[i][(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2] += 2.0
        else:
            X[i][abs(yy - cy) + abs(xx - cx) < size // 5] -= 1.0
    return X, y


@pytest.fixture
def count_forwards(monkeypatch):
    calls = {"n": 0}
    orig = InferenceRunner.__call__

    def counting(self, x, pad_to=None):
        calls["n"] += int(x.shape[0])
        return orig(self, x, pad_to=pad_to)

    monkeypatch.setattr(InferenceRunner, "__call__", counting)
    return calls


# --------------------------------------------------------------------------------------------
# basic use
# --------------------------------------------------------------------------------------------
def test_pipeline_cross_val_score():
    X, y = _blobs(16)
    pipe = make_pipeline(
        PretrainedCNNFeatures(**FAST), StandardScaler(), LogisticRegression(max_iter=500)
    )
    scores = cross_val_score(pipe, X, y, cv=StratifiedKFold(4), scoring="roc_auc")
    assert scores.shape == (4,) and np.isfinite(scores).all()
    assert scores.mean() > 0.7


def test_output_shape_names_and_pandas_output():
    X, _ = _blobs(5)
    frame = make_image_frame(X, index=[f"p{i}" for i in range(5)])
    fe = PretrainedCNNFeatures(**FAST).fit(frame)
    out = fe.transform(frame)
    assert out.shape == (5, fe.n_features_out_) == (5, 1280)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    names = fe.get_feature_names_out()
    assert names[0] == "cnn_l9_avg_0000" and names[12] == "cnn_l9_avg_0012"
    fe.set_output(transform="pandas")
    df = fe.transform(frame)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == list(names) and list(df.index) == list(frame.index)
    np.testing.assert_array_equal(df.to_numpy(), out)


def test_uint8_rgb_and_array_forms_agree():
    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    fe = PretrainedCNNFeatures(**FAST, precision="fp32", cache=False).fit(X)
    a = fe.transform(X)
    b = fe.transform(make_image_frame(list(X)))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # intensity="auto" on uint8 data divides by 255
    c = PretrainedCNNFeatures(**FAST, precision="fp32", intensity="uint8", cache=False)
    np.testing.assert_allclose(c.fit(X).transform(X), a, rtol=1e-5, atol=1e-6)


def test_multi_layer_feature_count_and_names():
    X, _ = _blobs(3)
    fe = PretrainedCNNFeatures(**FAST, layers=[1, "blocks.3", "final"], pooling="avgmax")
    out = fe.fit_transform(X)
    assert fe.layers_ == ["l1", "l5", "l9"]
    assert fe.layer_dims_ == [32, 80, 1280]
    assert out.shape == (3, 2 * (32 + 80 + 1280))
    names = fe.get_feature_names_out()
    assert names[0] == "cnn_l1_avg_0000" and names[32] == "cnn_l1_max_0000"
    assert names[-1] == "cnn_l9_max_1279"
    # a shallow-only extractor stops early but gives the same numbers
    shallow = PretrainedCNNFeatures(**FAST, layers=[1], pooling="avgmax").fit(X)
    np.testing.assert_allclose(shallow.transform(X), out[:, :64], rtol=1e-5, atol=1e-5)


def test_layer_name_module_name_and_bad_layer():
    X, _ = _blobs(2)
    fe = PretrainedCNNFeatures(**FAST, layers=["stem", "blocks.2.1"]).fit(X)
    assert fe.layers_ == ["l1", "blocks_2_1"]
    assert fe.transform(X).shape == (2, 32 + 40)
    with pytest.raises(ValueError, match="out of range"):
        PretrainedCNNFeatures(**FAST, layers=42).fit(X)
    with pytest.raises(ValueError, match="neither 'final'"):
        PretrainedCNNFeatures(**FAST, layers="nope").fit(X)


# --------------------------------------------------------------------------------------------
# masked pooling
# --------------------------------------------------------------------------------------------
def test_masked_pooling_matches_manual_computation():
    X, _ = _blobs(3)
    mask = np.zeros((3, 32, 32), dtype=bool)
    mask[:, :16, :16] = True  # top-left quadrant: feature-map cells [:8, :8] at stride 2
    frame = make_image_frame(X, masks=mask)
    kw = dict(FAST, layers=[1], precision="fp32", cache=False)
    results = {}
    for pooling in ("avg", "max", "gem"):
        fe = PretrainedCNNFeatures(**kw, pooling=pooling).fit(frame)
        masked = fe.transform(frame)
        plain = PretrainedCNNFeatures(**kw, pooling=pooling, mask_pooling=False)
        unmasked = plain.fit(frame).transform(frame)
        assert not np.allclose(masked, unmasked)
        np.testing.assert_allclose(plain.transform(X), unmasked, rtol=1e-6)
        results[pooling] = masked
    # manual: stem feature map of the unmodified network, pooled over the quadrant
    model = fe._skrtl_torch_module()
    ((x, idx),) = list(fe._skrtl_iter_inputs(frame))
    np.testing.assert_array_equal(idx, [0, 1, 2])
    store = {}
    hook = model.get_submodule(fe._layer_modules[0]).register_forward_hook(
        lambda m, a, o: store.__setitem__("f", o)
    )
    with torch.no_grad():
        model.forward_features(x)
    hook.remove()
    fmap = store["f"]
    assert fmap.shape[2:] == (16, 16)
    quad = fmap[:, :, :8, :8]
    np.testing.assert_allclose(results["avg"], quad.mean((2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(results["max"], quad.amax((2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    gem = quad.clamp_min(1e-6).pow(3).mean((2, 3)).pow(1 / 3)
    np.testing.assert_allclose(results["gem"], gem.numpy(), rtol=1e-4, atol=1e-5)


def test_mask_weights_are_area_fractions():
    fe = PretrainedCNNFeatures(pooling="avg")
    fmap = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :3, :2] = 1.0  # cell (0,0) fully, cell (1,0) half covered
    got = fe._pool(fmap, mask)
    w = F.adaptive_avg_pool2d(mask, (4, 4))
    assert float(w[0, 0, 1, 0]) == 0.5
    assert float(got) == pytest.approx((0 * 1 + 4 * 0.5) / 1.5)


# --------------------------------------------------------------------------------------------
# volumes and intensity
# --------------------------------------------------------------------------------------------
def _volumes(n=3, d=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    V = rng.normal(0, 1, (n, d, size, size)).astype(np.float32)
    M = np.zeros(V.shape, dtype=bool)
    M[:, 2:5, 10:20, 8:22] = True
    return V, M


def test_2p5d_and_3d_shapes():
    V, M = _volumes()
    frame = make_image_frame(V, masks=M)
    ortho = PretrainedCNNFeatures(**FAST, mode="2.5d").fit(frame)
    assert ortho.transform(frame).shape == (3, 1280) and ortho.in_chans_ == 3
    adj = PretrainedCNNFeatures(**FAST, mode="2.5d", slices="adjacent", n_slices=5).fit(V)
    assert adj.in_chans_ == 5 and adj.transform(V).shape == (3, 1280)
    mean3d = PretrainedCNNFeatures(**FAST, mode="3d", cache=False).fit(frame)
    max3d = PretrainedCNNFeatures(**FAST, mode="3d", aggregate="max", cache=False).fit(frame)
    a, b = mean3d.transform(frame), max3d.transform(frame)
    assert a.shape == b.shape == (3, 1280)
    assert (b >= a - 1e-5).all() and not np.allclose(a, b)
    # 3d over the mask slices = mean of the per-slice 2d features
    kw = dict(FAST, cache=False, mask_pooling=False, intensity="none", precision="fp32")
    per_slice = PretrainedCNNFeatures(**kw).fit(V[0, 2:5]).transform(V[0, 2:5])
    flat = PretrainedCNNFeatures(**kw, mode="3d").fit(frame)
    idx = [idx for _, idx in flat._skrtl_iter_inputs(frame.iloc[:1])]
    assert np.concatenate(idx).tolist() == [0, 0, 0]
    np.testing.assert_allclose(flat.transform(frame)[0], per_slice.mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="volumes"):
        ortho.transform(V[:, 0])


def test_ct_windows_become_channels():
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1500, (4, 32, 32)).astype(np.int16)
    two = PretrainedCNNFeatures(**FAST, windows=[(40, 400), (-600, 1500)]).fit(ct)
    assert two.in_chans_ == 2 and two.transform(ct).shape == (4, 1280)
    w3 = [(40, 400), (-600, 1500), (400, 1800)]
    three = PretrainedCNNFeatures(**FAST, windows=w3, cache=False).fit(ct)
    rev = PretrainedCNNFeatures(**FAST, windows=w3[::-1], cache=False).fit(ct)
    assert three.in_chans_ == 3
    assert not np.allclose(three.transform(ct), rev.transform(ct))
    batches = list(three._skrtl_iter_inputs(ct))
    assert batches[0][0].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="windows"):
        PretrainedCNNFeatures(**FAST, intensity="window").fit(ct)
    with pytest.raises(ValueError, match="width > 0"):
        PretrainedCNNFeatures(**FAST, windows=[(40, 0)]).fit(ct)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def test_cache_hit_skips_the_network(count_forwards):
    clear_feature_cache()
    X, y = _blobs(8, seed=3)
    fe = PretrainedCNNFeatures(**FAST).fit(X)
    first = fe.transform(X)
    assert count_forwards["n"] == 8
    second = fe.transform(X[::-1])
    assert count_forwards["n"] == 8  # all from the cache
    np.testing.assert_array_equal(second, first[::-1])
    # a refitted clone (what GridSearchCV does) hits the cache too
    clone(fe).fit(X).transform(X[:4])
    assert count_forwards["n"] == 8
    # other preprocessing -> other key
    PretrainedCNNFeatures(**FAST, pooling="max").fit(X).transform(X[:2])
    assert count_forwards["n"] == 10
    nocache = PretrainedCNNFeatures(**FAST, cache=False).fit(X)
    nocache.transform(X[:3])
    nocache.transform(X[:3])
    assert count_forwards["n"] == 16
    info = feature_cache_info()
    assert info["entries"] >= 10 and info["hits"] >= 12


def test_grid_search_computes_each_image_once(count_forwards):
    clear_feature_cache()
    X, y = _blobs(10, seed=4)
    pipe = make_pipeline(PretrainedCNNFeatures(**FAST), LogisticRegression(max_iter=300))
    grid = GridSearchCV(pipe, {"logisticregression__C": [0.1, 1.0, 10.0]}, cv=2)
    grid.fit(X, y)
    assert count_forwards["n"] == 10


def test_invalidate_cache_after_bn_change(count_forwards):
    clear_feature_cache()
    X, _ = _blobs(4, seed=5)
    fe = PretrainedCNNFeatures(**FAST).fit(X)
    before = fe.transform(X)
    bn = next(m for m in fe._skrtl_torch_module().modules() if isinstance(m, torch.nn.BatchNorm2d))
    saved = bn.running_mean.clone()
    with torch.no_grad():
        bn.running_mean += 0.5
    fe._skrtl_invalidate_cache()
    after = fe.transform(X)
    assert count_forwards["n"] == 8
    assert not np.allclose(before, after)
    with torch.no_grad():
        bn.running_mean.copy_(saved)
    fe._skrtl_invalidate_cache()
    np.testing.assert_array_equal(fe.transform(X), before)  # original state: cached again
    assert count_forwards["n"] == 8


def test_cache_memory_bound():
    try:
        feature_cache_info(max_mb=0.01)  # ~2 feature vectors of 1280 floats
        X, _ = _blobs(4, seed=6)
        PretrainedCNNFeatures(**FAST).fit(X).transform(X)
        info = feature_cache_info()
        assert info["bytes"] <= info["max_bytes"] and info["entries"] <= 2
    finally:
        feature_cache_info(max_mb=512)


# --------------------------------------------------------------------------------------------
# precision, pickling, progress bar
# --------------------------------------------------------------------------------------------
def _smooth_images(n=6, size=20, seed=0):
    """Small grey-level images that the network sees upsampled (smooth), like MedMNIST."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8)


def _needs_bf16(precision="bf16"):
    try:
        PretrainedCNNFeatures(**FAST, precision=precision, cache=False).fit(_blobs(2)[0])
    except ValueError as exc:
        assert "not supported" in str(exc) and repr(precision) in str(exc)
        pytest.skip("no bfloat16 kernels on this machine")


def test_auto_precision_resolves_by_device():

    X, _ = _blobs(2)
    fe = PretrainedCNNFeatures(**FAST, cache=False).fit(X)
    expected = "mixed" if bf16_supported(torch.device("cpu")) else "fp32"
    assert fe.precision == "auto" and fe.precision_ == expected
    assert PretrainedCNNFeatures(**FAST, precision="fp32").fit(X).precision_ == "fp32"


def test_fp32_runner_equals_the_plain_network():
    """Static "same" padding, BatchNorm folding, ReLU6 fusion and micro-batches: same output."""
    from skrtl._backbone import load_backbone

    model = load_backbone()
    gen = torch.Generator().manual_seed(0)
    for size in ((64, 64), (47, 50)):  # even sizes: asymmetric TF padding; odd: symmetric
        x = torch.randn(11, 3, *size, generator=gen)
        runner = InferenceRunner(
            model,
            layer_modules=[""],
            in_chans=3,
            size=size,
            device=torch.device("cpu"),
            precision="fp32",
            compiled=False,
        )
        kinds = {type(m).__name__ for m in runner.net.modules()}
        assert "Conv2dSame" not in kinds and "BatchNormAct2d" not in kinds
        assert any(isinstance(m, ConvAct) for m in runner.net.modules())
        with torch.no_grad():
            ref = model.forward_features(x)
        got = runner(x)[0]
        assert runner.micro_batch is not None and x.shape[0] > runner.micro_batch
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the fused convs fall back to conv + clamp when gradients are wanted
    conv = next(m for m in runner.net.modules() if isinstance(m, ConvAct))
    h = torch.randn(2, conv.in_channels, 9, 9)
    with torch.no_grad():
        fused = conv(h)
    with torch.enable_grad():
        plain = conv(h)
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-5, atol=1e-5)


def test_mixed_precision_keeps_the_first_layers_in_fp32():
    _needs_bf16("mixed")
    X = _smooth_images()
    fe = PretrainedCNNFeatures(**FAST, precision="mixed", cache=False).fit(X)
    out = fe.transform(X)
    net = fe._get_fast().net
    assert net.conv_stem.weight.dtype == torch.float32
    assert net.blocks[0][0].conv_dw.weight.dtype == torch.float32
    assert net.blocks[1][0].conv_pw.weight.dtype == torch.bfloat16
    assert net.conv_head.weight.dtype == torch.bfloat16
    assert out.dtype == np.float32
    ref = PretrainedCNNFeatures(**FAST, precision="fp32", cache=False).fit(X).transform(X)
    assert 0 < np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.1


def test_mixed_precision_is_closer_to_fp32_than_pure_bf16():
    """Rounding the smooth first-block activations of upsampled images is what bf16 amplifies."""
    _needs_bf16()
    X = _smooth_images(size=16)
    kw = dict(FAST, input_size=96, cache=False)
    ref = PretrainedCNNFeatures(**kw, precision="fp32").fit(X).transform(X)
    rel = {}
    for precision in ("mixed", "bf16"):
        out = PretrainedCNNFeatures(**kw, precision=precision).fit(X).transform(X)
        rel[precision] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel["mixed"] < 0.7 * rel["bf16"], rel


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "mobilenetv3_small_100"])
def test_fast_runner_on_other_architectures(name):
    """fp32 equals the plain network; mixed casts only the deeper layers and stays close."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.forward_features(x)
    precisions = ["fp32"]

    if bf16_supported(torch.device("cpu")):
        precisions.append("mixed")
    for precision in precisions:
        runner = InferenceRunner(
            model,
            layer_modules=[""],
            in_chans=3,
            size=(64, 64),
            device=torch.device("cpu"),
            precision=precision,
            compiled=False,
        )
        out = runner(x)[0]
        rel = float((out - ref).norm() / ref.norm())
        dtypes = {p.dtype for p in runner.net.parameters()}
        if precision == "fp32":
            assert rel < 1e-5 and dtypes == {torch.float32}
        else:
            assert rel < 0.05 and dtypes == {torch.float32, torch.bfloat16}


def test_requested_conv_output_is_not_folded():
    """A conv asked for by name gives its own output, not the folded conv+BN+act one."""
    X, _ = _blobs(2)
    fe = PretrainedCNNFeatures(**FAST, layers=["conv_stem"], precision="fp32", cache=False)
    out = fe.fit(X).transform(X)
    model = fe._skrtl_torch_module()
    ((x, _),) = list(fe._skrtl_iter_inputs(X))
    with torch.no_grad():
        ref = model.conv_stem(x).mean((2, 3)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_pickle_roundtrip():
    X, _ = _blobs(3)
    fe = PretrainedCNNFeatures(**FAST, layers=[2, "final"], cache=False).fit(X)
    out = fe.transform(X)
    fe2 = pickle.loads(pickle.dumps(fe))
    np.testing.assert_array_equal(fe2.transform(X), out)


def test_progress_bar(capsys):
    X, _ = _blobs(3)
    PretrainedCNNFeatures(**FAST, verbose=1, cache=False).fit(X).transform(X)
    assert "img" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_bad_input_errors():
    X, _ = _blobs(3)
    fe = PretrainedCNNFeatures(**FAST).fit(X)
    bad = X.copy()
    bad[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        fe.transform(bad)
    bad[1, 3, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        fe.fit(bad)
    with pytest.raises(ValueError, match="feature matrix"):
        fe.transform(X.reshape(3, -1))
    with pytest.raises(ValueError, match="mask 0 has shape"):
        fe.transform(make_image_frame(X, masks=np.ones((3, 16, 16))))
    masks = np.ones((3, 32, 32))
    masks[2] = 0
    with pytest.raises(ValueError, match="mask 2 is empty"):
        fe.transform(make_image_frame(X, masks=masks))
    with pytest.raises(ValueError, match="spatial shape"):
        fe.transform(np.zeros((2, 5, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="spatial shape"):
        PretrainedCNNFeatures(**FAST).fit(np.zeros((2, 32, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="input_size=16 is smaller than the minimum 32"):
        PretrainedCNNFeatures(input_size=16).fit(X)
    with pytest.raises(ValueError, match="mode"):
        PretrainedCNNFeatures(mode="4d").fit(X)
    with pytest.raises(ValueError, match="not available"):
        if torch.cuda.is_available():
            raise ValueError("not available (skip on CUDA machines)")
        PretrainedCNNFeatures(**FAST, device="cuda").fit(X)
    rgb = np.random.default_rng(0).random((2, 32, 32, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="channels"):
        fe.transform(rgb)
    with pytest.raises(TypeError, match="numpy array of images"):
        fe.transform("images")


# --------------------------------------------------------------------------------------------
# sklearn API (the image input rules out sklearn's tabular-data checks; see tags)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "check",
    [
        ec.check_no_attributes_set_in_init,
        ec.check_estimator_cloneable,
        ec.check_estimator_repr,
        ec.check_mixin_order,
        ec.check_valid_tag_types,
        ec.check_parameters_default_constructible,
        ec.check_get_params_invariance,
        ec.check_set_params,
        ec.check_do_not_raise_errors_in_init_or_set_params,
        ec.check_estimators_unfitted,
    ],
    ids=lambda c: c.__name__,
)
def test_sklearn_api_checks(check):
    check("PretrainedCNNFeatures", PretrainedCNNFeatures(**FAST))


def test_sklearn_behaviour_on_images():
    X, _ = _blobs(6)
    fe = PretrainedCNNFeatures(**FAST, cache=False)
    params = fe.get_params()
    assert fe.fit(X) is fe
    assert fe.get_params() == params
    a = fe.transform(X)
    np.testing.assert_array_equal(clone(fe).fit(X).transform(X), a)  # idempotent
    np.testing.assert_allclose(fe.transform(X[[3, 1, 5]]), a[[3, 1, 5]], rtol=1e-5, atol=1e-6)
    tags = fe.__sklearn_tags__()
    assert not tags.input_tags.two_d_array and tags.input_tags.three_d_array
