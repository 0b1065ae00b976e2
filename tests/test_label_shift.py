"""Prior-shift (label-shift) adaptation: calibrators, EM / BBSE prior estimation, the adapter."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import norm
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl._calibration import (
    BiasCorrectedTemperatureScaling,
    TemperatureScaling,
    VectorScaling,
)
from skrtl._label_shift import (
    LabelShiftAdapter,
    LabelShiftWarning,
    adjust_posteriors,
    bbse_prior_estimate,
    em_prior_estimate,
    prior_shift_class_weight,
    prior_shift_sample_weight,
)

MEANS = np.array([-1.0, 1.0, 3.0])


def gaussian_data(n, priors, rng, n_features=1):
    """Classes N(MEANS[k], 1) on the first feature (extra features are pure noise)."""
    priors = np.asarray(priors)
    y = rng.choice(len(priors), size=n, p=priors)
    X = rng.normal(size=(n, n_features))
    X[:, 0] += MEANS[: len(priors)][y]
    return X, y


def true_posterior(X, priors):
    k = len(priors)
    lik = norm.pdf(X[:, [0]], loc=MEANS[:k][None, :])
    post = lik * np.asarray(priors)
    return post / post.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------- standalone functions


@pytest.mark.parametrize(
    "source, target",
    [([0.5, 0.5], [0.2, 0.8]), ([0.5, 0.5], [0.9, 0.1]), ([1 / 3] * 3, [0.6, 0.3, 0.1])],
)
def test_em_recovers_target_prior_with_true_posteriors(source, target):
    rng = np.random.default_rng(0)
    Xt, yt = gaussian_data(4000, target, rng)
    proba = true_posterior(Xt, source)
    est, n_iter, converged = em_prior_estimate(proba, source, return_n_iter=True)
    empirical = np.bincount(yt, minlength=len(target)) / len(yt)
    assert converged and 1 < n_iter < 1000
    np.testing.assert_allclose(est, empirical, atol=0.03)
    assert est.sum() == pytest.approx(1.0)


def test_em_no_shift_is_a_fixed_point():
    rng = np.random.default_rng(1)
    proba = softmax(rng.normal(size=(200, 3)), axis=1)
    source = proba.mean(axis=0)  # calibrated-mean source priors: EM must return them
    est = em_prior_estimate(proba, source)
    np.testing.assert_allclose(est, source, atol=1e-8)


def test_em_warns_when_not_converged():
    rng = np.random.default_rng(0)
    Xt, _ = gaussian_data(500, [0.1, 0.9], rng)
    proba = true_posterior(Xt, [0.5, 0.5])
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        _, n_iter, converged = em_prior_estimate(proba, [0.5, 0.5], max_iter=2, return_n_iter=True)
    assert n_iter == 2 and not converged


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("target", [[0.2, 0.8], [0.6, 0.3, 0.1]])
def test_bbse_recovers_target_prior(soft, target):
    rng = np.random.default_rng(2)
    k = len(target)
    source = np.full(k, 1 / k)
    Xs, ys = gaussian_data(4000, source, rng)
    Xt, yt = gaussian_data(4000, target, rng)
    est = bbse_prior_estimate(
        true_posterior(Xs, source), ys, true_posterior(Xt, source), soft=soft
    )
    empirical = np.bincount(yt, minlength=k) / len(yt)
    np.testing.assert_allclose(est, empirical, atol=0.04)


def test_bbse_singular_confusion_warns_and_falls_back():
    rng = np.random.default_rng(3)
    ys = rng.integers(0, 2, 100)
    proba_s = np.tile([0.9, 0.1], (100, 1))  # always predicts class 0: singular C
    proba_t = np.tile([0.8, 0.2], (50, 1))
    with pytest.warns(LabelShiftWarning, match="singular or ill-conditioned"):
        est = bbse_prior_estimate(proba_s, ys, proba_t)
    assert np.all(np.isfinite(est)) and est.sum() == pytest.approx(1.0)


def test_bbse_class_absent_from_source_raises():
    proba = np.full((10, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"classes \[2\] are absent"):
        bbse_prior_estimate(proba, np.arange(10) % 2, proba)


def test_adjust_posteriors_formula_and_bayes_consistency():
    proba = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    out = adjust_posteriors(proba, [0.5, 0.5], [0.25, 0.75])
    expected = proba * [0.5, 1.5]
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected)
    # with exact posteriors the adjustment equals Bayes' rule under the target priors
    X, _ = gaussian_data(50, [1 / 3] * 3, np.random.default_rng(0))
    src, tgt = [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]
    np.testing.assert_allclose(
        adjust_posteriors(true_posterior(X, src), src, tgt), true_posterior(X, tgt), atol=1e-12
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"proba": [[0.5, 0.6]]}, "non-negative rows summing to 1"),
        ({"proba": [0.5, 0.5]}, "2-D array"),
        ({"target_priors": [0.5, 0.6]}, "must sum to 1"),
        ({"target_priors": [1.0]}, "one entry per class"),
        ({"source_priors": [1.0, 0.0]}, "strictly positive"),
        ({"proba": [[np.nan, 1.0]]}, "NaN"),
    ],
)
def test_adjust_posteriors_bad_input(kwargs, match):
    args = {"proba": [[0.5, 0.5]], "source_priors": [0.5, 0.5], "target_priors": [0.3, 0.7]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        adjust_posteriors(**args)


def test_prior_shift_weights():
    y = np.array(["a", "a", "a", "b"])
    cw = prior_shift_class_weight(y, {"a": 0.5, "b": 0.5})
    assert cw == pytest.approx({"a": 0.5 / 0.75, "b": 2.0})
    sw = prior_shift_sample_weight(y, [0.5, 0.5])
    np.testing.assert_allclose(sw, [2 / 3, 2 / 3, 2 / 3, 2.0])
    assert sw.mean() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="missing"):
        prior_shift_class_weight(y, {"a": 1.0})
    # training with the weights moves the predicted prevalence towards the target
    rng = np.random.default_rng(0)
    X, y = gaussian_data(2000, [0.5, 0.5], rng)
    plain = LogisticRegression().fit(X, y).predict_proba(X)[:, 1].mean()
    weighted = LogisticRegression(class_weight=prior_shift_class_weight(y, [0.1, 0.9]))
    shifted = weighted.fit(X, y).predict_proba(X)[:, 1].mean()
    assert shifted > plain + 0.2


# --------------------------------------------------------------------- calibrators


def test_temperature_scaling_fixes_overconfident_logits():
    rng = np.random.default_rng(0)
    X, y = gaussian_data(3000, [1 / 3] * 3, rng)
    logits = 5.0 * np.log(true_posterior(X, [1 / 3] * 3))  # over-confident by a factor 5
    ts = TemperatureScaling().fit(logits, y)
    assert ts.temperature_ == pytest.approx(5.0, rel=0.1)
    assert log_loss(y, ts.predict_proba(logits)) < log_loss(y, softmax(logits, axis=1)) - 0.1
    np.testing.assert_array_equal(ts.predict(logits), np.argmax(logits, axis=1))


def test_bcts_and_vs_fix_a_biased_model_better_than_ts():
    rng = np.random.default_rng(0)
    X, y = gaussian_data(3000, [1 / 3] * 3, rng)
    logits = 3.0 * np.log(true_posterior(X, [1 / 3] * 3)) + [0.0, 2.0, -1.0]
    nll = {}
    for cal in (TemperatureScaling(), BiasCorrectedTemperatureScaling(), VectorScaling()):
        nll[type(cal).__name__] = log_loss(y, cal.fit(logits, y).predict_proba(logits))
    assert nll["BiasCorrectedTemperatureScaling"] < nll["TemperatureScaling"] - 0.02
    assert nll["VectorScaling"] <= nll["BiasCorrectedTemperatureScaling"] + 1e-6
    bcts = BiasCorrectedTemperatureScaling().fit(logits, y)
    np.testing.assert_allclose(bcts.bias_, [0.0, -2 / 3, 1 / 3], atol=0.15)


def test_calibrator_inputs_proba_and_binary_single_column():
    rng = np.random.default_rng(0)
    X, y = gaussian_data(500, [0.5, 0.5], rng)
    proba = true_posterior(X, [0.5, 0.5])
    full = TemperatureScaling(inputs="proba").fit(proba, y)
    single = TemperatureScaling(inputs="proba").fit(proba[:, [1]], y)
    assert full.temperature_ == pytest.approx(single.temperature_, rel=1e-4)
    assert full.temperature_ == pytest.approx(1.0, abs=0.2)  # already calibrated


def test_calibrator_rejects_features():
    with pytest.raises(ValueError, match="one column of logits per class"):
        TemperatureScaling().fit(np.zeros((6, 4)), [0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        TemperatureScaling(inputs="proba").fit([[2.0, -1.0], [0.0, 1.0]], [0, 1])


# --------------------------------------------------------------------- adapter


@pytest.fixture(scope="module")
def shifted_data():
    rng = np.random.default_rng(0)
    X, y = gaussian_data(1500, [0.5, 0.5], rng, n_features=3)
    Xt, yt = gaussian_data(1500, [0.15, 0.85], rng, n_features=3)
    return X, y, Xt, yt


@pytest.mark.parametrize("prior_estimation", ["em", "bbse-hard", "bbse-soft"])
@pytest.mark.parametrize("calibration", ["bcts", "ts", "vs", None])
def test_adapter_estimates_prior_and_improves_target_log_loss(
    shifted_data, prior_estimation, calibration
):
    X, y, Xt, yt = shifted_data
    ada = LabelShiftAdapter(
        LogisticRegression(),
        calibration=calibration,
        prior_estimation=prior_estimation,
        cv=3,
        random_state=0,
    ).fit(X, y)
    before = ada.predict_proba(Xt)
    assert not hasattr(ada, "target_priors_")
    assert ada.adapt(Xt) is ada
    assert ada.target_priors_[1] == pytest.approx(np.mean(yt), abs=0.04)
    assert ada.n_target_ == len(Xt) and ada.converged_
    after = ada.predict_proba(Xt)
    assert log_loss(yt, after) < log_loss(yt, before) - 0.02
    np.testing.assert_allclose(
        after, adjust_posteriors(before, ada.source_priors_, ada.target_priors_)
    )
    np.testing.assert_array_equal(ada.predict(Xt), ada.classes_[after.argmax(axis=1)])


def test_adapter_before_adapt_returns_calibrated_source_posteriors(shifted_data):
    X, y, Xt, _ = shifted_data
    ada = LabelShiftAdapter(LogisticRegression(), calibration="ts", cv=3, random_state=0)
    ada.fit(X, y)
    raw = ada.estimator_.predict_proba(Xt)
    expected = ada.calibrator_.predict_proba(np.log(raw))
    np.testing.assert_allclose(ada.predict_proba(Xt), expected)
    # source priors are the mean calibrated held-out prediction, close to the label frequency
    assert ada.source_priors_ == pytest.approx(ada.empirical_source_priors_, abs=0.02)


def test_adapter_multiclass_string_labels_and_known_priors():
    rng = np.random.default_rng(1)
    X, y = gaussian_data(1500, [1 / 3] * 3, rng)
    Xt, yt = gaussian_data(1500, [0.6, 0.3, 0.1], rng)
    names = np.array(["benign", "malignant", "normal"])
    ada = LabelShiftAdapter(cv=3, random_state=0).fit(X, names[y], X_target=Xt)
    assert list(ada.classes_) == list(names)
    np.testing.assert_allclose(ada.target_priors_, np.bincount(yt) / len(yt), atol=0.04)
    assert set(ada.predict(Xt)) <= set(names)
    known = {"benign": 0.6, "malignant": 0.3, "normal": 0.1}
    kada = LabelShiftAdapter(
        cv=3, prior_estimation="known", target_priors=known, random_state=0
    ).fit(X, names[y])
    np.testing.assert_allclose(kada.target_priors_, [0.6, 0.3, 0.1])
    assert log_loss(names[yt], kada.predict_proba(Xt), labels=names) < log_loss(
        names[yt],
        ada.calibrator_.predict_proba(np.log(ada.estimator_.predict_proba(Xt))),
        labels=names,
    )


def test_adapter_small_target_warns_and_falls_back(shifted_data):
    X, y, Xt, _ = shifted_data
    ada = LabelShiftAdapter(cv=3, random_state=0).fit(X, y)
    with pytest.warns(LabelShiftWarning, match="min_target_samples=20"):
        ada.adapt(Xt[:5])
    np.testing.assert_allclose(ada.target_priors_, ada.source_priors_)
    with pytest.raises(ValueError, match="no samples"):
        ada.adapt(Xt[:0])


def test_adapter_em_convergence_warning(shifted_data):
    X, y, Xt, _ = shifted_data
    ada = LabelShiftAdapter(cv=3, em_max_iter=1, random_state=0).fit(X, y)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        ada.adapt(Xt)
    assert not ada.converged_ and ada.n_iter_ == 1


@pytest.mark.parametrize(
    "params, y, match",
    [
        ({}, np.zeros(30, dtype=int), "at least 2 classes"),
        ({"cv": 5}, np.r_[np.zeros(27, dtype=int), [1, 1, 1]], "fewer than cv=5"),
        ({"prior_estimation": "known"}, np.arange(30) % 2, "needs target_priors"),
        (
            {"prior_estimation": "known", "target_priors": [0.2, 0.9]},
            np.arange(30) % 2,
            "must sum to 1",
        ),
        ({"calibration": "platt"}, np.arange(30) % 2, "calibration"),
    ],
)
def test_adapter_bad_input(params, y, match):
    X = np.random.default_rng(0).normal(size=(30, 2))
    with pytest.raises(ValueError, match=match):
        LabelShiftAdapter(**params).fit(X, y)


def test_adapter_not_fitted_errors():
    with pytest.raises(NotFittedError):
        LabelShiftAdapter().adapt(np.zeros((30, 2)))
    with pytest.raises(NotFittedError):
        LabelShiftAdapter(LogisticRegression(), cv="prefit").fit(np.zeros((4, 2)), [0, 1, 0, 1])


def test_adapter_prefit_and_frozen(shifted_data):
    X, y, Xt, yt = shifted_data
    base = LogisticRegression().fit(X[:800], y[:800])
    pre = LabelShiftAdapter(base, cv="prefit").fit(X[800:], y[800:]).adapt(Xt)
    assert pre.estimator_ is base
    assert pre.target_priors_[1] == pytest.approx(np.mean(yt), abs=0.04)
    X3, y3 = gaussian_data(90, [1 / 3] * 3, np.random.default_rng(0))
    base3 = LogisticRegression().fit(X3, y3)
    with pytest.raises(ValueError, match=r"classes \[2\] of the prefit estimator are absent"):
        LabelShiftAdapter(base3, cv="prefit").fit(X3[y3 < 2], y3[y3 < 2])
    with pytest.raises(ValueError, match=r"classes \[7\] unknown to the prefit"):
        LabelShiftAdapter(base3, cv="prefit").fit(X3, np.where(y3 == 2, 7, y3))
    frozen = LabelShiftAdapter(FrozenEstimator(base), cv=3, random_state=0)
    frozen.fit(X[800:], y[800:]).adapt(Xt)
    np.testing.assert_allclose(frozen.target_priors_, pre.target_priors_, atol=0.02)


def test_adapter_clone_pipeline_and_cross_validate(shifted_data):
    X, y, Xt, yt = shifted_data
    ada = LabelShiftAdapter(make_pipeline(StandardScaler(), LogisticRegression()), cv=3)
    assert clone(ada).get_params()["cv"] == 3
    # adapter wrapping a pipeline: adapt takes raw inputs
    ada.set_params(random_state=0).fit(X, y).adapt(Xt)
    assert ada.target_priors_[1] == pytest.approx(np.mean(yt), abs=0.04)
    # adapter as the last pipeline step: adapt on the transformed target inputs
    pipe = make_pipeline(StandardScaler(), LabelShiftAdapter(cv=3, random_state=0)).fit(X, y)
    pipe[-1].adapt(pipe[:-1].transform(Xt))
    np.testing.assert_allclose(pipe[-1].target_priors_, ada.target_priors_, atol=0.02)
    # transductive mode: each test fold is a target; folds mixing source and shifted target
    Xall, yall = np.vstack([X, Xt]), np.r_[y, yt]
    groups = np.r_[np.zeros(len(y)), np.ones(len(yt))]
    from sklearn.model_selection import GroupKFold

    scores = {}
    for mode in (False, True):
        est = LabelShiftAdapter(cv=3, adapt_on_predict=mode, random_state=0)
        res = cross_validate(
            est, Xall, yall, groups=groups, cv=GroupKFold(2), scoring="neg_log_loss"
        )
        scores[mode] = res["test_score"].mean()
    assert scores[True] > scores[False] + 0.02
    grid = GridSearchCV(
        LabelShiftAdapter(cv=3, random_state=0), {"calibration": ["ts", "bcts"]}, cv=2
    ).fit(X, y)
    assert grid.best_params_["calibration"] in {"ts", "bcts"}


def test_adapt_on_predict_leaves_fitted_state_unchanged(shifted_data):
    X, y, Xt, _ = shifted_data
    ada = LabelShiftAdapter(cv=3, adapt_on_predict=True, random_state=0).fit(X, y)
    adapted = ada.predict_proba(Xt)
    assert not hasattr(ada, "target_priors_")
    ref = clone(ada).set_params(adapt_on_predict=False).fit(X, y).adapt(Xt)
    np.testing.assert_allclose(adapted, ref.predict_proba(Xt), atol=1e-10)


def test_em_agrees_with_abstention_package(shifted_data):
    label_shift = pytest.importorskip("abstention.label_shift")
    X, y, Xt, _ = shifted_data
    ada = LabelShiftAdapter(calibration=None, cv=3, em_tol=1e-10, random_state=0).fit(X, y)
    ada.adapt(Xt)
    held_out = ada.held_out_proba_  # uncalibrated here (calibration=None)
    target = ada.predict_proba(Xt)  # adjusted; recompute unadjusted for abstention
    raw = ada.estimator_.predict_proba(Xt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = label_shift.EMImbalanceAdapter(tolerance=1e-10, max_iterations=1000)
        func = adapter(tofit_initial_posterior_probs=raw, valid_posterior_probs=held_out)
    ref_priors = func.multipliers * held_out.mean(axis=0)
    np.testing.assert_allclose(ada.target_priors_, ref_priors, atol=1e-6)
    np.testing.assert_allclose(target, func(raw), atol=1e-6)


# sklearn's estimator checks for LabelShiftAdapter and the calibrators run in
# tests/test_common.py with the other skrtl estimators.
