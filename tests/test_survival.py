"""Cox model, C-index scorers and survival feature selection."""

from __future__ import annotations

import importlib.util
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import VarianceThreshold
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from skrtl import (
    CoxPHSurvival,
    SelectKBestSurvival,
    concordance_index,
    concordance_scorer,
    cox_score_test,
    kaplan_meier,
    make_concordance_scorer,
    make_survival_target,
)

lifelines = pytest.importorskip("lifelines")
from lifelines import CoxPHFitter, KaplanMeierFitter  # noqa: E402
from lifelines.datasets import load_rossi  # noqa: E402
from lifelines.utils import concordance_index as lifelines_cindex  # noqa: E402

DATA_DIR = Path(
    os.environ.get(
        "SKRTL_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
)


@pytest.fixture(scope="module")
def rossi():
    df = load_rossi()
    y = make_survival_target(df["arrest"], df["week"])
    X = df.drop(columns=["arrest", "week"])
    return df, X, y


def _synthetic(n=120, p=5, seed=0, censor=True):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    beta = np.zeros(p)
    beta[:2] = [1.0, -0.7]
    t_event = rng.exponential(1.0 / np.exp(X @ beta))
    if censor:
        t_cens = rng.exponential(1.5, size=n)
        time = np.minimum(t_event, t_cens)
        event = t_event <= t_cens
    else:
        time, event = t_event, np.ones(n, bool)
    return X, make_survival_target(event, time)


def _brute_cindex(time, event, risk, w_row=None):
    num = den = 0.0
    n = len(time)
    w_row = np.ones(n) if w_row is None else w_row
    for i in range(n):
        if not event[i]:
            continue
        for j in range(n):
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                den += w_row[i]
                num += w_row[i] * (1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0)
    return num / den


# ------------------------------------------------------------------------------- targets
def test_make_survival_target_layout_and_errors():
    y = make_survival_target([1, 0, 1], [3, 4.5, 1])
    assert y.dtype.names == ("event", "time")
    assert y["event"].dtype == bool and y["time"].dtype == float
    np.testing.assert_array_equal(y["event"], [True, False, True])
    with pytest.raises(ValueError, match="0/1"):
        make_survival_target([2, 0], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        make_survival_target([1, 0], [1, np.nan])
    with pytest.raises(ValueError, match="aligned"):
        make_survival_target([1, 0, 1], [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        make_survival_target([1, 0], [1, -2])


def test_plain_y_is_rejected_with_hint(rossi):
    _, X, y = rossi
    with pytest.raises(ValueError, match="make_survival_target"):
        CoxPHSurvival().fit(X, y["time"])


# ------------------------------------------------------------------------------- C-index
def test_harrell_matches_lifelines_and_brute_force():
    rng = np.random.default_rng(1)
    time = rng.integers(1, 15, size=60).astype(float)  # many tied times
    event = rng.random(60) < 0.6
    risk = rng.integers(0, 6, size=60).astype(float)  # many tied risks
    y = make_survival_target(event, time)
    c = concordance_index(y, risk)
    assert c == pytest.approx(lifelines_cindex(time, -risk, event), abs=1e-12)
    assert c == pytest.approx(_brute_cindex(time, event, risk), abs=1e-12)


def test_cindex_sign_convention():
    X, y = _synthetic(censor=False)
    risk = -y["time"]  # shorter time = higher risk -> perfect
    assert concordance_index(y, risk) == 1.0
    assert concordance_index(y, y["time"]) == 0.0


def test_uno_equals_harrell_without_censoring_and_matches_brute_force():
    X, y = _synthetic(censor=False, seed=3)
    risk = X[:, 0]
    assert concordance_index(y, risk, method="uno") == pytest.approx(concordance_index(y, risk))
    X, y = _synthetic(seed=4)
    risk = X[:, 0] - X[:, 1]
    t, e = y["time"], y["event"]
    gt, gs = kaplan_meier(t, ~e)
    g_left = np.array([gs[np.searchsorted(gt, ti) - 1] if ti > gt[0] else 1.0 for ti in t])
    expected = _brute_cindex(t, e, risk, w_row=1.0 / g_left**2)
    assert concordance_index(y, risk, method="uno") == pytest.approx(expected, abs=1e-12)
    assert concordance_index(y, risk, method="uno") != pytest.approx(concordance_index(y, risk))


def test_kaplan_meier_matches_lifelines():
    X, y = _synthetic(seed=5)
    t, s = kaplan_meier(y["time"], y["event"])
    km = KaplanMeierFitter().fit(y["time"], y["event"])
    ref = km.survival_function_at_times(t).to_numpy()
    np.testing.assert_allclose(s, ref, atol=1e-12)


def test_cindex_errors():
    y = make_survival_target([0, 0, 0], [1, 2, 3])
    with pytest.raises(ValueError, match="No comparable pairs"):
        concordance_index(y, [1, 2, 3])
    y = make_survival_target([1, 0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        concordance_index(y, [1, np.nan, 3])
    with pytest.raises(ValueError, match="harrell"):
        concordance_index(y, [1, 2, 3], method="somers")


def test_sample_weight_equals_repetition():
    X, y = _synthetic(n=40, seed=6)
    risk = X[:, 0]
    w = np.random.default_rng(0).integers(1, 4, size=40)
    rep = np.repeat(np.arange(40), w)
    assert concordance_index(y, risk, sample_weight=w) == pytest.approx(
        concordance_index(y[rep], risk[rep]), abs=1e-12
    )


# ------------------------------------------------------------------------------- Cox model
@pytest.mark.parametrize("penalizer,l1_ratio", [(0.0, 0.0), (0.1, 0.0), (0.05, 0.5)])
def test_cox_equals_lifelines_on_rossi(rossi, penalizer, l1_ratio):
    df, X, y = rossi
    ref = CoxPHFitter(penalizer=penalizer, l1_ratio=l1_ratio).fit(df, "week", "arrest")
    model = CoxPHSurvival(penalizer=penalizer, l1_ratio=l1_ratio).fit(X, y)
    np.testing.assert_allclose(model.coef_, ref.params_.to_numpy(), atol=1e-6)
    assert model.concordance_index_ == ref.concordance_index_
    assert model.score(X, y) == ref.concordance_index_
    np.testing.assert_allclose(
        model.predict(X), ref.predict_log_partial_hazard(df).to_numpy(), atol=1e-8
    )
    sf = ref.predict_survival_function(df.iloc[:7])
    np.testing.assert_allclose(
        model.predict_survival_function(X.iloc[:7], times=sf.index.to_numpy()),
        sf.to_numpy().T,
        atol=1e-10,
    )
    assert list(model.feature_names_in_) == list(X.columns)


def test_predict_survival_function_shape_and_monotone(rossi):
    _, X, y = rossi
    model = CoxPHSurvival().fit(X, y)
    s = model.predict_survival_function(X.iloc[:4])
    assert s.shape == (4, model.event_times_.size)
    assert np.all(np.diff(s, axis=1) <= 0) and np.all((s > 0) & (s <= 1))
    s0 = model.predict_survival_function(X.iloc[:2], times=[0.0, 1e6])
    np.testing.assert_allclose(s0[:, 0], 1.0)
    h = model.predict_partial_hazard(X.iloc[:3])
    np.testing.assert_allclose(h, np.exp(model.predict(X.iloc[:3])))


def test_clone_pickle_gridsearch_cross_val(rossi):
    _, X, y = rossi
    pipe = make_pipeline(StandardScaler(), CoxPHSurvival())
    assert clone(pipe).get_params()["coxphsurvival__penalizer"] == 0.0
    scores = cross_val_score(pipe, X, y, cv=KFold(3, shuffle=True, random_state=0))
    assert scores.shape == (3,) and np.all((scores > 0.5) & (scores < 0.8))
    gs = GridSearchCV(
        pipe, {"coxphsurvival__penalizer": [0.01, 1.0]}, cv=3, scoring=concordance_scorer
    ).fit(X, y)
    assert gs.best_params_["coxphsurvival__penalizer"] in (0.01, 1.0)
    res = cross_validate(
        pipe,
        X,
        y,
        cv=3,
        scoring={"harrell": concordance_scorer, "uno": make_concordance_scorer("uno", tau=40)},
    )
    assert np.all(res["test_harrell"] > 0.5) and np.all(res["test_uno"] > 0.5)
    # the default score and the Harrell scorer agree
    np.testing.assert_allclose(res["test_harrell"], cross_val_score(pipe, X, y, cv=3))
    model = pickle.loads(pickle.dumps(gs.best_estimator_))
    np.testing.assert_allclose(model.predict(X), gs.predict(X))


def test_uno_scorer_uses_training_censoring():
    X, y = _synthetic(n=200, seed=7)
    model = CoxPHSurvival().fit(X[:150], y[:150])
    uno_train = make_concordance_scorer("uno")(model, X[150:], y[150:])
    uno_test = make_concordance_scorer("uno", censoring="test")(model, X[150:], y[150:])
    risk = model.predict(X[150:])
    assert uno_train == pytest.approx(
        concordance_index(y[150:], risk, method="uno", y_train=y[:150])
    )
    assert uno_test == pytest.approx(concordance_index(y[150:], risk, method="uno"))
    with pytest.raises(ValueError, match="method"):
        make_concordance_scorer("brier")


def test_constant_feature_is_ignored_not_fatal(rossi):
    _, X, y = rossi
    Xc = X.assign(const=1.0)
    model = CoxPHSurvival().fit(Xc, y)
    assert model.coef_[-1] == 0.0
    np.testing.assert_allclose(model.coef_[:-1], CoxPHSurvival().fit(X, y).coef_, atol=1e-10)


def test_clear_errors(rossi):
    _, X, y = rossi
    with pytest.raises(ValueError, match="features >= events"):
        rng = np.random.default_rng(0)
        CoxPHSurvival().fit(rng.normal(size=(20, 15)), y[:20])
    with pytest.raises(ValueError, match="no event"):
        CoxPHSurvival().fit(X[:5], make_survival_target([0] * 5, [1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="strictly positive"):
        CoxPHSurvival().fit(X[:5], make_survival_target([1] * 5, [0, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="l1_ratio"):
        CoxPHSurvival(l1_ratio=2.0).fit(X, y)
    with pytest.raises(ValueError, match="NaN"):
        CoxPHSurvival().fit(X.assign(age=np.nan), y)
    model = CoxPHSurvival().fit(X, y)
    with pytest.raises(ValueError, match="features"):
        model.predict(X.iloc[:, :3].to_numpy())


def test_wide_correlated_features_converge_with_penalty():
    # 60 samples, 400 highly correlated "deep" features (5 latent factors)
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(60, 5))
    X = Z @ rng.normal(size=(5, 400)) + 0.05 * rng.normal(size=(60, 400))
    t = rng.exponential(1.0 / np.exp(Z[:, 0]))
    y = make_survival_target(np.ones(60, bool), t)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=RuntimeWarning)
        model = CoxPHSurvival(penalizer=1.0).fit(X, y)
    assert np.isfinite(model.coef_).all() and model.concordance_index_ > 0.6
    # guidance pipelines: univariate selection or PCA before the model
    for reducer in (SelectKBestSurvival(k=10), PCA(n_components=5)):
        pipe = make_pipeline(
            VarianceThreshold(), StandardScaler(), reducer, CoxPHSurvival(penalizer=0.1)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", category=ConvergenceWarning)
            s = cross_val_score(pipe, X, y, cv=3, error_score="raise")
        assert np.all(s > 0.55)


# ------------------------------------------------------------------------------- selection
def _breslow_score_test(x, time, event):
    U = I = 0.0
    for i in np.flatnonzero(event):
        r = time >= time[i]
        m = x[r].mean()
        U += x[i] - m
        I += ((x[r] - m) ** 2).mean()
    return U**2 / I


def test_cox_score_test_matches_definition():
    X, y = _synthetic(n=50, p=3, seed=8)
    X[:, 2] = np.round(X[:, 2])  # ties in x
    y["time"] = np.round(y["time"], 1)  # ties in time
    stat, p = cox_score_test(X, y)
    for j in range(3):
        assert stat[j] == pytest.approx(_breslow_score_test(X[:, j], y["time"], y["event"]))
    assert np.all((p >= 0) & (p <= 1))
    assert stat[0] > stat[2]


@pytest.mark.parametrize("score_func", ["cox", "concordance"])
def test_select_k_best_survival_finds_signal(score_func):
    X, y = _synthetic(n=150, p=20, seed=9)
    sel = SelectKBestSurvival(k=2, score_func=score_func).fit(X, y)
    assert set(np.flatnonzero(sel.get_support())) == {0, 1}
    assert sel.transform(X).shape == (150, 2)
    names = sel.get_feature_names_out([f"f{i}" for i in range(20)])
    assert list(names) == ["f0", "f1"]
    if score_func == "concordance":
        c = concordance_index(y, X[:, 0])
        assert sel.scores_[0] == pytest.approx(abs(c - 0.5))


def test_select_k_best_survival_k_all_and_too_large():
    X, y = _synthetic(n=40, p=4, seed=10)
    assert SelectKBestSurvival(k="all").fit(X, y).transform(X).shape == (40, 4)
    with pytest.warns(UserWarning, match="greater than n_features"):
        assert SelectKBestSurvival(k=9).fit(X, y).transform(X).shape == (40, 4)
    sel = SelectKBestSurvival(score_func=lambda X, y: np.arange(X.shape[1]), k=1).fit(X, y)
    assert sel.get_support().tolist() == [False, False, False, True]
    out = (
        SelectKBestSurvival(k=2)
        .set_output(transform="pandas")
        .fit_transform(pd.DataFrame(X, columns=list("abcd")), y)
    )
    assert isinstance(out, pd.DataFrame) and out.shape == (40, 2)


# ------------------------------------------------------------------------------- real data
def test_lung1_penalized_pipeline_runs_on_real_features():
    path = DATA_DIR / "lung1_pyradiomics_gtv1_survival.csv.gz"
    if not path.is_file():
        pytest.skip(f"real data not found at {path}")
    df = pd.read_csv(path)
    feats = [c for c in df.columns if c.startswith(("original_", "log-", "wavelet-"))]
    assert len(feats) > 1000
    y = make_survival_target(df["deadstatus.event"], df["Survival.time"])
    X = df[feats].to_numpy(float)
    pipe = make_pipeline(
        VarianceThreshold(),
        StandardScaler(),
        SelectKBestSurvival(k=10),
        CoxPHSurvival(penalizer=0.1),
    )
    s = cross_val_score(pipe, X, y, cv=KFold(3, shuffle=True, random_state=0))
    assert np.all((s > 0.45) & (s < 0.85))


def test_zero_sample_weight_equals_dropping(rossi):
    _, X, y = rossi
    w = np.ones(len(y))
    w[:40] = 0.0
    a = CoxPHSurvival().fit(X, y, sample_weight=w)
    b = CoxPHSurvival().fit(X.iloc[40:], y[40:])
    np.testing.assert_allclose(a.coef_, b.coef_, atol=1e-8)
    with pytest.raises(ValueError, match="non-zero"):
        CoxPHSurvival().fit(X, y, sample_weight=np.zeros(len(y)))


# ------------------------------------------------------------------------------- deep features
@pytest.mark.skipif(
    importlib.util.find_spec("skrtl._features") is None,
    reason="skrtl._features (PretrainedCNNFeatures) not available",
)
def test_cross_validated_deep_feature_survival_pipeline_runs_end_to_end():
    from skrtl._features import PretrainedCNNFeatures
    from skrtl.datasets import make_lesion_phantom

    data = make_lesion_phantom(60, image_size=32, n_sites=2, random_state=0)
    pipe = make_pipeline(
        PretrainedCNNFeatures(input_size=32, batch_size=16),  # 1280 correlated features
        VarianceThreshold(),
        StandardScaler(),
        PCA(n_components=5),
        CoxPHSurvival(penalizer=0.1),
    )
    res = cross_validate(
        pipe,
        data.frame,
        data.survival,
        cv=KFold(3, shuffle=True, random_state=0),
        scoring={"harrell": concordance_scorer, "uno": make_concordance_scorer("uno")},
        error_score="raise",
    )
    assert np.all(np.isfinite(res["test_harrell"])) and np.all(np.isfinite(res["test_uno"]))
    assert np.all((res["test_harrell"] > 0) & (res["test_harrell"] < 1))


# ------------------------------------------------------------------------------- sklearn checks
def _as_survival(y):
    """Map the numeric targets of sklearn's checks to uncensored survival times > 0."""
    if y is None or getattr(np.asarray(y).dtype, "names", None):
        return y
    t = np.asarray(y, dtype=float).ravel()
    return make_survival_target(np.ones(t.size, bool), 1.0 + t - t.min())


class _CoxForChecks(CoxPHSurvival):
    """CoxPHSurvival behind a y-adapter so that sklearn's generic checks can run."""

    def fit(self, X, y=None, sample_weight=None):
        return super().fit(X, _as_survival(y), sample_weight=sample_weight)

    def score(self, X, y, sample_weight=None):
        return super().score(X, _as_survival(y), sample_weight=sample_weight)


class _SelectForChecks(SelectKBestSurvival):
    def fit(self, X, y=None):
        return super().fit(X, _as_survival(y))


@parametrize_with_checks(
    [_CoxForChecks(penalizer=0.1), _SelectForChecks(k=2)],
    expected_failed_checks=lambda est: (
        {
            "check_sample_weight_equivalence_on_dense_data": (
                "lifelines' weighted Efron partial likelihood treats a weight-k sample "
                "differently from k tied copies (case weights, not repetition counts)"
            )
        }
        if isinstance(est, CoxPHSurvival)
        else {}
    ),
)
def test_sklearn_checks_with_survival_targets(estimator, check):
    check(estimator)
