"""Tests of FineTuneClassifier (skorch fine-tuning with freeze depth and layer-wise rates).

Everything runs on the embedded tf_efficientnet_lite0 at 32 px with a few images and 1-2
epochs; ``pretrained=False`` gives random weights where pretrained ones are not needed.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import square_images
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.utils._param_validation import InvalidParameterError
from skorch.callbacks import Callback

import skrtl._finetune as ft
from skrtl._backbone import get_transfer_layers, load_backbone
from skrtl._callbacks import WarmupCosine
from skrtl._finetune import FineTuneClassifier
from skrtl._imaging import make_image_frame

SIZE = 32


_data = square_images


def _clf(**kw):
    params = dict(input_size=SIZE, max_epochs=1, batch_size=8, n_estimators=1, random_state=0)
    params.update(kw)
    return FineTuneClassifier(**params)


@pytest.fixture(scope="module")
def pretrained_state():
    model = load_backbone(in_chans=3)  # grey images are replicated to the RGB channels
    return {k: v.clone() for k, v in model.state_dict().items()}


class StateRecorder(Callback):
    """Records the network weights at the start of training and at each epoch end."""

    def __init__(self):
        self.start_ = None
        self.epochs_ = []
        self.history_keys_ = []

    def on_train_begin(self, net, **kwargs):
        self.start_ = {k: v.detach().clone() for k, v in net.module_.model.state_dict().items()}

    def on_epoch_end(self, net, **kwargs):
        self.history_keys_.append(set(net.history[-1].keys()))
        self.epochs_.append(
            {k: v.detach().clone() for k, v in net.module_.model.state_dict().items()}
        )


def _same_backbone(state, ref):
    keys = [k for k in ref if not k.startswith("classifier.")]
    return all(torch.equal(state[k], ref[k]) for k in keys)


# --------------------------------------------------------------------------------------------
def test_fit_predict_binary_history():
    X, y = _data()
    y_named = np.where(y == 1, "malignant", "benign")
    clf = _clf(max_epochs=2, validation_fraction=0.25).fit(X, y_named)
    assert list(clf.classes_) == ["benign", "malignant"]
    assert clf.n_layers_ == 10 and clf.layer_names_[-1] == "classifier"
    proba = clf.predict_proba(X)
    assert proba.shape == (16, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert set(clf.predict(X)) <= {"benign", "malignant"}
    assert clf.decision_function(X).shape == (16,)
    assert len(clf.history_) == 2
    for i, row in enumerate(clf.history_, start=1):
        assert row["epoch"] == i
        assert {"train_loss", "valid_loss", "valid_auc"} <= set(row)
        assert np.isfinite(row["train_loss"]) and np.isfinite(row["valid_loss"])


def test_multiclass_head_and_valid_acc():
    X, y = _data(n=18, n_classes=3)
    clf = _clf(pretrained=False, validation_fraction=0.34).fit(X, y)
    assert clf.net_.module_.model.get_classifier().out_features == 3
    assert clf.predict_proba(X).shape == (18, 3)
    assert "valid_acc" in clf.history_[0] and "valid_auc" not in clf.history_[0]
    assert 0.0 <= clf.score(X, y) <= 1.0


def test_layerwise_learning_rates_are_optimizer_param_groups():
    X, y = _data()
    clf = _clf(freeze_depth=3, gamma=0.5, lr=1e-2, lr_schedule="constant").fit(X, y)
    L = clf.n_layers_
    groups = clf.net_.optimizer_.param_groups
    assert [g["layer"] for g in groups] == list(range(4, L + 1))
    for g in groups:
        assert g["lr"] == pytest.approx(1e-2 * 0.5 ** (L - g["layer"]))
    # the optimizer holds exactly the trainable parameters, and frozen layers are not trainable
    in_opt = {id(p) for g in groups for p in g["params"]}
    layers = get_transfer_layers(clf.net_.module_.model)
    params = dict(clf.net_.module_.model.named_parameters())
    for layer in layers:
        for name in layer.param_names:
            trainable = layer.index > 3
            assert params[name].requires_grad is trainable
            assert (id(params[name]) in in_opt) is trainable
    assert clf.layer_lrs_ == {g["layer"]: g["lr"] for g in groups}


def test_cosine_schedule_keeps_layer_ratios():
    X, y = _data()
    clf = _clf(freeze_depth=5, gamma=0.5, max_epochs=2, lr_schedule="cosine").fit(X, y)
    groups = clf.net_.optimizer_.param_groups
    top = groups[-1]
    assert top["lr"] < top["initial_lr"]  # annealed
    for g in groups:
        assert g["initial_lr"] / top["initial_lr"] == pytest.approx(
            0.5 ** (clf.n_layers_ - g["layer"])
        )


class LrRecorder(Callback):
    """Records the learning rate of the top group at every training batch."""

    def __init__(self):
        self.lrs_ = []

    def on_batch_begin(self, net, batch=None, training=False, **kwargs):
        if training:
            self.lrs_.append(net.optimizer_.param_groups[-1]["lr"])


def test_warmup_cosine_schedule_warms_up_over_the_first_epoch_then_anneals():
    schedule = WarmupCosine(4, 12)
    np.testing.assert_allclose([schedule(i) for i in range(4)], [0.25, 0.5, 0.75, 1.0])
    assert schedule(8) == pytest.approx(0.5) and schedule(12) == 0.0 and schedule(20) == 0.0
    X, y = _data()  # 24 images: 18 train rows, 3 batches of 8 (the last one of 2)
    rec = LrRecorder()
    clf = _clf(
        freeze_depth=5,
        gamma=0.5,
        max_epochs=3,
        lr=1e-2,
        lr_schedule="warmup_cosine",
        early_stopping=False,
        validation_fraction=0.25,
        callbacks=[("rec", rec)],
    ).fit(X, y)
    steps = len(rec.lrs_) // 3
    assert len(rec.lrs_) == 3 * steps and steps >= 2
    top = clf.net_.optimizer_.param_groups[-1]["initial_lr"]
    expected = [top * WarmupCosine(steps, 3 * steps)(i) for i in range(3 * steps)]
    np.testing.assert_allclose(rec.lrs_, expected, rtol=1e-6)
    assert clf.net_.optimizer_.param_groups[-1]["lr"] == 0.0  # annealed to zero at the end
    for g in clf.net_.optimizer_.param_groups:  # every group scaled alike: the ratios stay
        assert g["initial_lr"] / top == pytest.approx(0.5 ** (clf.n_layers_ - g["layer"]))


def test_frozen_layers_keep_weights_and_batchnorm_statistics(pretrained_state):
    X, y = _data()
    k = 3
    # augment=True: no prefix caching, the frozen layers run in every training step
    clf = _clf(freeze_depth=k, augment=True, max_epochs=2, lr=1e-2).fit(X, y)
    assert clf.cached_prefix_ == 0
    model = clf.net_.module_.model
    layers = get_transfer_layers(model)
    state = model.state_dict()
    frozen_bn = changed_bn = 0
    for layer in layers[:-1]:
        for mname in layer.module_names:
            mod = model.get_submodule(mname)
            if not isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                continue
            key = f"{mname}.running_mean"
            same = torch.equal(state[key], pretrained_state[key])
            if layer.index <= k:
                assert same, f"BatchNorm {mname} of frozen layer {layer.index} changed"
                assert torch.equal(state[f"{mname}.weight"], pretrained_state[f"{mname}.weight"])
                frozen_bn += 1
            else:
                changed_bn += not same
    assert frozen_bn >= 3 and changed_bn >= 3
    # the FreezeBatchNorm callback puts frozen BatchNorm layers in eval mode whenever the
    # network trains (skorch switches everything to train mode before each batch)
    callback = dict(clf.net_.callbacks_)["skrtl_freeze_bn"]
    callback.on_train_begin(clf.net_)
    clf.net_.module_.train()
    first_bn = model.get_submodule(layers[0].module_names[-1])
    with torch.no_grad():
        clf.net_.module_(torch.zeros(2, 3, SIZE, SIZE))
    assert not first_bn.training
    assert model.get_submodule(layers[k].module_names[-1]).training
    callback.on_train_end(clf.net_)
    assert callback.handles_ == []
    clf.net_.module_.eval()


def test_linear_probe_trains_only_the_head(pretrained_state):
    X, y = _data()
    clf = _clf(strategy="linear_probe", max_epochs=2, lr=1e-2).fit(X, y)
    assert clf.freeze_depth_ == clf.n_layers_ - 1
    assert [g["layer"] for g in clf.net_.optimizer_.param_groups] == [clf.n_layers_]
    state = clf.net_.module_.model.state_dict()
    assert _same_backbone(state, pretrained_state)
    assert not torch.all(state["classifier.weight"] == 0)  # the head learned


def test_prefix_caching_matches_uncached_training(monkeypatch):
    X, y = _data()
    kw = dict(freeze_depth=4, augment=False, max_epochs=2, validation_fraction=0.25)
    cached = _clf(**kw).fit(X, y)
    assert cached.cached_prefix_ >= 3  # stem + blocks.0..
    monkeypatch.setattr(ft, "_MAX_CACHE_BYTES", 0)
    plain = _clf(**kw).fit(X, y)
    assert plain.cached_prefix_ == 0
    # float rounding of the frozen layers differs with the batch composition (and with the
    # CPU's kernels: 1.1e-4 on an AVX2-only CPU); Adam turns that into small weight
    # differences, so probabilities and losses agree to rounding, not bit for bit
    np.testing.assert_allclose(cached.predict_proba(X), plain.predict_proba(X), atol=5e-4)
    for a, b in zip(cached.history_, plain.history_):
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], abs=5e-4)
    # after fit the module takes images again
    assert cached.net_.module_.start == 0


def test_every_fit_starts_from_pretrained_weights(pretrained_state):
    X, y = _data()
    rec = StateRecorder()
    clf = _clf(freeze_depth=0, lr=1e-2, callbacks=[("rec", rec)])
    clf.fit(X, y)
    assert _same_backbone(rec.start_, pretrained_state)
    assert not _same_backbone(clf.net_.module_.model.state_dict(), pretrained_state)
    clf.fit(X, y)  # refit: fresh pretrained start, not a warm start
    assert _same_backbone(dict(clf.net_.callbacks_)["rec"].start_, pretrained_state)
    clone_rec = StateRecorder()
    cl = clone(clf).set_params(callbacks=[("rec", clone_rec)]).fit(X, y)
    assert _same_backbone(clone_rec.start_, pretrained_state)
    assert not hasattr(clone(cl), "net_")


def test_scratch_starts_from_random_weights(pretrained_state):
    X, y = _data()
    rec = StateRecorder()
    clf = _clf(strategy="scratch", callbacks=[("rec", rec)]).fit(X, y)
    assert clf.freeze_depth_ == 0
    assert not torch.equal(rec.start_["conv_stem.weight"], pretrained_state["conv_stem.weight"])
    lrs = {g["initial_lr"] for g in clf.net_.optimizer_.param_groups}
    assert all(v == pytest.approx(1e-3) for v in lrs)  # one rate for all layers (no gamma)
    assert len(clf.net_.optimizer_.param_groups) == clf.n_layers_


def test_gridsearch_over_freeze_depth():
    X, y = _data()
    grid = GridSearchCV(
        _clf(augment=False, validation_fraction=None), {"freeze_depth": [2, 8]}, cv=2
    )
    grid.fit(X, y)
    assert grid.best_params_["freeze_depth"] in (2, 8)
    assert np.all(np.isfinite(grid.cv_results_["mean_test_score"]))
    assert grid.best_estimator_.freeze_depth_ == grid.best_params_["freeze_depth"]


def test_random_state_reproducible():
    X, y = _data()
    a = _clf(max_epochs=2, augment=True, validation_fraction=0.25).fit(X, y)
    b = _clf(max_epochs=2, augment=True, validation_fraction=0.25).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert a.history_[-1]["train_loss"] == b.history_[-1]["train_loss"]
    c = _clf(max_epochs=2, augment=True, validation_fraction=0.25, random_state=1).fit(X, y)
    assert not np.array_equal(a.predict_proba(X), c.predict_proba(X))
    # the global torch RNG is untouched by fit
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _clf(strategy="linear_probe", augment=False).fit(X, y)
    assert torch.equal(torch.rand(3), expected)


def test_first_fit_in_a_process_is_reproducible():
    """Loading the pretrained weights (first fit only) must not shift the seeded RNG stream."""
    import skrtl._backbone as backbone

    X, y = _data()
    backbone._MODEL_CACHE.clear()
    a = _clf(validation_fraction=None).fit(X, y)  # loads the backbone inside fit
    b = _clf(validation_fraction=None).fit(X, y)  # backbone already cached
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


def _member_proba(clf, X, flip=False):
    x = torch.cat([b for b, _ in clf._skrtl_iter_inputs(X)])
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        return np.mean([torch.softmax(n.module_(x), 1).numpy() for n in clf.nets_], axis=0)


def test_ensemble_averages_cross_fitted_members():
    X, y = _data(n=24)
    clf = _clf(n_estimators=3, validation_fraction=0.25, max_epochs=2, tta=False).fit(X, y)
    assert len(clf.nets_) == 3 and clf.nets_[0] is clf.net_
    assert len(clf.histories_) == 3 and clf.histories_[0] == clf.history_
    assert len(clf.best_epochs_) == 3 and clf.best_epochs_[0] == clf.best_epoch_
    # every member is a separately trained network
    heads = [n.module_.model.get_classifier().weight for n in clf.nets_]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    np.testing.assert_allclose(clf.predict_proba(X), _member_proba(clf, X), atol=1e-6)
    # the members' validation sets are disjoint stratified folds: together they cover
    # 3 of the 4 folds of 24 images = 18 images, 6 per member (3 per class)
    val_sets = [n.train_split.keywords["valid_ds"] for n in clf.nets_]
    val_sizes = {len(v) for v in val_sets}
    assert val_sizes == {6}
    val_x = torch.cat([v.X for v in val_sets])
    assert len(torch.unique(val_x.flatten(1), dim=0)) == 18
    # AdaBN sees all members through one module
    module = clf._skrtl_torch_module()
    assert [m for m in module.members] == [n.module_ for n in clf.nets_]


def test_tta_averages_the_mirror_image():
    X, y = _data()
    X[:, :, :8] += 0.5  # left-right asymmetric images
    clf = _clf(tta=True).fit(X, y)
    expected = (_member_proba(clf, X) + _member_proba(clf, X, flip=True)) / 2
    np.testing.assert_allclose(clf.predict_proba(X), expected, atol=1e-6)
    clf.set_params(tta=False)
    np.testing.assert_allclose(clf.predict_proba(X), _member_proba(clf, X), atol=1e-6)
    assert not np.allclose(expected, _member_proba(clf, X), atol=1e-6)


def test_small_classes_fall_back_to_random_member_splits():
    X, y = _data(n=12)  # 6 per class: fewer than the 7 folds of validation_fraction=0.15
    clf = _clf(n_estimators=2).fit(X, y)
    assert all("valid_loss" in h[0] for h in clf.histories_)


def test_pickle_roundtrip_predicts_the_same():
    X, y = _data()
    clf = _clf(freeze_depth=2).fit(X, y)
    clone_ = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(clone_.predict_proba(X), clf.predict_proba(X), atol=1e-6)
    assert clone_.history_ == clf.history_


def test_class_weight_reaches_the_loss():
    X, y = _data(n=18)
    y = np.r_[np.zeros(12, int), np.ones(6, int)]
    clf = _clf(class_weight="balanced", validation_fraction=None).fit(X, y)
    np.testing.assert_allclose(clf.net_.criterion_.weight.numpy(), [18 / 24, 18 / 12])
    clf = _clf(class_weight={0: 1.0, 1: 5.0}, validation_fraction=None).fit(X, y)
    np.testing.assert_allclose(clf.net_.criterion_.weight.numpy(), [1.0, 5.0])
    with pytest.raises(ValueError, match="class_weight"):
        _clf(class_weight={0: 1.0, 7: 2.0}).fit(X, y)


def test_user_callbacks_see_validation_scores_each_epoch():
    X, y = _data()
    rec = StateRecorder()
    _clf(max_epochs=2, early_stopping=False, validation_fraction=0.25, callbacks=[rec]).fit(X, y)
    assert len(rec.history_keys_) == 2
    for keys in rec.history_keys_:
        assert {"valid_loss", "valid_auc", "train_loss", "epoch"} <= keys


def test_early_stopping_restores_best_weights():
    X, y = _data()
    rec = StateRecorder()
    clf = _clf(
        max_epochs=6,
        patience=2,
        lr=0.05,
        freeze_depth=7,
        validation_fraction=0.25,
        callbacks=[("rec", rec)],
    ).fit(X, y)
    losses = [h["valid_loss"] for h in clf.history_]
    best = int(np.argmin(losses)) + 1
    assert clf.best_epoch_ == best
    state = clf.net_.module_.model.state_dict()
    for key in ("classifier.weight", "conv_head.weight"):
        assert torch.equal(state[key], rec.epochs_[best - 1][key])


@pytest.mark.parametrize(
    ("early_stopping", "key", "pick"),
    [
        ("auto", "valid_loss", np.argmin),
        (True, "valid_loss", np.argmin),
        ("loss", "valid_loss", np.argmin),
        ("score", "valid_auc", np.argmax),
    ],
)
def test_early_stopping_watches_the_loss_or_the_validation_score(early_stopping, key, pick):
    X, y = _data()
    clf = _clf(
        max_epochs=4,
        patience=4,
        lr=0.05,
        freeze_depth=7,
        validation_fraction=0.25,
        early_stopping=early_stopping,
    ).fit(X, y)
    stopper = dict(clf.net_.callbacks_)["early_stopping"]
    assert stopper.monitor == key
    assert stopper.lower_is_better is (key == "valid_loss")
    values = [h[key] for h in clf.history_]
    assert clf.best_epoch_ == int(pick(values)) + 1  # the first best epoch of that key


def test_early_stopping_rejects_an_unknown_monitor():
    X, y = _data()
    with pytest.raises(InvalidParameterError, match="early_stopping"):
        _clf(early_stopping="auc").fit(X, y)


def test_drop_last_single_sample_batch():
    X, y = _data(n=18)
    clf = _clf(batch_size=8, validation_fraction=None, strategy="linear_probe", augment=False)
    clf.fit(X[:17], y[:17])  # 17 = 2 * 8 + 1: the last batch would hold one sample
    assert clf.net_.iterator_train__drop_last is True
    assert clf.history_[0]["train_loss"] > 0


def test_image_frame_25d_and_3d_inputs():
    rng = np.random.default_rng(0)
    vols = rng.normal(size=(8, 6, SIZE, SIZE)).astype(np.float32)
    y = np.arange(8) % 2
    masks = np.zeros_like(vols, dtype=bool)
    masks[:, 2:4, 10:20, 10:20] = True
    frame = make_image_frame(list(vols), masks=list(masks), sites=list("aabbaabb"))
    clf = _clf(mode="2.5d", pretrained=False, validation_fraction=None).fit(frame, y)
    assert clf.input_config_["in_chans"] == 3 and clf.predict_proba(frame).shape == (8, 2)
    clf3 = _clf(mode="3d", pretrained=False, validation_fraction=None).fit(frame, y)
    assert clf3.predict_proba(frame).shape == (8, 2)
    batches = list(clf3._skrtl_iter_inputs(frame, batch_size=5))
    idx = np.concatenate([i for _, i in batches])
    np.testing.assert_array_equal(idx, np.repeat(np.arange(8), 2))  # 2 masked slices each
    assert batches[0][0].shape == (5, 3, SIZE, SIZE)  # grey -> RGB


def test_adabn_wraps_the_classifier():
    from skrtl._adabn import AdaBN

    X, y = _data()
    ada = AdaBN(_clf(freeze_depth=2, lr=0.05, max_epochs=2), site_column=None).fit(X, y)
    before = ada.decision_function(X)
    ada.adapt(X**2)  # a non-affine intensity change (an affine one is normalised away)
    after = ada.decision_function(X)
    assert before.shape == after.shape == (16,)
    assert np.abs(before - after).max() > 1e-2  # target statistics change the predictions
    module = ada.estimator_._skrtl_torch_module()
    assert isinstance(module, torch.nn.Module)


def test_parameter_errors():
    X, y = _data()
    with pytest.raises(ValueError, match=r"freeze_depth=12 is too deep.*\[0, 9\]"):
        _clf(freeze_depth=12).fit(X, y)
    with pytest.raises(InvalidParameterError, match="strategy"):
        _clf(strategy="partial").fit(X, y)
    with pytest.raises(ValueError, match="2 classes"):
        _clf().fit(X, np.zeros(16))
    with pytest.raises(ValueError, match="feature matrix"):
        _clf().fit(X.reshape(16, -1), y)
