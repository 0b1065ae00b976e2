"""The one preprocessing path: every torch estimator feeds the network identical inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skrtl import AdaBN, FineTuneClassifier, PretrainedCNNFeatures, make_image_frame
from skrtl._preprocess import resolve_intensity, scale_intensity


def _inputs(est, X):
    return torch.cat([x for x, _ in est._skrtl_iter_inputs(X)]), np.concatenate(
        [o for _, o in est._skrtl_iter_inputs(X)]
    )


@pytest.mark.parametrize(
    "mode, kwargs",
    [
        ("2d", {}),
        ("2d", {"intensity": "percentile", "percentiles": (2.0, 98.0)}),
        ("2.5d", {}),
        ("2.5d", {"slices": "adjacent", "n_slices": 3}),
        ("3d", {"windows": [(40.0, 400.0), (-600.0, 1500.0)]}),
    ],
)
def test_features_finetune_and_adabn_feed_identical_network_inputs(
    mode, kwargs, image_frame, volume_frame
):
    frame, y = image_frame if mode == "2d" else volume_frame
    if "windows" in kwargs:  # CT-like intensities for windows
        frame = frame.copy()
        frame["image"] = [np.asarray(v) * 300.0 for v in frame["image"]]
    common = dict(mode=mode, input_size=32, **kwargs)
    fe = PretrainedCNNFeatures(precision="fp32", **common).fit(frame)
    ft = FineTuneClassifier(
        max_epochs=1,
        batch_size=4,
        n_estimators=1,
        pretrained=False,
        validation_fraction=None,
        random_state=0,
        **common,
    ).fit(frame, y)
    assert fe.preprocessor_ == ft.preprocessor_
    x_fe, o_fe = _inputs(fe, frame)
    x_ft, o_ft = _inputs(ft, frame)
    torch.testing.assert_close(x_fe, x_ft, rtol=0, atol=0)
    np.testing.assert_array_equal(o_fe, o_ft)
    # AdaBN runs its statistics passes through the wrapped estimator's own inputs
    ada = AdaBN(PretrainedCNNFeatures(precision="fp32", **common), site_column=None).fit(frame)
    x_ada = torch.cat([x for x, _ in ada._batches(ada.estimator_, frame)])
    torch.testing.assert_close(x_ada, x_fe, rtol=0, atol=0)


def test_masks_reach_the_network_the_same_way(volume_frame):
    frame, _ = volume_frame
    fe = PretrainedCNNFeatures(mode="3d", input_size=32, precision="fp32").fit(frame)
    data = fe._read(frame)
    batches = list(fe.preprocessor_.iter_batches(data, range(len(data)), 64))
    (x, m, owners) = batches[0]
    assert m is not None and m.shape == (x.shape[0], 1, 32, 32)
    # 3-D mode takes the slices that hold the mask: two per volume here
    np.testing.assert_array_equal(owners, np.repeat(np.arange(len(frame)), 2))
    assert float(m.min()) >= 0 and float(m.max()) <= 1 and float(m.sum()) > 0


def test_auto_intensity_is_decided_by_the_raw_dtype_alone():
    assert resolve_intensity("auto", None, np.uint8) == "uint8"
    assert resolve_intensity("auto", None, bool) == "uint8"
    for dtype in (np.int16, np.uint16, np.float32, np.float64):
        assert resolve_intensity("auto", None, dtype) == "percentile"
    assert resolve_intensity("auto", [(40, 400)], np.uint8) == "window"
    # one negative int16 pixel does not flip the rule (it used to switch /255 <-> percentile)
    img = np.full((16, 16), 120, dtype=np.int16)
    img[0, 0] = -1
    a = scale_intensity(img)
    img[0, 0] = 0
    b = scale_intensity(img)
    assert abs(float(a.mean()) - float(b.mean())) < 0.05
    # uint8 images are divided by 255, whatever their range
    u = np.full((8, 8), 51, dtype=np.uint8)
    np.testing.assert_allclose(scale_intensity(u), 0.2, rtol=1e-6)


def test_grey_images_are_replicated_to_the_rgb_input_the_backbone_was_trained_on(images):
    X, _ = images
    fe = PretrainedCNNFeatures(input_size=32, precision="fp32").fit(X)
    x, _ = _inputs(fe, X)
    assert x.shape[1] == 3
    mean = torch.tensor(fe.preprocessor_.mean).view(1, 3, 1, 1)
    std = torch.tensor(fe.preprocessor_.std).view(1, 3, 1, 1)
    grey = x * std + mean  # undo the per-channel ImageNet normalisation
    torch.testing.assert_close(grey[:, 0], grey[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(grey[:, 1], grey[:, 2], atol=1e-5, rtol=0)


def test_mixed_image_sizes_in_one_batch(images):
    X, _ = images
    frame = make_image_frame([X[0], X[1][:24, :20], X[2]])
    fe = PretrainedCNNFeatures(input_size=32, precision="fp32", cache=False).fit(frame)
    together = fe.transform(frame)
    alone = np.vstack([fe.transform(frame.iloc[[i]]) for i in range(3)])
    # oneDNN picks its kernels by batch shape: equal up to float32 rounding
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=5e-5)
