"""Survival fusion pipelines (feature groups) and the risk-averaging ensemble."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from skrtl import (
    CoxPHSurvival,
    SurvivalEnsemble,
    concordance_index,
    cox_score_test,
    make_brier_scorer,
    make_survival_fusion,
    make_survival_target,
    make_time_dependent_auc_scorer,
    survival_function_at,
)

lifelines = pytest.importorskip("lifelines")


@pytest.fixture(scope="module")
def cohort():
    """Clinical (2, one with gaps), radiomics (30, 2 informative), deep (40, 1 informative)."""
    rng = np.random.default_rng(0)
    n = 150
    clin = pd.DataFrame({"age": rng.normal(65, 8, n), "stage": rng.integers(1, 5, n)})
    rad = pd.DataFrame(rng.normal(size=(n, 30)), columns=[f"rad{i}" for i in range(30)])
    deep = pd.DataFrame(rng.normal(size=(n, 40)), columns=[f"deep{i}" for i in range(40)])
    lp = 0.5 * clin["stage"] + rad["rad0"] - 0.8 * rad["rad1"] + 0.7 * deep["deep3"]
    t_event = rng.exponential(20.0 / np.exp(lp))
    t_cens = rng.uniform(5, 60, n)
    y = make_survival_target(t_event <= t_cens, np.minimum(t_event, t_cens))
    X = pd.concat([clin, rad, deep], axis=1)
    X.loc[::10, "age"] = np.nan
    groups = {"clinical": list(clin.columns), "radiomics": list(rad.columns)}
    groups["deep"] = list(deep.columns)
    return X, y, groups


def test_fusion_pipeline_structure_and_selection_inside_folds(cohort):
    X, y, groups = cohort
    model = make_survival_fusion(groups, k={"radiomics": 2, "deep": 1}, penalizer=0.05)
    assert isinstance(model, Pipeline) and list(model.named_steps) == ["features", "model"]
    params = model.get_params()
    assert params["features__clinical__select__k"] == "all"  # not named in k: kept whole
    assert params["features__radiomics__select__k"] == 2
    assert params["model__penalizer"] == 0.05
    train = np.arange(100)
    fitted = clone(model).fit(X.iloc[train], y[train])
    names = list(fitted[:-1].get_feature_names_out())
    assert names[:2] == ["clinical__age", "clinical__stage"]
    assert set(names[2:]) == {"radiomics__rad0", "radiomics__rad1", "deep__deep3"}
    # the selection scores come from the training rows only (imputed, scaled)
    sel = fitted.named_steps["features"].named_transformers_["radiomics"].named_steps["select"]
    Z = StandardScaler().fit_transform(X.iloc[train][groups["radiomics"]])
    np.testing.assert_allclose(sel.scores_, cox_score_test(Z, y[train])[0], rtol=1e-10)
    c = concordance_index(y[100:], fitted.predict(X.iloc[100:]))
    assert c > 0.7


def test_fusion_in_grid_search_and_cross_validate(cohort):
    X, y, groups = cohort
    model = make_survival_fusion(groups, k=5)
    gs = GridSearchCV(
        model,
        {"features__radiomics__select__k": [0, 2], "model__penalizer": [0.1, 10.0]},
        cv=KFold(3, shuffle=True, random_state=0),
        error_score="raise",
    ).fit(X, y)
    assert gs.best_params_["features__radiomics__select__k"] == 2
    res = cross_validate(
        clone(model),
        X,
        y,
        cv=KFold(3, shuffle=True, random_state=1),
        scoring={
            "auc": make_time_dependent_auc_scorer(times=[5.0, 10.0]),
            "neg_ibs": make_brier_scorer(times=np.linspace(2, 20, 10)),
        },
        error_score="raise",
    )
    assert np.all(res["test_auc"] > 0.65) and np.all(res["test_neg_ibs"] > -0.25)
    restored = pickle.loads(pickle.dumps(gs.best_estimator_))
    np.testing.assert_allclose(restored.predict(X), gs.predict(X))


def test_fusion_with_another_final_estimator_and_errors(cohort):
    X, y, groups = cohort
    model = make_survival_fusion(groups, k=3, estimator=make_pipeline(PCA(3), CoxPHSurvival()))
    assert model.fit(X, y).score(X, y) > 0.6
    with pytest.raises(ValueError, match="with estimator= set them"):
        make_survival_fusion(groups, penalizer=1.0, estimator=CoxPHSurvival())
    with pytest.raises(ValueError, match="non-empty dict"):
        make_survival_fusion([("a", ["x"])])
    with pytest.raises(ValueError, match="without '__'"):
        make_survival_fusion({"a__b": ["age"]})
    with pytest.raises(ValueError, match="not in groups"):
        make_survival_fusion(groups, k={"radiomic": 3})
    with pytest.raises(ValueError, match="non-negative int"):
        make_survival_fusion(groups, k=-1)
    with pytest.raises(ValueError, match="impute"):
        make_survival_fusion(groups, impute="zero")
    with pytest.raises(ValueError, match="redundancy names groups"):
        make_survival_fusion(groups, redundancy={"radiomic": 0.9})


def test_fusion_reduces_redundant_copies_before_selection(cohort):
    X, y, groups = cohort
    rng = np.random.default_rng(1)
    X = X.copy()
    copies = [f"rad0_copy{i}" for i in range(5)]
    for c in copies:  # near-copies of the strongest radiomic feature
        X[c] = X["rad0"] + 0.01 * rng.normal(size=len(X))
    groups = dict(groups, radiomics=groups["radiomics"] + copies)
    plain = make_survival_fusion(groups, k={"radiomics": 3, "deep": 1}).fit(X, y)
    reduced = make_survival_fusion(
        groups, k={"radiomics": 3, "deep": 1}, redundancy={"radiomics": 0.9}
    ).fit(X, y)
    names = lambda m: m[:-1].get_feature_names_out()  # noqa: E731
    picked_plain = [n for n in names(plain) if n.startswith("radiomics__rad0")]
    picked = [n for n in names(reduced) if n.startswith("radiomics__rad")]
    assert len(picked_plain) == 3  # the selection spends k on copies of rad0
    assert len([n for n in picked if n.startswith("radiomics__rad0")]) == 1
    assert "radiomics__rad1" in picked  # the second signal is found once copies are merged
    chain = reduced.named_steps["features"].named_transformers_["radiomics"]
    assert [s for s, _ in chain.steps] == ["impute", "variance", "reduce", "scale", "select"]
    assert reduced.get_params()["features__radiomics__reduce__threshold"] == 0.9


def test_ensemble_rank_average_equals_definition(cohort):
    X, y, groups = cohort
    a = make_survival_fusion(groups, k=2, penalizer=0.1)
    b = make_pipeline(StandardScaler(), PCA(5), CoxPHSurvival(penalizer=0.1))
    X = X.fillna(X.mean())
    ens = SurvivalEnsemble([("fusion", a), ("pca", b)]).fit(X.iloc[:100], y[:100])
    ra, rb = (clone(m).fit(X.iloc[:100], y[:100]) for m in (a, b))

    def pct(model, Xq):  # mid-rank percentile among the training risks, interpolated
        ref = np.sort(model.predict(X.iloc[:100]))
        return np.interp(model.predict(Xq), ref, (np.arange(100) + 0.5) / 100)

    Xte = X.iloc[100:]
    expected = 0.5 * pct(ra, Xte) + 0.5 * pct(rb, Xte)
    np.testing.assert_allclose(ens.predict(Xte), expected)
    assert np.all((ens.predict(Xte) >= 0) & (ens.predict(Xte) <= 1))
    # at the training risks the percentile is the mid-rank (ties share it)
    ref = np.array([1.0, 2.0, 2.0, 5.0])
    from skrtl._survival_fusion import _training_percentile

    np.testing.assert_allclose(
        _training_percentile(ref, np.array([0.0, 1.0, 2.0, 3.5, 5.0, 9.0])),
        [0.125, 0.125, 0.5, 0.6875, 0.875, 0.875],
    )
    z = SurvivalEnsemble([("fusion", a), ("pca", b)], combine="zscore", weights=[3, 1])
    z.fit(X.iloc[:100], y[:100])
    za = (ra.predict(Xte) - ra.predict(X.iloc[:100]).mean()) / ra.predict(X.iloc[:100]).std()
    zb = (rb.predict(Xte) - rb.predict(X.iloc[:100]).mean()) / rb.predict(X.iloc[:100]).std()
    np.testing.assert_allclose(z.predict(Xte), 0.75 * za + 0.25 * zb)
    # survival functions are averaged; the training target is kept for the IPCW scorers
    s = ens.predict_survival_function(Xte, times=[5.0, 10.0])
    np.testing.assert_allclose(
        s,
        0.5 * survival_function_at(ra, Xte, [5, 10])
        + 0.5 * survival_function_at(rb, Xte, [5, 10]),
    )
    np.testing.assert_array_equal(ens.survival_train_, y[:100])
    assert ens.n_features_in_ == X.shape[1]
    assert ens.score(Xte, y[100:]) == concordance_index(y[100:], ens.predict(Xte))


def test_ensemble_params_clone_and_nested_search(cohort):
    X, y, groups = cohort
    X = X.fillna(X.mean())
    ens = SurvivalEnsemble(
        [
            ("cox", make_survival_fusion(groups, k=2)),
            ("pca", make_pipeline(StandardScaler(), PCA(3), CoxPHSurvival(penalizer=0.1))),
        ]
    )
    assert ens.get_params()["cox__model__penalizer"] == 0.1
    ens.set_params(pca__pca__n_components=2)
    assert clone(ens).get_params()["pca__pca__n_components"] == 2
    gs = GridSearchCV(ens, {"cox__features__radiomics__select__k": [0, 2]}, cv=3).fit(X, y)
    assert gs.best_params_ == {"cox__features__radiomics__select__k": 2}
    # a member can itself be a search (nested tuning inside each training fold)
    inner = GridSearchCV(make_survival_fusion(groups, k=2), {"model__penalizer": [0.1, 1.0]}, cv=3)
    ens2 = SurvivalEnsemble([("tuned", inner), ("pca", ens.estimators[1][1])]).fit(X, y)
    assert ens2.named_estimators_["tuned"].best_params_["model__penalizer"] in (0.1, 1.0)
    np.testing.assert_allclose(
        pickle.loads(pickle.dumps(ens2)).predict(X.iloc[:5]), ens2.predict(X.iloc[:5])
    )


def test_ensemble_errors(cohort):
    X, y, _ = cohort
    X = X.fillna(0.0)
    with pytest.raises(ValueError, match="non-empty"):
        SurvivalEnsemble([]).fit(X, y)
    with pytest.raises(ValueError, match="weights"):
        SurvivalEnsemble([("a", CoxPHSurvival(penalizer=1.0))], weights=[1, 2]).fit(X, y)
    with pytest.raises(ValueError, match="combine"):
        SurvivalEnsemble([("a", CoxPHSurvival())], combine="median").fit(X, y)
    with pytest.raises(ValueError, match="unique"):
        SurvivalEnsemble([("a", CoxPHSurvival()), ("a", CoxPHSurvival())]).fit(X, y)


def _as_survival(y):
    if y is None or getattr(np.asarray(y).dtype, "names", None):
        return y
    t = np.asarray(y, dtype=float).ravel()
    return make_survival_target(np.ones(t.size, bool), 1.0 + t - t.min())


class _EnsembleForChecks(SurvivalEnsemble):
    """SurvivalEnsemble behind a y-adapter so that sklearn's generic checks can run."""

    def fit(self, X, y=None):
        return super().fit(X, _as_survival(y))

    def score(self, X, y):
        return super().score(X, _as_survival(y))


@parametrize_with_checks(
    [
        _EnsembleForChecks(
            [("a", CoxPHSurvival(penalizer=0.1)), ("b", CoxPHSurvival(penalizer=1.0))]
        )
    ]
)
def test_sklearn_checks_with_survival_targets(estimator, check):
    check(estimator)
