"""Saliency maps (skrtl.explain): exactness of probe CAMs, geometry, networks, AdaBN, checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import blob_images, blob_volumes
from sklearn.feature_selection import VarianceThreshold
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from skrtl import (
    AdaBN,
    FineTuneClassifier,
    HistogramMatcher,
    LesionCropper,
    PretrainedCNNFeatures,
    SaliencyDisplay,
    explain,
    make_image_frame,
    randomization_test,
    randomized_copy,
    saliency_correlation,
)
from skrtl._explain_views import network_planes, plane_of, resize_map

SIZE = 48  # image side; the network input is 64 px: feature maps of 2 x 2 cells and more


@pytest.fixture(scope="module")
def frame():
    X, y, masks = blob_images(16, size=SIZE)
    return make_image_frame(
        X, masks=masks, spacing=(0.7, 0.7), sites=np.repeat(list("ABCD"), 4)
    ), y


@pytest.fixture(scope="module")
def volumes():
    vols, y, masks = blob_volumes(8, depth=6, size=SIZE)
    return make_image_frame(list(vols), masks=list(masks), spacing=(2.0, 0.7, 0.7)), y


@pytest.fixture(scope="module")
def finetuned(frame):
    X, y = frame
    clf = FineTuneClassifier(input_size=64, max_epochs=1, batch_size=8, n_estimators=2,
                             validation_fraction=None, random_state=0)  # fmt: skip
    return clf.fit(X, y)


def _probe(**kwargs):
    # torch, not the default OpenVINO: the GeM case needs near-constant features. torch leaves
    # rounding noise (~1e-14) in the channels that are 0 everywhere, which StandardScaler then
    # amplifies; OpenVINO's AVX-512 kernels give those exact constants, which it leaves alone
    cnn = PretrainedCNNFeatures(input_size=64, precision="fp32", backend="torch", **kwargs)
    return make_pipeline(cnn, StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


def _signed_decision(pipe, X, targets):
    """The pipeline's decision function for ``targets``, on float64 features.

    (A StandardScaler dividing float32 features by a near-zero scale amplifies their rounding:
    the maps are exact in float64 arithmetic.)
    """
    k = next(
        i for i, (_, s) in enumerate(pipe.steps) if isinstance(s, (AdaBN, PretrainedCNNFeatures))
    )
    feats = np.asarray(pipe[: k + 1].transform(X), dtype=np.float64)
    dec = pipe[k + 1 :].decision_function(feats)
    return np.where(np.asarray(targets) == pipe.classes_[1], dec, -dec)


# --------------------------------------------------------------------------------------------
# linear probes: the class activation map is an exact decomposition of the decision function
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["avg", "max", "gem", "avgmax"])
def test_probe_cam_sums_to_the_decision_function(frame, pooling):
    X, y = frame
    pipe = _probe(pooling=pooling, layers=[5, "final"])
    if pooling == "gem":  # channels that are 0 everywhere pool to the constant clamp 1e-6
        pipe.fit(X, y)
        with pytest.warns(UserWarning, match="float32 rounding of its features"):
            explain(pipe, X.iloc[:4])
        # the advice of the warning: drop the (near-)constant features before the scaler
        pipe.steps.insert(1, ("variance", VarianceThreshold(1e-12)))
    pipe.fit(X, y)
    maps = explain(pipe, X.iloc[:4])
    assert maps.method == "cam" and maps.layer == ["l5", "l9"] and maps.signed
    expected = _signed_decision(pipe, X.iloc[:4], maps.targets)
    np.testing.assert_allclose(maps.scores, expected, rtol=1e-5, atol=1e-5)
    # the maps add up to decision_function - intercept: nothing is lost or invented
    np.testing.assert_allclose(maps.total() + maps.offsets, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(maps.predictions, pipe.predict(X.iloc[:4]))
    assert [m.shape for m in maps.maps] == [(SIZE, SIZE)] * 4


def test_probe_cam_of_average_pooling_is_the_contribution_of_each_layer(frame):
    X, y = frame
    pipe = _probe(layers=[5, "final"]).fit(X, y)
    both = explain(pipe, X.iloc[:3], target=1)
    deep = explain(pipe, X.iloc[:3], target=1, layer="l9")
    shallow = explain(pipe, X.iloc[:3], target=1, layer=5)
    assert deep.layer == ["l9"] and shallow.layer == ["l5"]
    np.testing.assert_allclose(deep.total() + shallow.total(), both.total(), rtol=1e-6)
    for d, s, b in zip(deep.maps, shallow.maps, both.maps):
        np.testing.assert_allclose(d + s, b, rtol=1e-6, atol=1e-9)
    # the part of a layer left out of the map moves into the offset
    np.testing.assert_allclose(deep.total() + deep.offsets, both.scores, rtol=1e-4, atol=1e-4)
    # the first class's evidence is the negative of the second's
    first = explain(pipe, X.iloc[:3], target=0)
    np.testing.assert_allclose(first.maps[0], -both.maps[0], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="not one of the feature layers"):
        explain(pipe, X.iloc[:3], layer=7)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"mode": "2.5d"}, ["axial z=2", "coronal y=14", "sagittal x=14"]),
        ({"mode": "2.5d", "slices": "adjacent"}, ["axial z=2"]),
        ({"mode": "3d"}, ["axial z=2", "axial z=3"]),
        ({"mode": "3d", "aggregate": "max"}, ["axial z=2", "axial z=3"]),
    ],
)
def test_probe_cam_of_volumes(volumes, kwargs, names):
    X, y = volumes
    pipe = make_pipeline(
        PretrainedCNNFeatures(input_size=64, precision="fp32", **kwargs),
        LogisticRegression(max_iter=2000),
    ).fit(X, y)
    maps = explain(pipe, X.iloc[:2])
    assert [v.name for v in maps.views[0]] == names
    expected = _signed_decision(pipe, X.iloc[:2], maps.targets)
    np.testing.assert_allclose(maps.total() + maps.offsets, expected, rtol=1e-4, atol=1e-4)
    vol = maps.maps[0]
    assert vol.shape == (6, SIZE, SIZE)
    assert np.isfinite(vol[2]).all() and np.isnan(vol[0, 0, 0])  # off-plane: nothing seen
    if len(names) == 3:  # the three planes carry the same density of the one network map
        dens = [float(np.abs(v.saliency).mean()) for v in maps.views[0]]
        assert max(dens) < 3 * min(dens)


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "2d"}, {"mode": "2.5d"}, {"mode": "2.5d", "slices": "adjacent"}, {"mode": "3d"}],
)
def test_planes_are_where_the_preprocessing_takes_the_network_images(frame, volumes, kwargs):
    X, _ = frame if kwargs["mode"] == "2d" else volumes
    est = PretrainedCNNFeatures(input_size=64, precision="fp32", **kwargs).fit(X)
    pre = est.preprocessor_
    for i in range(2):
        image = np.asarray(X["image"].iat[i])
        mask = np.asarray(X["mask"].iat[i], dtype=bool)
        images, _ = pre.network_images(image, mask)
        shape = image.shape[:2] if kwargs["mode"] == "2d" else image.shape
        planes = network_planes(pre, shape, mask)
        assert len(planes) == len(images)
        scaled = pre.scale(image)[..., 0]
        for net_image, img_planes in zip(images, planes):
            for k, plane in enumerate(img_planes):
                channel = k if len(img_planes) == 3 else net_image.shape[-1] // 2
                got = resize_map(plane_of(scaled, plane), net_image.shape[:2])
                np.testing.assert_allclose(got, net_image[..., channel], atol=1e-5)


def test_resize_map_keeps_the_sum_of_additive_maps():
    rng = np.random.default_rng(0)
    cells = rng.normal(size=(3, 2))
    for shape in [(48, 48), (7, 31), (3, 2), (2, 1)]:
        up = resize_map(cells, shape, preserve_sum=True)
        assert up.shape == shape
        np.testing.assert_allclose(up.sum(), cells.sum(), rtol=1e-12)
    smooth = resize_map(cells, (6, 4))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(cells)[None, None], size=(6, 4), mode="bilinear", align_corners=False
    )[0, 0]
    np.testing.assert_allclose(smooth, ref.numpy(), rtol=1e-12)


def test_probe_pipeline_with_image_steps_and_lesion_crops(frame):
    X, y = frame
    pipe = make_pipeline(HistogramMatcher(level="image"), *[s for _, s in _probe().steps])
    pipe.fit(X, y)
    maps = explain(pipe, X.iloc[:3])
    expected = _signed_decision(pipe, X.iloc[:3], maps.targets)
    np.testing.assert_allclose(maps.total() + maps.offsets, expected, rtol=1e-4, atol=1e-4)
    # maps lie on the grid of the images the CNN step receives: here the lesion crops
    crop = LesionCropper(mode="2d", margin_mm=3.0)
    cropped = make_pipeline(crop, *[s for _, s in _probe().steps])
    cropped.fit(X, y)
    crops = cropped[0].transform(X.iloc[:2])
    maps = explain(cropped, X.iloc[:2])
    assert [m.shape for m in maps.maps] == [np.asarray(im).shape for im in crops["image"]]
    assert maps.maps[0].shape != (SIZE, SIZE)


# --------------------------------------------------------------------------------------------
# fine-tuned networks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_gradcam_of_a_finetuned_ensemble(finetuned, frame, method):
    X, _ = frame
    before = {k: v.clone() for k, v in finetuned.net_.module_.state_dict().items()}
    grads = [
        None if p.grad is None else p.grad.clone() for p in finetuned.net_.module_.parameters()
    ]
    maps = explain(finetuned, X.iloc[:3], method=method)
    assert maps.layer == "head" and not maps.signed
    assert [m.shape for m in maps.maps] == [(SIZE, SIZE)] * 3
    assert all(0.0 <= float(m.min()) and float(m.max()) <= 1.0 + 1e-6 for m in maps.maps)
    proba = finetuned.predict_proba(X.iloc[:3])
    np.testing.assert_array_equal(maps.targets, finetuned.classes_[proba.argmax(1)])
    np.testing.assert_allclose(maps.scores, proba.max(1), rtol=1e-6)
    # the estimator is untouched: same weights and state, no gradient added
    after = finetuned.net_.module_.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for g, p in zip(grads, finetuned.net_.module_.parameters()):
        assert (p.grad is None) if g is None else torch.equal(g, p.grad)


def test_ensembles_average_member_maps_and_tta_averages_the_mirror_image(finetuned, frame):
    X, _ = frame
    rows = X.iloc[:2]
    full = explain(finetuned, rows, target=1)
    singles = []
    for net in finetuned.nets_:
        member = finetuned._skrtl_network_copy()
        member.nets_, member.net_ = [net], net
        singles.append(explain(member, rows, target=1))
    for i in range(2):
        mean = np.mean([s.maps[i] for s in singles], axis=0)
        np.testing.assert_allclose(full.maps[i], mean, atol=1e-5)
    # TTA: the map of the mirror image, mirrored back, is averaged in
    plain = explain(finetuned, rows, target=1, tta=False)
    mirrored = make_image_frame([np.asarray(im)[:, ::-1] for im in rows["image"]])
    flip = explain(finetuned, mirrored, target=1, tta=False)
    for i in range(2):
        both = 0.5 * (plain.maps[i] + flip.maps[i][:, ::-1])
        np.testing.assert_allclose(full.maps[i], both, atol=2e-3)


def test_network_inputs_are_the_estimators_own(finetuned, frame, monkeypatch):
    from skrtl import _explain

    X, _ = frame
    seen = {}
    real = _explain.network_saliency

    def spy(members, x, targets, **kwargs):
        seen["x"] = x.clone()
        return real(members, x, targets, **kwargs)

    monkeypatch.setattr(_explain, "network_saliency", spy)
    explain(finetuned, X.iloc[:3])
    own = torch.cat([x for x, _ in finetuned._skrtl_iter_inputs(X.iloc[:3])])
    torch.testing.assert_close(seen["x"], own, rtol=0, atol=0)


def test_gradient_free_methods(finetuned, frame):
    X, _ = frame
    occ = explain(finetuned, X.iloc[:2], method="occlusion", tta=False, occlusion_window=16)
    assert occ.signed and occ.layer == "input" and occ.maps[0].shape == (SIZE, SIZE)
    assert np.isfinite(occ.maps[0]).all() and np.ptp(occ.maps[0]) > 0
    one = finetuned._skrtl_network_copy()
    one.nets_, one.net_ = one.nets_[:1], one.nets_[0]
    score = explain(one, X.iloc[:1], method="scorecam", layer=3, tta=False)  # 24 channels
    assert score.layer == "blocks.1" and score.maps[0].shape == (SIZE, SIZE)
    assert 0.0 <= float(score.maps[0].min()) and float(score.maps[0].max()) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="takes no layer"):
        explain(finetuned, X.iloc[:1], method="occlusion", layer=3)
    with pytest.raises(ValueError, match="has no spatial output"):
        explain(finetuned, X.iloc[:1], layer="classifier")
    with pytest.raises(ValueError, match="is neither None"):
        explain(finetuned, X.iloc[:1], layer="nope")


def test_volumes_through_a_finetuned_network(volumes):
    X, y = volumes
    clf = FineTuneClassifier(mode="3d", input_size=64, max_epochs=1, batch_size=8,
                             n_estimators=1, validation_fraction=None, random_state=0)  # fmt: skip
    clf.fit(X, y)
    maps = explain(clf, X.iloc[:2])
    assert [v.name for v in maps.views[0]] == ["axial z=2", "axial z=3"]
    assert maps.maps[0].shape == (6, SIZE, SIZE)
    disp = maps.plot(max_views=2)
    assert len(disp.overlays_) == 4 and disp.figure_ is not None


# --------------------------------------------------------------------------------------------
# AdaBN: every row is explained by the copy holding its site's statistics
# --------------------------------------------------------------------------------------------
def test_adabn_finetuned_rows_use_their_site_copy(frame):
    X, y = frame
    clf = FineTuneClassifier(input_size=64, max_epochs=1, batch_size=8, n_estimators=1,
                             validation_fraction=None, tta=False, random_state=0)  # fmt: skip
    ada = AdaBN(clf, source_stats="keep").fit(X.iloc[:8], y[:8])
    with pytest.warns(UserWarning):  # few images per site
        ada.adapt(X.iloc[8:])
    rows = X.iloc[[0, 9, 13]]
    maps = explain(ada, rows)
    assert list(maps.sites) == ["__source__", "C", "D"]
    proba = ada.predict_proba(rows)
    np.testing.assert_allclose(maps.scores, proba.max(1), rtol=1e-6)
    groups = {site: est for site, est, _ in ada.site_estimators(rows)}
    own = explain(groups["C"], rows.iloc[[1]])
    np.testing.assert_allclose(maps.maps[1], own.maps[0], atol=1e-6)
    source = explain(ada.estimator_, rows.iloc[[1]])  # the source statistics map differently
    assert not np.allclose(maps.maps[1], source.maps[0], atol=1e-4)


def test_adabn_probe_pipeline_is_exact_per_site(frame):
    X, y = frame
    pipe = make_pipeline(
        AdaBN(PretrainedCNNFeatures(input_size=64, precision="fp32"), unseen="reference"),
        StandardScaler(),
        LogisticRegression(C=0.1, max_iter=2000),
    )
    with pytest.warns(UserWarning):
        pipe.fit(X.iloc[:8], y[:8], adabn__X_target=X.iloc[8:])
    maps = explain(pipe, X.iloc[6:12])
    assert set(maps.sites) == {"__source__", "C"}
    expected = _signed_decision(pipe, X.iloc[6:12], maps.targets)
    np.testing.assert_allclose(maps.total() + maps.offsets, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# sanity checks and the display
# --------------------------------------------------------------------------------------------
def test_model_randomization_changes_the_maps(frame):
    X, y = frame
    pipe = _probe().fit(X, y)
    coef = pipe[-1].coef_.copy()
    result = randomization_test(pipe, X.iloc[:6], n_layers=2)
    assert result.layers == ["probe", "head"]
    assert result.randomized == [["probe"], ["probe", "head"]]
    assert result.correlations.shape == (2, 6)
    np.testing.assert_array_equal(pipe[-1].coef_, coef)  # the fitted pipeline is unchanged
    np.testing.assert_allclose(saliency_correlation(result.trained, result.trained), 1.0)
    table = result.summary()
    assert list(table["layer"]) == ["probe", "head"]
    # random probe coefficients: the maps keep (almost) none of the trained ranking
    assert abs(table["spearman_median"].iloc[0]) < 0.6
    assert result.plot() is not None
    independent = randomization_test(pipe, X.iloc[:2], n_layers=2, cascade=False)
    assert independent.randomized == [["probe"], ["head"]]


def test_randomized_copy_of_a_finetuned_network(finetuned, frame):
    X, _ = frame
    rand = randomized_copy(finetuned, ["classifier", "head"], random_state=0)
    w0 = finetuned.net_.module_.model.classifier.weight
    w1 = rand.net_.module_.model.classifier.weight
    assert not torch.equal(w0, w1)
    assert torch.equal(  # layers below are shared weights, unchanged
        finetuned.net_.module_.model.conv_stem.weight, rand.net_.module_.model.conv_stem.weight
    )
    # without images the re-initialised BatchNorm has PyTorch's initial statistics; with
    # images they are re-estimated there, and the layers below keep their own
    bn2 = rand.net_.module_.model.bn2
    assert torch.equal(bn2.running_var, torch.ones_like(bn2.running_var))
    refit = randomized_copy(finetuned, ["classifier", "head"], X=X.iloc[:6], random_state=0)
    assert not torch.equal(refit.net_.module_.model.bn2.running_var, bn2.running_var)
    below = finetuned.net_.module_.model.blocks[6][0].bn1
    assert torch.equal(refit.net_.module_.model.blocks[6][0].bn1.running_mean, below.running_mean)
    with pytest.raises(ValueError, match="not transfer layers"):
        randomized_copy(finetuned, ["nope"])


def test_mask_share_and_fraction(frame):
    X, y = frame
    pipe = _probe().fit(X, y)
    maps = explain(pipe, X.iloc[:2])
    view = maps.views[0][0]
    view.saliency = np.where(view.mask, 1.0, 0.0)  # all evidence inside the mask
    assert maps.mask_share()[0] == 1.0
    np.testing.assert_allclose(maps.mask_fraction()[0], view.mask.mean())
    view.saliency = np.where(view.mask, -1.0, 1.0)
    assert maps.mask_share()[0] == 0.0 and maps.mask_share(part="absolute")[0] < 1.0
    frame_out = maps.to_frame()
    assert list(frame_out.columns) == ["target", "prediction", "score", "mask_share",
                                       "mask_fraction"]  # fmt: skip


def test_display(finetuned, frame):
    X, _ = frame
    disp = SaliencyDisplay.from_estimator(finetuned, X.iloc[:5], samples=[0, 2, 4])
    assert len(disp.overlays_) == 3 and disp.axes_.shape == (1, 3)
    assert disp.axes_[0, 0].get_title().startswith("0\ntarget")
    with pytest.raises(ValueError, match="samples must be positions"):
        SaliencyDisplay(maps=disp.maps, samples=[7])


def test_errors(frame, finetuned):
    X, y = frame
    cnn = PretrainedCNNFeatures(input_size=64, precision="fp32").fit(X)
    with pytest.raises(TypeError, match="alone has no prediction"):
        explain(cnn, X.iloc[:2])
    with pytest.raises(TypeError, match="ends with PretrainedCNNFeatures"):
        explain(make_pipeline(cnn), X)
    with pytest.raises(TypeError, match="needs a fitted FineTuneClassifier"):
        explain(LogisticRegression(), X)
    tanh = make_pipeline(
        PretrainedCNNFeatures(input_size=64, precision="fp32"),
        FunctionTransformer(np.tanh),
        LogisticRegression(max_iter=500),
    ).fit(X, y)
    with pytest.raises(ValueError, match="is not an affine map"):
        explain(tanh, X.iloc[:3])
    with pytest.raises(ValueError, match="method='cam'"):
        explain(_probe().fit(X, y), X.iloc[:2], method="gradcam")
    with pytest.raises(ValueError, match="linear probe"):
        explain(finetuned, X.iloc[:2], method="cam")
    with pytest.raises(ValueError, match="not a class"):
        explain(finetuned, X.iloc[:2], target="malignant")
    with pytest.raises(ValueError, match="only used with an AdaBN"):
        explain(finetuned, X.iloc[:2], sample_domain=["A", "A"])
    with pytest.raises(ValueError, match="method must be one of"):
        explain(finetuned, X.iloc[:2], method="lime")
    passthrough = make_pipeline(
        PretrainedCNNFeatures(input_size=64, precision="fp32", passthrough="age"),
        LogisticRegression(max_iter=500),
    )
    Xa = X.assign(age=np.arange(len(X), dtype=float))
    passthrough.fit(Xa, y)
    with pytest.raises(ValueError, match="passthrough"):
        explain(passthrough, Xa.iloc[:2])
    assert isinstance(explain(finetuned, X.iloc[:2]).to_frame(), pd.DataFrame)
