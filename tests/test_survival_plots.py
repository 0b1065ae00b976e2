"""Kaplan-Meier risk-group and calibration displays."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from skrtl import (  # noqa: E402
    CoxPHSurvival,
    KaplanMeierDisplay,
    SurvivalCalibrationDisplay,
    make_survival_target,
)

lifelines = pytest.importorskip("lifelines")
from lifelines import KaplanMeierFitter  # noqa: E402
from lifelines.statistics import logrank_test, multivariate_logrank_test  # noqa: E402


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(240, 2)), columns=["a", "b"])
    t_event = rng.exponential(10.0 / np.exp(X["a"].to_numpy()))
    t_cens = rng.uniform(2.0, 30.0, size=240)
    y = make_survival_target(t_event <= t_cens, np.minimum(t_event, t_cens))
    model = CoxPHSurvival(penalizer=0.01).fit(X, y)
    return model, X, y


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_km_median_split_matches_lifelines(data):
    model, X, y = data
    disp = KaplanMeierDisplay.from_estimator(model, X, y, groups="median")
    risk = model.predict(X)
    high = risk > np.median(risk)
    np.testing.assert_array_equal(disp.group, high.astype(int))
    ref = logrank_test(
        y["time"][high], y["time"][~high], y["event"][high], y["event"][~high]
    ).p_value
    assert disp.logrank_p == pytest.approx(ref)
    assert disp.logrank_p < 1e-4  # the model separates the groups
    assert disp.group_labels == ["low risk", "high risk"]
    np.testing.assert_array_equal(disp.n_samples, [120, 120])
    kmf = KaplanMeierFitter().fit(y["time"][high], y["event"][high])
    t, s, lo, hi = disp.curves[1]
    np.testing.assert_allclose(s, kmf.survival_function_at_times(t).to_numpy(), atol=1e-12)
    ci = kmf.confidence_interval_.loc[t]
    np.testing.assert_allclose(lo, ci.iloc[:, 0].to_numpy(), atol=1e-9)
    np.testing.assert_allclose(hi, ci.iloc[:, 1].to_numpy(), atol=1e-9)
    assert disp.figure_ is disp.ax_.figure and len(disp.lines_) == 2
    assert disp.at_risk_ax_ is not None
    # the survival of the high-risk group is below that of the low-risk one
    assert disp.curves[1][1][-1] < disp.curves[0][1][-1]


def test_km_tertiles_cut_points_and_numbers_at_risk(data):
    model, X, y = data
    risk = model.predict(X)
    disp = KaplanMeierDisplay.from_predictions(y, risk, groups="tertiles", at_risk=False)
    assert len(disp.group_labels) == 3 and disp.at_risk_ax_ is None
    np.testing.assert_allclose(disp.cut_points, np.quantile(risk, [1 / 3, 2 / 3]))
    ref = multivariate_logrank_test(y["time"], disp.group, y["event"]).p_value
    assert disp.logrank_p == pytest.approx(ref)
    counts = disp.n_at_risk([0.0, 5.0])
    np.testing.assert_array_equal(counts[:, 0], disp.n_samples)
    g0 = disp.group == 0
    assert counts[0, 1] == int((y["time"][g0] >= 5.0).sum())
    # explicit cut points (e.g. from training risks), own labels, an existing axis
    fig, ax = plt.subplots()
    disp = KaplanMeierDisplay.from_predictions(
        y, risk, cut_points=[0.0], group_labels=["below 0", "above 0"], ax=ax, time_scale=2.0
    )
    assert disp.ax_ is ax
    np.testing.assert_array_equal(disp.group, (risk > 0).astype(int))
    assert disp.lines_[0].get_xdata().max() == pytest.approx(y["time"][risk <= 0].max() / 2)


def test_km_errors_and_empty_groups(data):
    model, X, y = data
    risk = model.predict(X)
    with pytest.raises(ValueError, match="groups must be"):
        KaplanMeierDisplay.from_predictions(y, risk, groups="deciles")
    with pytest.raises(ValueError, match="strictly increasing"):
        KaplanMeierDisplay.from_predictions(y, risk, cut_points=[1.0, 0.0])
    with pytest.raises(ValueError, match="aligned"):
        KaplanMeierDisplay.from_predictions(y, risk[:10])
    with pytest.raises(ValueError, match="group_labels"):
        KaplanMeierDisplay.from_predictions(y, risk, groups=3, group_labels=["a", "b"])
    with pytest.warns(UserWarning, match="empty"):
        disp = KaplanMeierDisplay.from_predictions(y, risk, cut_points=[risk.max() + 1])
    assert np.isnan(disp.logrank_p) and disp.n_samples[1] == 0


def test_calibration_matches_group_kaplan_meier(data):
    model, X, y = data
    disp = SurvivalCalibrationDisplay.from_estimator(model, X, y, horizon=8.0, n_groups=4)
    surv = model.predict_survival_function(X, times=[8.0])[:, 0]
    edges = np.quantile(surv, np.linspace(0, 1, 5))
    group = np.clip(np.searchsorted(edges, surv, side="right") - 1, 0, 3)
    for g in range(4):
        sel = group == g
        assert disp.predicted[g] == pytest.approx(surv[sel].mean())
        kmf = KaplanMeierFitter().fit(y["time"][sel], y["event"][sel])
        assert disp.observed[g] == pytest.approx(float(kmf.predict(8.0)))
        assert disp.observed_lower[g] <= disp.observed[g] <= disp.observed_upper[g]
    assert disp.n_samples.sum() == len(y)
    # in-sample, a correctly specified Cox model is well calibrated
    assert disp.calibration_error < 0.08
    assert np.corrcoef(disp.predicted, disp.observed)[0, 1] > 0.9
    assert disp.ax_.get_xlim() == (0.0, 1.0)


def test_calibration_errors_and_short_follow_up(data):
    model, X, y = data
    surv = model.predict_survival_function(X, times=[8.0])[:, 0]
    with pytest.raises(ValueError, match="not risk scores"):
        SurvivalCalibrationDisplay.from_predictions(y, model.predict(X), horizon=8.0)
    with pytest.raises(ValueError, match="horizon"):
        SurvivalCalibrationDisplay.from_predictions(y, surv, horizon=-1)
    with pytest.raises(ValueError, match="n_groups"):
        SurvivalCalibrationDisplay.from_predictions(y, surv, horizon=8.0, n_groups=0)
    with pytest.warns(UserWarning, match="no follow-up up to horizon"):
        disp = SurvivalCalibrationDisplay.from_predictions(y, surv, horizon=1e6, n_groups=3)
    assert np.isnan(disp.observed).any()


def test_calibration_of_two_models_on_one_axis_draws_one_diagonal(data):
    model, X, y = data
    fig, ax = plt.subplots()
    surv = model.predict_survival_function(X, times=[8.0])[:, 0]
    SurvivalCalibrationDisplay.from_predictions(y, surv, horizon=8.0, name="cox", ax=ax)
    disp = SurvivalCalibrationDisplay.from_predictions(
        y, np.clip(surv * 0.8, 0, 1), horizon=8.0, name="shrunk", ax=ax, time_label="8 months"
    )
    labels = ax.get_legend_handles_labels()[1]
    assert labels.count("perfectly calibrated") == 1 and len(labels) == 3
    assert disp.ax_.get_xlabel() == "predicted survival at 8 months"
    # predictions shrunk towards 0 are miscalibrated: larger error than the model's own
    assert disp.calibration_error > 0.05
