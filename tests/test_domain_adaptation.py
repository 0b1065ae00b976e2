"""skada bridge: site labels to domain codes, CORAL & co. in Pipelines, CV, DA scorers, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from skrtl import (
    DA_ADAPTERS,
    DA_SCORERS,
    ComBatHarmonizer,
    DomainAdapter,
    HarmonizationWarning,
    SiteDAPipeline,
    make_site_da_pipeline,
    make_site_da_scorer,
    mmd_test,
)
from skrtl._domain_adaptation import import_skada

N = 120
FEATURES = [f"f{i}" for i in range(4)]
# site B: the same latent features, scanned with another affine map (scale, mixing, offset)
MIX_B = np.array([[2.0, 0.5, 0, 0], [0, 0.5, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1.0]])
OFF_B = np.array([3.0, -2.0, 1.0, 0.0])
MIX_C = np.array([[0.5, 0, 0, 0], [0.8, 2.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 2.5]])
OFF_C = np.array([-2.0, 1.0, 0.0, 2.0])


def _site(rng, n, mix=None, off=None):
    z = rng.normal(size=(n, 4))
    y = (z[:, 0] + 0.5 * z[:, 1] > 0).astype(int)
    x = z if mix is None else z @ mix + off
    return x, y


def _frame(blocks):
    X = pd.DataFrame(np.vstack([b[0] for b in blocks]), columns=FEATURES)
    X["site"] = np.concatenate([[name] * len(b[0]) for name, b in zip("ABC", blocks)])
    y = np.concatenate([b[1] for b in blocks])
    return X, y


@pytest.fixture
def two_sites():
    rng = np.random.default_rng(0)
    return _frame([_site(rng, N), _site(rng, N, MIX_B, OFF_B)])


@pytest.fixture
def three_sites():
    rng = np.random.default_rng(1)
    return _frame([_site(rng, N), _site(rng, N, MIX_B, OFF_B), _site(rng, N, MIX_C, OFF_C)])


def _cov_gap(a, b):
    return float(np.linalg.norm(np.cov(a, rowvar=False) - np.cov(b, rowvar=False)))


def _acc(model, X, y, site):
    rows = (X["site"] == site).to_numpy()
    return float(np.mean(model.predict(X[rows]) == y[rows]))


def test_import_and_fit_leave_metadata_routing_off(two_sites):
    X, y = two_sites
    assert not sklearn.get_config()["enable_metadata_routing"]
    import_skada()
    DomainAdapter("coral", target_sites="B").fit_transform(X)
    make_site_da_pipeline("coral", LogisticRegression(), target_sites="B").fit(X, y)
    assert not sklearn.get_config()["enable_metadata_routing"]


def test_coral_reduces_the_site_discrepancy(two_sites):
    X, _ = two_sites
    a, b = X[X.site == "A"][FEATURES].to_numpy(), X[X.site == "B"][FEATURES].to_numpy()
    Xa = DomainAdapter("coral", target_sites="B").fit_transform(X)
    a2, b2 = Xa[:N], Xa[N:]
    before = mmd_test(a, b, n_permutations=50, random_state=0)
    after = mmd_test(a2, b2, n_permutations=50, random_state=0)
    assert before.p_value < 0.05
    assert after.statistic < 0.2 * before.statistic
    assert np.linalg.norm(a2.mean(0) - b2.mean(0)) < 0.1 * np.linalg.norm(a.mean(0) - b.mean(0))
    assert _cov_gap(a2, b2) < 0.2 * _cov_gap(a, b)


def test_per_site_aligns_each_source_site(three_sites):
    X, _ = three_sites
    gaps = {}
    for per_site in (True, False):
        da = DomainAdapter("coral", target_sites="B", per_site=per_site)
        Xa = da.fit_transform(X)
        site = X["site"].to_numpy()
        gaps[per_site] = [_cov_gap(Xa[site == s], Xa[site == "B"]) for s in "AC"]
        assert da.source_sites_ == ["A", "C"] and da.target_sites_ == ["B"]
    # pooled sources keep their between-site gap; one adapter per site removes most of it
    assert max(gaps[True]) < min(gaps[False])
    assert np.mean(gaps[True]) < 0.5 * np.mean(gaps[False])
    assert set(DomainAdapter(target_sites="B").fit(X).adapters_) == {"A", "C"}


def test_domain_adapter_in_pipeline_cross_validate_and_set_output(two_sites):
    X, y = two_sites
    pipe = make_pipeline(DomainAdapter("coral", target_sites="B"), LogisticRegression())
    res = cross_validate(pipe, X, y, cv=StratifiedKFold(3, shuffle=True, random_state=0))
    assert np.all(res["test_score"] > 0.75)
    out = DomainAdapter("coral", target_sites="B").set_output(transform="pandas").fit_transform(X)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == FEATURES
    assert out.index.equals(X.index)
    sa = DomainAdapter(import_skada().SubspaceAlignmentAdapter(n_components=2), target_sites="B")
    assert list(sa.fit(X).get_feature_names_out()) == ["subspacealignment0", "subspacealignment1"]


def test_site_column_passed_through_by_a_feature_step(two_sites):
    X, y = two_sites
    # a stand-in for a CNN feature transformer with set_output(transform="pandas"): it returns
    # new feature columns and passes the site column through
    feats = FunctionTransformer(
        lambda df: df.assign(**{c: df[c] * 1.5 for c in FEATURES}), validate=False
    )
    pipe = make_pipeline(feats, make_site_da_pipeline("coral", LogisticRegression()))
    yu = y.copy()
    yu[N:] = -1
    pipe.fit(X, yu)
    assert pipe[-1].target_sites_ == ["B"]
    assert _acc(pipe, X, y, "B") > 0.8


def test_routed_sample_domain_matches_site_column(two_sites):
    X, y = two_sites
    ref = DomainAdapter("coral", target_sites="B").fit_transform(X)
    arr, sites = X[FEATURES].to_numpy(), X["site"].to_numpy()
    with sklearn.config_context(enable_metadata_routing=True):
        da = (
            DomainAdapter("coral", target_sites="B")
            .set_fit_request(sample_domain=True)
            .set_transform_request(sample_domain=True)
        )
        pipe = make_pipeline(da, LogisticRegression())
        pipe.fit(arr, y, sample_domain=sites)
        np.testing.assert_allclose(pipe[0].transform(arr, sample_domain=sites), ref)
        assert pipe.score(arr, y, sample_domain=sites) > 0.75
    with pytest.raises(ValueError, match="disagrees"):
        DomainAdapter(target_sites="B").fit(X, sample_domain=np.r_[sites[1:], sites[:1]])


def test_site_da_pipeline_unlabelled_target_rows(two_sites):
    X, y = two_sites
    labels = np.where(y == 1, "malignant", "benign").astype(object)
    labels[N:] = None  # site B unlabelled
    none = make_site_da_pipeline(StandardScaler(), LogisticRegression(), target_sites="B")
    coral = make_site_da_pipeline(StandardScaler(), "coral", LogisticRegression())
    none.fit(X, np.where(y == 1, "malignant", "benign"))
    coral.fit(X, labels)
    assert coral.target_sites_ == ["B"] and coral.source_sites_ == ["A"]
    assert list(coral.classes_) == ["benign", "malignant"]
    pred = coral.predict(X[X.site == "B"])
    assert set(pred) <= {"benign", "malignant"}
    truth = np.where(y[N:] == 1, "malignant", "benign")
    acc_none, acc_coral = np.mean(none.predict(X[N:]) == truth), np.mean(pred == truth)
    assert acc_coral > acc_none + 0.1
    proba = coral.predict_proba(X.iloc[:5])
    assert proba.shape == (5, 2) and np.allclose(proba.sum(1), 1)


def test_target_sites_hide_the_target_labels(two_sites):
    X, y = two_sites
    y_nan = y.astype(float)
    y_nan[N:] = np.nan
    y_flipped = y.copy()
    y_flipped[N:] = 1 - y_flipped[N:]
    a = make_site_da_pipeline("coral", LogisticRegression(), target_sites="B").fit(X, y)
    b = make_site_da_pipeline("coral", LogisticRegression()).fit(X, y_nan)
    c = make_site_da_pipeline("coral", LogisticRegression(), target_sites=["B"]).fit(X, y_flipped)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X))
    np.testing.assert_allclose(a.predict_proba(X), c.predict_proba(X))
    for per_site in (True, False):  # a label-aware adapter never sees the target labels
        da = DomainAdapter("class_regularizer_ot_mapping", target_sites="B", per_site=per_site)
        np.testing.assert_allclose(da.fit_transform(X, y), da.fit_transform(X, y_flipped))


def test_sample_weight_reaches_the_estimator(two_sites):
    X, y = two_sites
    w = np.where(y == 1, 5.0, 1.0)
    model = make_site_da_pipeline("coral", LogisticRegression(), target_sites="B")
    base = model.fit(X, y).predict_proba(X)
    weighted = model.fit(X, y, sample_weight=w).predict_proba(X)
    assert weighted[:, 1].mean() > base[:, 1].mean() + 0.05


@pytest.mark.parametrize("name", sorted(DA_ADAPTERS))
def test_every_named_adapter_runs(name, two_sites):
    X, y = two_sites
    model = make_site_da_pipeline(StandardScaler(), name, LogisticRegression(), target_sites="B")
    model.fit(X, y)
    assert model.predict(X).shape == (2 * N,)
    if DA_ADAPTERS[name][1] == "reweight":
        with pytest.raises(TypeError, match="reweighting adapter.*make_site_da_pipeline"):
            DomainAdapter(name, target_sites="B").fit(X)
        # the adapter's weights reached the estimator: it differs from the unweighted fit
        plain = make_site_da_pipeline(StandardScaler(), LogisticRegression(), target_sites="B")
        w_coef = model.pipeline_[-1].get_estimator().coef_
        assert not np.allclose(w_coef, plain.fit(X, y).pipeline_[-1].get_estimator().coef_)
    else:
        out = DomainAdapter(name, target_sites="B").fit_transform(X, y)
        assert out.shape[0] == 2 * N and np.isfinite(out).all()


def test_cross_validate_and_grid_search_with_sites(two_sites):
    X, y = two_sites
    model = make_site_da_pipeline(
        StandardScaler(), "coral", LogisticRegression(), target_sites="B"
    )
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    scoring = {"entropy": make_site_da_scorer("prediction_entropy"), "auc": "roc_auc"}
    res = cross_validate(model, X, y, cv=cv, scoring=scoring)
    assert np.isfinite(res["test_entropy"]).all() and np.all(res["test_entropy"] <= 0)
    assert np.all(res["test_auc"] > 0.8)
    grid = GridSearchCV(
        model,
        {"pipeline__coraladapter__reg": [0.01, 1.0]},
        scoring=make_site_da_scorer("importance_weighted"),
        cv=cv,
    ).fit(X, y)
    assert grid.best_params_["pipeline__coraladapter__reg"] in (0.01, 1.0)


def test_with_metadata_routing_switched_on_globally(two_sites):
    X, y = two_sites
    with sklearn.config_context(enable_metadata_routing=True):
        model = make_site_da_pipeline("coral", LogisticRegression(), target_sites="B")
        res = cross_validate(model, X, y, cv=StratifiedKFold(3, shuffle=True, random_state=0))
        assert np.all(res["test_score"] > 0.75)


@pytest.mark.parametrize("name", sorted(DA_SCORERS))
def test_every_da_scorer_scores_site_models(name, two_sites):
    X, y = two_sites
    kwargs = {"random_state": 0} if name in ("deep_embedded_validation", "mixval") else {}
    scorer = make_site_da_scorer(name, **kwargs)
    models = [
        make_site_da_pipeline(StandardScaler(), LogisticRegression(), target_sites="B"),
        make_site_da_pipeline(StandardScaler(), "coral", LogisticRegression(), target_sites="B"),
    ]
    if name != "deep_embedded_validation":  # DEV transforms without domain labels
        models.append(
            make_site_da_pipeline(ComBatHarmonizer(), LogisticRegression(), target_sites="B")
        )
    for model in models:
        model.fit(X, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # skada: constant predictions
            value = scorer(model, X, y)
        assert np.isfinite(value)
    # target labels are never used: the score is the same with them hidden
    y_hidden = y.copy()
    y_hidden[N:] = -1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert scorer(models[1], X, y_hidden) == pytest.approx(scorer(models[1], X, y))


def test_scorer_errors(two_sites):
    X, y = two_sites
    with pytest.raises(ValueError, match="not a known skada DA scorer"):
        make_site_da_scorer("entropy")
    with pytest.raises(TypeError, match="domain-aware"):
        make_site_da_scorer(lambda est, X, y: 0.0)
    plain = make_pipeline(StandardScaler(), LogisticRegression()).fit(X[FEATURES], y)
    with pytest.raises(TypeError, match="make_site_da_pipeline"):
        make_site_da_scorer()(plain, X[FEATURES], y)
    model = make_site_da_pipeline("coral", LogisticRegression(), target_sites="B").fit(X, y)
    with pytest.raises(ValueError, match="only source sites"):
        make_site_da_scorer()(model, X[X.site == "A"], y[:N])


def test_unseen_sites(three_sites):
    X, y = three_sites
    fit_rows = (X.site != "C").to_numpy()
    Xc = X[~fit_rows]
    model = make_site_da_pipeline("coral", LogisticRegression(), target_sites="B")
    model.fit(X[fit_rows], y[fit_rows])
    with pytest.raises(ValueError, match=r"sites \['C'\] were not seen in fit.*unseen='batch'"):
        model.predict(Xc)
    model.set_params(unseen="reference")
    acc_ref = np.mean(model.predict(Xc) == y[~fit_rows])
    model.set_params(unseen="batch")
    with pytest.warns(HarmonizationWarning, match="site 'C' was not seen in fit"):
        acc_batch = np.mean(model.predict(Xc) == y[~fit_rows])
    assert acc_batch > acc_ref + 0.1
    da = DomainAdapter("coral", target_sites="B").fit(X[fit_rows])
    with pytest.raises(ValueError, match="not seen in fit"):
        da.transform(Xc)
    ref = da.set_params(unseen="reference").transform(Xc)
    with pytest.warns(HarmonizationWarning, match="aligned onto the target"):
        batch = da.set_params(unseen="batch").transform(Xc)
    b = DomainAdapter("coral", target_sites="B").fit_transform(X[fit_rows])[N:]
    assert _cov_gap(batch, b) < 0.5 * _cov_gap(ref, b)
    with pytest.raises(ValueError, match="at least 2"):
        da.transform(Xc.iloc[:1])


def test_input_errors(two_sites):
    X, y = two_sites
    with pytest.raises(ValueError, match="needs the site of every row.*site_column='site'"):
        DomainAdapter(target_sites="B").fit(X[FEATURES])
    with pytest.raises(ValueError, match=r"target_sites \['Z'\] are not sites of X.*\['A', 'B'\]"):
        DomainAdapter(target_sites=["Z"]).fit(X)
    with pytest.raises(ValueError, match="found no target site"):
        DomainAdapter().fit(X, y)
    with pytest.raises(ValueError, match="every site of X is a target"):
        DomainAdapter(target_sites=["A", "B"]).fit(X)
    partial = y.astype(float)
    partial[:5] = np.nan
    with pytest.raises(ValueError, match="site 'A' has 5 of 120 rows without a label"):
        make_site_da_pipeline("coral", LogisticRegression()).fit(X, partial)
    with pytest.raises(ValueError, match=r"sites \['A'\].*not in target_sites"):
        make_site_da_pipeline("coral", LogisticRegression(), target_sites="B").fit(X, partial)
    with pytest.raises(ValueError, match="not a known skada adapter name"):
        DomainAdapter("corall", target_sites="B").fit(X)
    with pytest.raises(TypeError, match="must be a skada adapter"):
        DomainAdapter(StandardScaler(), target_sites="B").fit(X)
    with pytest.raises(ValueError, match="not numeric features"):
        DomainAdapter(target_sites="B").fit(X.assign(sex="f"))
    with pytest.raises(ValueError, match="last step .* is an adapter"):
        make_site_da_pipeline(StandardScaler(), "coral")
    with pytest.raises(ValueError, match="missing \\(NaN"):
        DomainAdapter(target_sites="B").fit(X.assign(site=X.site.where(X.index > 0)))
    fitted = DomainAdapter(target_sites="B").fit(X)
    with pytest.raises(ValueError, match="columns of X differ"):
        fitted.transform(X[["f1", "f0", "f2", "f3", "site"]])
    with pytest.warns(UserWarning, match="rows without a label"):
        yu = y.copy()
        yu[N:] = -1
        DomainAdapter().fit(X, yu)


def test_site_da_pipeline_accepts_plain_pipeline(two_sites):
    X, y = two_sites
    skada = import_skada()
    model = SiteDAPipeline(
        make_pipeline(StandardScaler(), skada.CORALAdapter(), LogisticRegression()),
        target_sites="B",
    ).fit(X, y)
    ref = make_site_da_pipeline(StandardScaler(), "coral", LogisticRegression(), target_sites="B")
    np.testing.assert_allclose(model.predict_proba(X), ref.fit(X, y).predict_proba(X))
    assert sklearn.base.is_classifier(model)
    assert model.score(X, y) == pytest.approx(np.mean(model.predict(X) == y))
