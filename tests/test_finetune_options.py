"""Options of the fine-tuning estimators: per-sample augmentation transforms, the optimizer,
DataLoader workers and sample weights (FineTuneClassifier and FineTuneSurvival).

Tiny random-weight networks at 32 px, 1-2 epochs, CPU.
"""

from __future__ import annotations

import pickle
import random
import threading

import numpy as np
import pytest
import sklearn
import torch
from conftest import square_images
from sklearn.base import clone
from sklearn.metrics import get_scorer, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import InvalidParameterError
from torch import nn
from torchvision.transforms import v2

from skrtl import (
    FineTuneClassifier,
    FineTuneSurvival,
    cox_partial_likelihood_loss,
    make_survival_target,
)
from skrtl._callbacks import _valid_acc, _valid_auc
from skrtl._finetune import SampleWeightedCrossEntropy

SIZE = 32


_data = square_images


def _clf(**kw):
    params = dict(
        input_size=SIZE,
        max_epochs=1,
        batch_size=8,
        n_estimators=1,
        pretrained=False,
        validation_fraction=None,
        tta=False,
        random_state=0,
    )
    params.update(kw)
    return FineTuneClassifier(**params)


def _surv(**kw):
    params = dict(
        input_size=SIZE,
        max_epochs=1,
        batch_size=8,
        n_estimators=1,
        pretrained=False,
        validation_fraction=None,
        tta=False,
        random_state=0,
    )
    params.update(kw)
    return FineTuneSurvival(**params)


def _surv_target(n=16, seed=0):
    rng = np.random.default_rng(seed)
    event = rng.random(n) < 0.7
    event[:2] = True
    return make_survival_target(event, rng.exponential(10.0, n) + 1.0)


def _flip_noise(x):
    """A plain callable: random mirror image plus noise from the global torch generator."""
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x + 0.05 * torch.randn_like(x)


class _Recorder:
    """A transform that records what it receives (in a list shared by its copies)."""

    calls: list = []

    def __call__(self, x):
        _Recorder.calls.append((tuple(x.shape), x.dtype, float(x.min()), float(x.max())))
        return x


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------
def test_torchvision_augment_is_reproducible_and_disables_the_prefix_cache():
    X, y = _data()
    aug = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=15)])
    plain = _clf(strategy="finetune", freeze_depth=3).fit(X, y)
    assert plain.cached_prefix_ > 0
    a = _clf(strategy="finetune", freeze_depth=3, augment=aug).fit(X, y)
    b = _clf(strategy="finetune", freeze_depth=3, augment=aug).fit(X, y)
    c = _clf(strategy="finetune", freeze_depth=3, augment=aug, random_state=1).fit(X, y)
    assert a.cached_prefix_ == 0  # the cached prefix is only valid for un-augmented inputs
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert not np.allclose(a.predict_proba(X), plain.predict_proba(X))
    assert a.history_[0]["train_loss"] != c.history_[0]["train_loss"]
    assert a.augment is aug  # the parameter itself is not changed by fit
    twin = clone(a)  # GridSearchCV / cross_validate clone the transform with the estimator
    assert isinstance(twin.augment, v2.Compose) and twin.augment is not aug
    again = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(again.predict_proba(X), a.predict_proba(X))


def test_augment_applies_to_training_images_only_in_zero_one_scale():
    X, y = _data(n=20)
    _Recorder.calls = []
    clf = _clf(augment=_Recorder(), max_epochs=2, validation_fraction=0.2).fit(X, y)
    n_train = 20 - 4
    # one call per training image per epoch, plus one on the first image before training
    assert len(_Recorder.calls) == 1 + n_train * 2
    shapes = {c[0] for c in _Recorder.calls}
    assert shapes == {(clf.input_config_["in_chans"], SIZE, SIZE)}
    assert {c[1] for c in _Recorder.calls} == {torch.float32}
    lo, hi = min(c[2] for c in _Recorder.calls), max(c[3] for c in _Recorder.calls)
    assert -1e-5 <= lo and hi <= 1 + 1e-5  # intensities as scaled, before normalisation
    n_before = len(_Recorder.calls)
    clf.predict_proba(X)
    assert len(_Recorder.calls) == n_before  # never at predict time


def test_plain_callable_augment_is_seeded_without_touching_global_generators():
    X, y = _data()
    torch_state, np_state, py_state = (
        torch.get_rng_state(),
        np.random.get_state(),  # noqa: NPY002
        random.getstate(),
    )
    a = _clf(augment=_flip_noise).fit(X, y)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # noqa: NPY002
    assert random.getstate() == py_state
    b = _clf(augment=_flip_noise).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    plain = _clf().fit(X, y)
    assert a.history_[0]["train_loss"] != plain.history_[0]["train_loss"]


def test_numpy_drawing_callable_is_seeded_too():
    X, y = _data()

    def np_noise(x):
        return x + torch.as_tensor(np.random.normal(0, 0.05, x.shape), dtype=x.dtype)  # noqa: NPY002

    a = _clf(augment=np_noise).fit(X, y).predict_proba(X)
    b = _clf(augment=np_noise).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "transform, match",
    [
        (
            v2.Compose([v2.RandomCrop(16)]),
            r"(?s)augment=.*shape \(3, 16, 16\) for .* \(3, 32, 32\)",
        ),
        (lambda x: x.double(), r"(?s)augment=.*float64"),
        (lambda x: x.numpy().tolist(), r"(?s)augment=.*list"),
        (v2.RandomAffine(degrees=10), r"(?s)augment=.*Compose"),
    ],
    ids=["shape", "dtype", "not-a-tensor", "bare-torchvision-get_params"],
)
def test_bad_transform_is_a_clear_error(transform, match):
    X, y = _data()
    with pytest.raises(ValueError, match=match):
        _clf(augment=transform).fit(X, y)


def test_bad_option_values_are_refused():
    X, y = _data()
    for bad in (
        {"augment": "yes"},
        {"num_workers": -1},
        {"optimizer": "rmsprop"},
        {"optimizer_params": [("momentum", 0.9)]},
    ):
        with pytest.raises(InvalidParameterError):
            _clf(**bad).fit(X, y)


def test_monai_transform_when_installed():
    monai_t = pytest.importorskip("monai.transforms")
    X, y = _data()
    aug = monai_t.Compose(
        [monai_t.RandFlip(prob=0.5, spatial_axis=1), monai_t.RandGaussianNoise()]
    )
    a = _clf(augment=aug).fit(X, y).predict_proba(X)
    b = _clf(augment=aug).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)  # seeded through set_random_state
    assert not np.allclose(a, _clf().fit(X, y).predict_proba(X))
    assert not np.allclose(a, _clf(augment=aug, random_state=1).fit(X, y).predict_proba(X))


# --------------------------------------------------------------------------------------------
# DataLoader workers
# --------------------------------------------------------------------------------------------
def test_num_workers_gives_the_same_fit_and_pickles():
    X, y = _data()
    aug = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10)])
    for extra in ({}, {"augment": aug}, {"augment": True}):
        ref = _clf(max_epochs=2, **extra).fit(X, y)
        par = _clf(max_epochs=2, num_workers=2, **extra).fit(X, y)
        assert [h["train_loss"] for h in par.history_] == [h["train_loss"] for h in ref.history_]
        np.testing.assert_array_equal(par.predict_proba(X), ref.predict_proba(X))
    again = pickle.loads(pickle.dumps(par))
    np.testing.assert_array_equal(again.predict_proba(X), par.predict_proba(X))


def test_num_workers_fit_in_a_thread_and_survival_equal():
    X, y = _data()
    out = {}

    def work():
        out["proba"] = _clf(num_workers=2, augment=_flip_noise).fit(X, y).predict_proba(X)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    np.testing.assert_array_equal(
        out["proba"], _clf(augment=_flip_noise).fit(X, y).predict_proba(X)
    )
    target = _surv_target()
    a = _surv(augment=_flip_noise).fit(X, target).predict(X)
    b = _surv(augment=_flip_noise, num_workers=2).fit(X, target).predict(X)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# optimizer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "optimizer, params, cls, expected",
    [
        ("sgd", None, torch.optim.SGD, {"momentum": 0.9}),
        ("sgd", {"momentum": 0.5, "nesterov": True}, torch.optim.SGD, {"nesterov": True}),
        ("adam", {"betas": (0.8, 0.99)}, torch.optim.Adam, {"betas": (0.8, 0.99)}),
        (torch.optim.RMSprop, {"alpha": 0.9}, torch.optim.RMSprop, {"alpha": 0.9}),
    ],
)
def test_layerwise_groups_reach_the_chosen_optimizer(optimizer, params, cls, expected):
    X, y = _data()
    clf = _clf(
        strategy="finetune",
        freeze_depth=6,
        gamma=0.5,
        lr=1e-2,
        weight_decay=1e-3,
        lr_schedule="constant",
        optimizer=optimizer,
        optimizer_params=params,
    ).fit(X, y)
    opt = clf.net_.optimizer_
    assert type(opt) is cls
    lrs = {g["layer"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx(clf.layer_lrs_)
    L = clf.n_layers_
    assert lrs == pytest.approx({l: 1e-2 * 0.5 ** (L - l) for l in range(7, L + 1)})
    for group in opt.param_groups:
        assert group["weight_decay"] == 1e-3
        for key, value in expected.items():
            assert group[key] == value
    if params and "momentum" in params:
        assert all(g["momentum"] == params["momentum"] for g in opt.param_groups)


def test_optimizer_without_weight_decay_and_bad_optimizer_params():
    X, y = _data()
    clf = _clf(optimizer=torch.optim.Rprop, weight_decay=0.0).fit(X, y)
    assert type(clf.net_.optimizer_) is torch.optim.Rprop
    with pytest.raises(ValueError, match=r"weight_decay=0\.0001.*Rprop"):
        _clf(optimizer=torch.optim.Rprop).fit(X, y)
    with pytest.raises(ValueError, match=r"optimizer_params=.*'lr'"):
        _clf(optimizer_params={"lr": 0.1}).fit(X, y)
    with pytest.raises(ValueError, match=r"optimizer_params=.*\['momentum'\].*AdamW"):
        _clf(optimizer_params={"momentum": 0.9}).fit(X, y)
    with pytest.raises(ValueError, match=r"optimizer must be .*<class 'int'>"):
        _clf(optimizer=int).fit(X, y)


def test_survival_with_sgd():
    X, _ = _data()
    model = _surv(optimizer="sgd", optimizer_params={"momentum": 0.8}).fit(X, _surv_target())
    assert type(model.net_.optimizer_) is torch.optim.SGD
    assert all(g["momentum"] == 0.8 for g in model.net_.optimizer_.param_groups)
    assert np.all(np.isfinite(model.predict(X)))


# --------------------------------------------------------------------------------------------
# sample weights: the losses
# --------------------------------------------------------------------------------------------
def test_weighted_cross_entropy_integer_weights_equal_repetition():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 3, generator=gen)
    label = torch.arange(10) % 3
    w = torch.tensor([1, 2, 3, 1, 0, 2, 1, 1, 4, 1], dtype=torch.float64)
    rep = torch.repeat_interleave(torch.arange(10), w.long())
    target = torch.column_stack([label.double(), w])
    for cw in (None, torch.tensor([1.0, 2.0, 0.5])):
        ours = SampleWeightedCrossEntropy(weight=cw)(logits, target)
        ref = nn.CrossEntropyLoss(weight=cw)(logits[rep], label[rep])
        assert float(ours) == pytest.approx(float(ref), rel=1e-6)
    ones = torch.column_stack([label.double(), torch.ones(10, dtype=torch.float64)])
    assert float(SampleWeightedCrossEntropy()(logits, ones)) == pytest.approx(
        float(nn.CrossEntropyLoss()(logits, label)), rel=1e-6
    )


def test_weighted_validation_scores():
    class Net:
        def predict_proba(self, X):
            return np.column_stack([1 - X, X])

    p = np.array([0.1, 0.8, 0.4, 0.3, 0.9, 0.6])
    label = np.array([0, 1, 0, 1, 1, 0])
    w = np.array([1.0, 2.0, 0.5, 3.0, 1.0, 1.0])
    y = np.column_stack([label, w])
    assert _valid_auc(Net(), p, y) == pytest.approx(roc_auc_score(label, p, sample_weight=w))
    assert _valid_auc(Net(), p, label) == pytest.approx(roc_auc_score(label, p))
    assert _valid_acc(Net(), p, y) == pytest.approx(np.average((p > 0.5) == label, weights=w))


def test_weighted_cox_loss_matches_lifelines_and_repetition():
    lifelines = pytest.importorskip("lifelines")
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=n)
    time = np.round(rng.exponential(5, n) * np.exp(-0.5 * x)) + 1.0  # tied times
    event = rng.random(n) < 0.7
    w = rng.integers(1, 4, n).astype(float)
    df = pd.DataFrame({"x": x, "T": time, "E": event.astype(int), "w": w})
    cph = lifelines.CoxPHFitter().fit(df, "T", "E", weights_col="w", robust=True)
    risk = torch.tensor(x * cph.params_["x"])
    t, e, wt = torch.tensor(time), torch.tensor(event), torch.tensor(w)
    loss = cox_partial_likelihood_loss(risk, t, e, ties="efron", weight=wt)
    assert float(-loss * w[event].sum()) == pytest.approx(cph.log_likelihood_, rel=1e-8)
    # Breslow: integer weights are repetition; unit weights are the unweighted loss
    rep = np.repeat(np.arange(n), w.astype(int))
    r = torch.tensor(rng.normal(size=n))
    weighted = cox_partial_likelihood_loss(r, t, e, ties="breslow", weight=wt)
    repeated = cox_partial_likelihood_loss(r[rep], t[rep], e[rep], ties="breslow")
    assert float(weighted) == pytest.approx(float(repeated), rel=1e-10)
    for ties in ("efron", "breslow"):
        unit = cox_partial_likelihood_loss(r, t, e, ties=ties, weight=torch.ones(n).double())
        assert float(unit) == pytest.approx(float(cox_partial_likelihood_loss(r, t, e, ties=ties)))
    # weight 0 is leaving the sample out
    w0 = wt.clone()
    w0[:10] = 0
    dropped = cox_partial_likelihood_loss(r[10:], t[10:], e[10:], ties="efron", weight=wt[10:])
    assert float(cox_partial_likelihood_loss(r, t, e, weight=w0)) == pytest.approx(float(dropped))


# --------------------------------------------------------------------------------------------
# sample weights: the estimators
# --------------------------------------------------------------------------------------------
def test_zero_weight_equals_dropping_the_rows():
    X, y = _data(n=24)
    w = np.ones(24)
    w[[1, 4, 9, 14, 19]] = 0.0
    keep = w > 0
    # fine-tuning with a validation split and an ensemble: zero-weight rows are left out of
    # the folds too, so the fits coincide exactly
    kw = dict(strategy="finetune", freeze_depth=5, validation_fraction=0.25, n_estimators=2)
    kw.update(max_epochs=2)
    weighted = _clf(**kw).fit(X, y, sample_weight=w)
    dropped = _clf(**kw).fit(X[keep], y[keep], sample_weight=w[keep])
    unweighted = _clf(**kw).fit(X[keep], y[keep])
    np.testing.assert_allclose(weighted.predict_proba(X), dropped.predict_proba(X), atol=1e-7)
    np.testing.assert_allclose(weighted.predict_proba(X), unweighted.predict_proba(X), atol=1e-5)
    assert "valid_loss" in weighted.history_[0]
    assert weighted.history_[-1]["valid_loss"] == pytest.approx(
        unweighted.history_[-1]["valid_loss"], rel=1e-5
    )


def test_integer_weights_equal_repetition():
    X, y = _data(n=12)
    w = np.array([1, 2, 3, 1, 1, 2, 1, 3, 1, 1, 2, 1])
    rep = np.repeat(np.arange(12), w)
    # one full batch, frozen BatchNorm (linear probe), no dropout: the same loss and updates
    kw = dict(strategy="linear_probe", batch_size=32, drop_rate=0.0, max_epochs=2, lr=0.05)
    weighted = _clf(**kw).fit(X, y, sample_weight=w)
    repeated = _clf(**kw).fit(X[rep], y[rep])
    for hw, hr in zip(weighted.history_, repeated.history_):
        assert hw["train_loss"] == pytest.approx(hr["train_loss"], rel=1e-5)
    np.testing.assert_allclose(weighted.predict_proba(X), repeated.predict_proba(X), atol=1e-5)
    plain = _clf(**kw).fit(X, y)
    assert not np.allclose(plain.predict_proba(X), weighted.predict_proba(X), atol=1e-5)


def test_bad_sample_weight_is_a_clear_error():
    X, y = _data()
    bad = [
        (np.ones(5), r"sample_weight has shape \(5,\)"),
        (-np.ones(16), "non-negative"),
        (np.zeros(16), "sums to 0"),
        (np.where(y == 1, 0.0, 1.0), r"class\(es\) \[1\]"),
    ]
    for sw, match in bad:
        with pytest.raises(ValueError, match=match):
            _clf().fit(X, y, sample_weight=sw)
    target = _surv_target()
    with pytest.raises(ValueError, match="every sample with an event"):
        _surv().fit(X, target, sample_weight=(~target["event"]).astype(float))


def test_balanced_class_weight_uses_weighted_totals():
    X, y = _data()
    w = np.where(y == 1, 3.0, 1.0)
    clf = _clf(class_weight="balanced").fit(X, y, sample_weight=w)
    cw = clf.net_.criterion_.weight.numpy()
    assert cw[0] / cw[1] == pytest.approx(3.0)


def test_survival_zero_weight_equals_dropping_and_weights_matter():
    X, _ = _data(n=20)
    target = _surv_target(n=20)
    w = np.ones(20)
    w[[3, 7, 11]] = 0.0
    keep = w > 0
    kw = dict(strategy="finetune", freeze_depth=5, validation_fraction=0.25, max_epochs=2)
    weighted = _surv(**kw).fit(X, target, sample_weight=w)
    dropped = _surv(**kw).fit(X[keep], target[keep])
    np.testing.assert_allclose(weighted.predict(X), dropped.predict(X), atol=1e-5)
    np.testing.assert_allclose(
        weighted.baseline_cumulative_hazard_, dropped.baseline_cumulative_hazard_, rtol=1e-5
    )
    assert weighted.concordance_index_ == pytest.approx(dropped.concordance_index_)
    assert len(weighted.survival_train_) == keep.sum()
    heavy = _surv(**kw).fit(X, target, sample_weight=np.linspace(0.2, 3.0, 20))
    assert not np.allclose(heavy.predict(X), _surv(**kw).fit(X, target).predict(X), atol=1e-5)


def test_sample_weight_is_routed_in_pipeline_grid_search_and_cross_validate():
    X, y = _data()
    w = np.where(np.arange(16) % 3 == 0, 0.0, 1.0)
    direct = _clf().fit(X, y, sample_weight=w).predict_proba(X)
    with sklearn.config_context(enable_metadata_routing=True):
        est = _clf().set_fit_request(sample_weight=True).set_score_request(sample_weight=True)
        pipe = Pipeline([("clf", est)]).fit(X, y, sample_weight=w)
        np.testing.assert_array_equal(pipe.predict_proba(X), direct)
        auc = get_scorer("roc_auc").set_score_request(sample_weight=True)
        grid = GridSearchCV(est, {"lr": [1e-3]}, cv=2, scoring=auc).fit(X, y, sample_weight=w)
        np.testing.assert_array_equal(grid.best_estimator_.predict_proba(X), direct)
        cv = StratifiedKFold(2)
        res = cross_validate(est, X, y, cv=cv, params={"sample_weight": w}, return_estimator=True)
        train, _ = next(cv.split(X, y))
        fold = _clf().fit(X[train], y[train], sample_weight=w[train]).predict_proba(X)
        np.testing.assert_array_equal(res["estimator"][0].predict_proba(X), fold)
        # survival: the same request API
        surv = _surv().set_fit_request(sample_weight=True)
        target = _surv_target()
        sw = np.linspace(0.5, 2.0, 16)
        routed = Pipeline([("s", surv)]).fit(X, target, sample_weight=sw)
    np.testing.assert_array_equal(
        routed.predict(X), _surv().fit(X, target, sample_weight=sw).predict(X)
    )


# ---------------------------------------------------------------------------------------------
# precision: bfloat16 autocast of the forward passes
# ---------------------------------------------------------------------------------------------
def test_bf16_autocast_trains_close_to_fp32_and_returns_float32():
    X, y = _data(16)
    fp32 = _clf(max_epochs=2).fit(X, y)
    bf16 = _clf(max_epochs=2, precision="bf16").fit(X, y)
    assert bf16.net_.module_.autocast_dtype is torch.bfloat16
    assert fp32.net_.module_.autocast_dtype is None
    p32, p16 = fp32.predict_proba(X), bf16.predict_proba(X)
    assert p16.dtype == p32.dtype and np.isfinite(p16).all()
    # the same seed and data: bfloat16 rounding moves the probabilities a little, not a lot
    assert np.abs(p16 - p32).max() < 0.1
    assert not np.array_equal(p16, p32)  # autocast really ran
    # the weights and the optimizer stay float32
    assert all(p.dtype == torch.float32 for p in bf16.net_.module_.parameters())
    restored = pickle.loads(pickle.dumps(bf16))
    np.testing.assert_array_equal(restored.predict_proba(X), p16)


def test_precision_is_validated():
    X, y = _data(8)
    with pytest.raises(InvalidParameterError, match="precision"):
        _clf(precision="fp16").fit(X, y)
