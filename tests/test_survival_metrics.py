"""Time-dependent AUC, Brier scores and C-index scorers (scikit-survival behind skrtl)."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl import (
    CoxPHSurvival,
    brier_score,
    concordance_index,
    integrated_brier_score,
    make_brier_scorer,
    make_concordance_scorer,
    make_survival_target,
    make_time_dependent_auc_scorer,
    survival_function_at,
    time_dependent_auc,
)

sksurv_metrics = pytest.importorskip("sksurv.metrics")
lifelines = pytest.importorskip("lifelines")


def _synthetic(n=300, p=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    t_event = rng.exponential(10.0 / np.exp(X[:, 0] - 0.5 * X[:, 1]))
    t_cens = rng.uniform(2.0, 40.0, size=n)
    y = make_survival_target(t_event <= t_cens, np.minimum(t_event, t_cens))
    return pd.DataFrame(X, columns=[f"x{i}" for i in range(p)]), y


@pytest.fixture(scope="module")
def fitted():
    X, y = _synthetic()
    train, test = np.arange(200), np.arange(200, 300)
    model = make_pipeline(StandardScaler(), CoxPHSurvival(penalizer=0.01))
    model.fit(X.iloc[train], y[train])
    return model, X.iloc[train], y[train], X.iloc[test], y[test]


TIMES = np.array([2.0, 5.0, 10.0])


def test_functions_equal_scikit_survival(fitted):
    model, _, ytr, Xte, yte = fitted
    times = np.array([2.0, 5.0, 10.0])
    assert yte["time"].max() < ytr["time"].max()  # no time moved: plain sksurv applies
    risk = model.predict(Xte)
    auc, mean_auc = time_dependent_auc(ytr, yte, risk, times)
    ref_auc, ref_mean = sksurv_metrics.cumulative_dynamic_auc(ytr, yte, risk, times)
    np.testing.assert_allclose(auc, ref_auc)
    assert mean_auc == pytest.approx(ref_mean)
    surv = survival_function_at(model, Xte, times)
    np.testing.assert_allclose(
        brier_score(ytr, yte, surv, times), sksurv_metrics.brier_score(ytr, yte, surv, times)[1]
    )
    grid = np.linspace(1.0, 15.0, 30)
    surv = survival_function_at(model, Xte, grid)
    assert integrated_brier_score(ytr, yte, surv, grid) == pytest.approx(
        sksurv_metrics.integrated_brier_score(ytr, yte, surv, grid)
    )


def test_sign_convention_higher_risk_is_shorter_survival(fitted):
    model, _, ytr, Xte, yte = fitted
    risk = model.predict(Xte)
    auc = time_dependent_auc(ytr, yte, risk, [5.0])[1]
    assert auc > 0.6
    assert time_dependent_auc(ytr, yte, -risk, [5.0])[1] == pytest.approx(1 - auc, abs=0.02)
    # the C-index agrees with scikit-survival's (risk) and lifelines' (negated risk)
    from lifelines.utils import concordance_index as lifelines_c

    c = concordance_index(yte, risk)
    assert c == pytest.approx(
        sksurv_metrics.concordance_index_censored(yte["event"], yte["time"], risk)[0]
    )
    assert c == pytest.approx(lifelines_c(yte["time"], -risk, yte["event"]))


def test_scorers_use_the_training_censoring(fitted):
    model, _, ytr, Xte, yte = fitted
    auc_scorer = make_time_dependent_auc_scorer(times=TIMES)
    risk = model.predict(Xte)
    assert auc_scorer(model, Xte, yte) == pytest.approx(
        time_dependent_auc(ytr, yte, risk, TIMES)[1]
    )
    test_only = make_time_dependent_auc_scorer(times=TIMES, censoring="test")(model, Xte, yte)
    assert test_only == pytest.approx(time_dependent_auc(yte, yte, risk, TIMES)[1])
    assert test_only != pytest.approx(auc_scorer(model, Xte, yte), abs=1e-9)
    ibs = make_brier_scorer(times=np.linspace(1, 15, 20))
    surv = survival_function_at(model, Xte, np.linspace(1, 15, 20))
    assert ibs(model, Xte, yte) == pytest.approx(
        -integrated_brier_score(ytr, yte, surv, np.linspace(1, 15, 20))
    )
    bs = make_brier_scorer(times=5.0)
    s5 = survival_function_at(model, Xte, [5.0])
    assert bs(model, Xte, yte) == pytest.approx(-brier_score(ytr, yte, s5, [5.0])[0])
    uno = make_concordance_scorer("uno", tau=10)
    assert uno(model, Xte, yte) == pytest.approx(
        concordance_index(yte, risk, method="uno", y_train=ytr, tau=10)
    )


def test_scorers_in_cross_validate_and_grid_search():
    X, y = _synthetic(n=240, seed=1)
    pipe = make_pipeline(StandardScaler(), CoxPHSurvival(penalizer=0.1))
    scoring = {
        "auc": make_time_dependent_auc_scorer(times=[3.0, 6.0, 9.0]),
        "neg_ibs": make_brier_scorer(times=np.linspace(1, 12, 12)),
        "neg_brier": make_brier_scorer(times=6.0),
    }
    cv = KFold(4, shuffle=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the training censoring is found: no fallback warning
        res = cross_validate(pipe, X, y, cv=cv, scoring=scoring, error_score="raise")
    assert np.all(res["test_auc"] > 0.6) and np.all(res["test_auc"] < 1)
    assert np.all((res["test_neg_ibs"] < 0) & (res["test_neg_ibs"] > -0.25))
    assert np.all(res["test_neg_brier"] < 0)
    gs = GridSearchCV(
        pipe,
        {"coxphsurvival__penalizer": [0.01, 100.0]},
        cv=cv,
        scoring=scoring,
        refit="neg_ibs",
        error_score="raise",
    ).fit(X, y)
    # a huge penalty shrinks the model towards the null: worse IBS and AUC
    assert gs.best_params_ == {"coxphsurvival__penalizer": 0.01}
    assert scoring["neg_ibs"](gs, X, y) > -0.25  # a fitted search is unwrapped
    restored = pickle.loads(pickle.dumps(scoring["auc"]))
    assert repr(restored) == repr(scoring["auc"])
    assert "times=[3.0, 6.0, 9.0]" in repr(restored)


def test_test_samples_beyond_training_follow_up_do_not_fail(fitted):
    # scikit-survival raises when a test time exceeds the last training time; the metric
    # does not depend on it (the sample is a control at every evaluation time)
    model, _, ytr, Xte, yte = fitted
    yte = yte.copy()
    yte["time"][0] = ytr["time"].max() + 50.0
    yte["event"][0] = True
    risk = model.predict(Xte)
    with pytest.raises(ValueError):
        sksurv_metrics.cumulative_dynamic_auc(ytr, yte, risk, TIMES)
    moved = yte.copy()
    moved["time"][0] = TIMES[-1] + 1.0
    assert time_dependent_auc(ytr, yte, risk, TIMES)[1] == pytest.approx(
        sksurv_metrics.cumulative_dynamic_auc(ytr, moved, risk, TIMES)[1]
    )
    surv = survival_function_at(model, Xte, TIMES)
    np.testing.assert_allclose(
        brier_score(ytr, yte, surv, TIMES), sksurv_metrics.brier_score(ytr, moved, surv, TIMES)[1]
    )


def test_clear_errors(fitted):
    model, _, ytr, Xte, yte = fitted
    risk = model.predict(Xte)
    with pytest.raises(ValueError, match="within the follow-up of the test samples"):
        time_dependent_auc(ytr, yte, risk, [yte["time"].max() + 1])
    with pytest.raises(ValueError, match="beyond the longest training follow-up"):
        time_dependent_auc(ytr[ytr["time"] < 8], yte, risk, [9.0])
    none = yte.copy()
    none["event"] = False
    with pytest.raises(ValueError, match="no event"):
        time_dependent_auc(ytr, none, risk, TIMES)
    with pytest.raises(ValueError, match="positive times"):
        make_brier_scorer(times=[-1.0])
    with pytest.raises(ValueError, match="censoring must be one of"):
        make_time_dependent_auc_scorer(times=5, censoring="train_fold")
    with pytest.raises(ValueError, match="not risk scores"):
        brier_score(ytr, yte, risk[:, None], [5.0])
    with pytest.raises(ValueError, match="at least two"):
        integrated_brier_score(ytr, yte, survival_function_at(model, Xte, [5.0]), [5.0])
    with pytest.raises(ValueError, match="sample_weight"):
        make_brier_scorer(times=5.0)(model, Xte, yte, sample_weight=np.ones(len(yte)))


class _RiskOnly(BaseEstimator):
    """A survival model that keeps no training target and predicts no survival function."""

    def fit(self, X, y):
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X):
        return np.asarray(X)[:, 0]


def test_missing_training_target_warns_or_raises(fitted):
    _, Xtr, ytr, Xte, yte = fitted
    est = _RiskOnly().fit(Xtr, ytr)
    with pytest.warns(UserWarning, match="test fold's own censoring"):
        auto = make_time_dependent_auc_scorer(times=TIMES)(est, Xte, yte)
    assert auto == pytest.approx(
        make_time_dependent_auc_scorer(times=TIMES, censoring="test")(est, Xte, yte)
    )
    with pytest.raises(ValueError, match="survival_train_"):
        make_time_dependent_auc_scorer(times=TIMES, censoring="train")(est, Xte, yte)
    with pytest.raises(TypeError, match="no predict_survival_function"):
        make_brier_scorer(times=5.0, censoring="test")(est, Xte, yte)


def test_survival_function_at_sksurv_estimators_pipelines_and_searches(fitted):
    linear_model = pytest.importorskip("sksurv.linear_model")
    _, Xtr, ytr, Xte, yte = fitted
    sk = make_pipeline(StandardScaler(), linear_model.CoxPHSurvivalAnalysis(alpha=0.01))
    sk.fit(Xtr, ytr)
    s = survival_function_at(sk, Xte, TIMES)
    fns = sk.predict_survival_function(Xte)
    np.testing.assert_allclose(s, np.vstack([f(TIMES) for f in fns]))
    ours = make_pipeline(StandardScaler(), CoxPHSurvival(penalizer=0.01)).fit(Xtr, ytr)
    np.testing.assert_allclose(survival_function_at(ours, Xte, TIMES), s, atol=0.02)
    gs = GridSearchCV(clone(ours), {"coxphsurvival__penalizer": [0.01]}, cv=2).fit(Xtr, ytr)
    np.testing.assert_allclose(
        survival_function_at(gs, Xte, TIMES), survival_function_at(ours, Xte, TIMES)
    )
    from sklearn.frozen import FrozenEstimator

    np.testing.assert_allclose(
        survival_function_at(FrozenEstimator(ours), Xte, TIMES),
        survival_function_at(ours, Xte, TIMES),
    )
    # scikit-survival's own scorer wrapper keeps the training target: found too
    wrapped = sksurv_metrics.as_cumulative_dynamic_auc_scorer(clone(sk), times=TIMES)
    wrapped.fit(Xtr, ytr)
    ours_scorer = make_time_dependent_auc_scorer(times=TIMES, censoring="train")
    assert ours_scorer(wrapped, Xte, yte) == pytest.approx(wrapped.score(Xte, yte))


def test_brier_before_the_first_test_time_is_defined(fitted):
    # scikit-survival refuses times before the first test time; there every test sample is a
    # control, so BS(t) = mean((1 - S(t | x))**2) / G(t)
    model, _, ytr, Xte, yte = fitted
    t0 = yte["time"].min() * 0.5
    times = np.array([t0, 5.0])
    surv = survival_function_at(model, Xte, times)
    with pytest.raises(ValueError, match="within follow-up"):
        sksurv_metrics.brier_score(ytr, yte, surv, times)
    from sksurv.nonparametric import CensoringDistributionEstimator

    g = CensoringDistributionEstimator().fit(ytr).predict_proba(np.array([t0]))[0]
    bs = brier_score(ytr, yte, surv, times)
    assert bs[0] == pytest.approx(np.mean((1 - surv[:, 0]) ** 2) / g)
    assert bs[1] == pytest.approx(sksurv_metrics.brier_score(ytr, yte, surv[:, 1:], [5.0])[1][0])
    assert integrated_brier_score(ytr, yte, surv, times) == pytest.approx(bs.mean())
