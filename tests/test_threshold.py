"""Decision thresholds chosen on validation data: ``choose_threshold`` and
``FineTuneClassifier(threshold=...)`` with its out-of-fold ``validation_proba_``."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from conftest import square_images
from sklearn.metrics import balanced_accuracy_score

from skrtl import FineTuneClassifier
from skrtl.utils import choose_threshold

SIZE = 32


_data = partial(square_images, n=24)


def _clf(**kw):
    params = dict(input_size=SIZE, max_epochs=1, batch_size=8, n_estimators=1, random_state=0)
    params.update(kw)
    return FineTuneClassifier(**params)


# --------------------------------------------------------------------------------------------
def test_choose_threshold_maximises_balanced_accuracy_between_samples():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(80), np.ones(20)].astype(int)  # prevalence 0.2
    p = np.clip(np.where(y == 1, 0.45, 0.25) + rng.normal(0, 0.1, y.size), 0, 1)
    t = choose_threshold(y, p)
    best = max(balanced_accuracy_score(y, p > c) for c in np.unique(p))
    assert balanced_accuracy_score(y, p > t) == pytest.approx(best)
    assert not np.any(np.isclose(p, t))  # halfway between two probabilities
    # the accuracy threshold sits higher for a rare positive class
    assert choose_threshold(y, p, metric="accuracy") > t
    # the balanced threshold does not depend on the prevalence: duplicating the positives
    # leaves it where it is, while the accuracy threshold moves
    y2, p2 = np.r_[y, y[y == 1], y[y == 1]], np.r_[p, p[y == 1], p[y == 1]]
    assert choose_threshold(y2, p2) == pytest.approx(t)


def test_choose_threshold_weights_and_errors():
    y, p = np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.5, 0.9])
    # weight 0 on the negative at 0.5: separable, threshold between 0.1 and 0.4
    assert 0.1 < choose_threshold(y, p, sample_weight=[1, 1, 0, 1]) < 0.4
    with pytest.raises(ValueError, match="metric must be one of"):
        choose_threshold(y, p, metric="f2")
    with pytest.raises(ValueError, match="as many labels"):
        choose_threshold(y, p[:3])
    with pytest.raises(ValueError, match="0 and 1"):
        choose_threshold([0, 2], [0.1, 0.2])


def test_validation_proba_is_out_of_fold_per_member():
    X, y = _data()
    # nothing frozen: the members' validation sets hold images, not cached activations
    clf = _clf(n_estimators=3, validation_fraction=0.25, tta=False, freeze_depth=0).fit(X, y)
    oof = clf.validation_proba_
    assert oof.shape == (24, 2)
    seen = ~np.isnan(oof[:, 0])
    assert seen.sum() == 18  # 3 of the 4 folds of 6 images
    x = torch.cat([b for b, _ in clf._skrtl_iter_inputs(X)])
    for net in clf.nets_:
        va = net.train_split.keywords["valid_ds"]
        rows = [int(np.flatnonzero((x.flatten(1) == v).all(1))[0]) for v in va.X.flatten(1)]
        with torch.no_grad():
            own = torch.softmax(net.module_(x[rows]), 1).numpy()
        np.testing.assert_allclose(oof[rows], own, atol=1e-5)  # by its own member only
    np.testing.assert_allclose(oof[seen].sum(1), 1.0, atol=1e-6)


def test_auto_threshold_comes_from_the_validation_probabilities():
    X, y = _data()
    clf = _clf(n_estimators=3, validation_fraction=0.25, max_epochs=2).fit(X, y)
    seen = ~np.isnan(clf.validation_proba_[:, 1])
    expected = choose_threshold(y[seen], clf.validation_proba_[seen, 1])
    assert clf.threshold_ == pytest.approx(expected)
    proba = clf.predict_proba(X)[:, 1]
    np.testing.assert_array_equal(clf.predict(X), (proba > clf.threshold_).astype(int))
    # decision_function is positive exactly for the predicted positives
    np.testing.assert_array_equal(clf.decision_function(X) > 0, proba > clf.threshold_)


def test_accuracy_threshold_maximises_accuracy_on_the_same_probabilities():
    X, y = _data()
    kw = dict(n_estimators=2, validation_fraction=0.25, max_epochs=2)
    acc = _clf(threshold="accuracy", **kw).fit(X, y)
    bal = _clf(**kw).fit(X, y)
    # the networks do not depend on the threshold rule: same out-of-fold probabilities
    np.testing.assert_allclose(acc.validation_proba_, bal.validation_proba_)
    seen = ~np.isnan(acc.validation_proba_[:, 1])
    p = acc.validation_proba_[seen, 1]
    assert acc.threshold_ == pytest.approx(choose_threshold(y[seen], p, metric="accuracy"))
    # on out-of-fold probabilities with a rare positive class the two rules differ
    rng = np.random.default_rng(0)
    y_rare = np.r_[np.zeros(80), np.ones(20)].astype(int)
    p_rare = np.clip(np.where(y_rare == 1, 0.45, 0.25) + rng.normal(0, 0.1, 100), 0, 1)
    oof = np.c_[1 - p_rare, p_rare]
    t_acc = acc._decision_threshold(oof, y_rare, None)
    t_bal = bal._decision_threshold(oof, y_rare, None)
    assert t_acc > t_bal
    assert np.mean((p_rare > t_acc) == y_rare) > np.mean((p_rare > t_bal) == y_rare)


def test_fixed_threshold_and_fallbacks():
    X, y = _data()
    fixed = _clf(threshold=0.9).fit(X, y)
    assert fixed.threshold_ == 0.9
    proba = fixed.predict_proba(X)[:, 1]
    np.testing.assert_array_equal(fixed.predict(X), (proba > 0.9).astype(int))
    none = _clf(validation_fraction=None).fit(X, y)
    assert none.threshold_ == 0.5 and none.validation_proba_ is None
    y3 = np.arange(24) % 3
    multi = _clf(validation_fraction=0.25).fit(X, y3)
    assert multi.threshold_ is None
    np.testing.assert_array_equal(multi.predict(X), np.argmax(multi.predict_proba(X), 1))


def test_zero_weight_samples_have_no_validation_proba():
    X, y = _data()
    sw = np.ones(24)
    sw[:4] = 0
    clf = _clf(n_estimators=2, validation_fraction=0.25).fit(X, y, sample_weight=sw)
    assert clf.validation_proba_.shape == (24, 2)
    assert np.isnan(clf.validation_proba_[:4]).all()
    assert (~np.isnan(clf.validation_proba_[4:, 0])).sum() > 0


def test_threshold_parameter_is_validated():
    X, y = _data()
    from sklearn.utils._param_validation import InvalidParameterError

    for bad in (0.0, 1.0, "best"):
        with pytest.raises(InvalidParameterError, match="threshold"):
            _clf(threshold=bad).fit(X, y)
