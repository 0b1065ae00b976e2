"""Tests of the feature-level ComBat harmonizer."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_validate
from sklearn.pipeline import make_pipeline

from skrtl._combat import ComBatHarmonizer, ComBatWarning

P = 6


def _data(seed=0, n=(20, 16, 12)):
    rng = np.random.default_rng(seed)
    site = np.repeat(["a", "b", "c"], n)
    N = site.size
    age = rng.integers(30, 80, N).astype(float)
    sex = rng.choice(["F", "M"], N)
    X = rng.normal(size=(N, P)) + 0.05 * age[:, None]
    X += (site == "b")[:, None] * 1.5 - (site == "c")[:, None] * 1.0
    X[site == "c"] *= 2.5
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(P)])
    df["site"] = site
    df["age"] = age
    df["sex"] = sex
    return df


OPTIONS = [
    {},
    {"parametric": False},
    {"mean_only": True},
    {"eb": False},
    {"mean_only": True, "parametric": False},
]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("with_covariates", [False, True])
def test_agrees_with_neurocombat(opts, with_covariates):
    neuro = pytest.importorskip("neuroCombat")
    df = _data()
    X = df[[f"f{i}" for i in range(P)]].to_numpy()
    covars = df[["site", "age", "sex"]].rename(columns={"site": "batch"})
    with contextlib.redirect_stdout(io.StringIO()):
        ref = neuro.neuroCombat(
            X.T.copy(),
            covars,
            "batch",
            categorical_cols=["sex"] if with_covariates else None,
            continuous_cols=["age"] if with_covariates else None,
            **opts,
        )["data"].T
    cov = ["age", "sex"] if with_covariates else None
    inp = df if with_covariates else df.drop(columns=["age", "sex"])
    out = ComBatHarmonizer(covariates=cov, **opts).fit_transform(inp)[:, :P].astype(float)
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)


def test_removes_site_location_and_scale():
    df = _data(n=(60, 60, 60)).drop(columns=["age", "sex"])
    out = ComBatHarmonizer().fit_transform(df)
    site = df["site"].to_numpy()
    means = np.array([out[site == s].mean(0) for s in "abc"])
    stds = np.array([out[site == s].std(0) for s in "abc"])
    raw_means = np.array([df.iloc[:, :P].to_numpy()[site == s].mean(0) for s in "abc"])
    assert np.ptp(means, axis=0).max() < 0.35 * np.ptp(raw_means, axis=0).min()
    assert np.all(stds.max(0) / stds.min(0) < 1.5)


def test_covariate_effect_is_preserved():
    df = _data(n=(60, 60, 60))
    h = ComBatHarmonizer(covariates=["age", "sex"]).fit(df)
    out = h.transform(df)
    # covariates are passed through unchanged after the features
    assert out.shape == (len(df), P + 2)
    np.testing.assert_array_equal(out[:, P].astype(float), df["age"].to_numpy())
    slope = np.polyfit(df["age"], out[:, 0].astype(float), 1)[0]
    assert slope == pytest.approx(0.05, abs=0.02)
    assert h.beta_covariates_.shape == (2, P)


def test_transform_of_training_rows_equals_fit_transform_and_is_rowwise():
    df = _data().drop(columns=["age", "sex"])
    h = ComBatHarmonizer()
    full = h.fit_transform(df)
    np.testing.assert_allclose(h.transform(df), full)
    # each row is transformed independently of the other rows of the batch
    np.testing.assert_allclose(h.transform(df.iloc[[5, 30, 44]]), full[[5, 30, 44]])


def test_no_leakage_estimates_depend_only_on_training_rows():
    df = _data().drop(columns=["age", "sex"])
    train = df.iloc[::2]
    h1 = ComBatHarmonizer().fit(train)
    changed = df.copy()
    changed.iloc[1::2, :P] += 100.0  # wildly different held-out rows
    h2 = ComBatHarmonizer().fit(changed.iloc[::2])
    np.testing.assert_array_equal(h1.gamma_star_, h2.gamma_star_)
    np.testing.assert_array_equal(h1.var_pooled_, h2.var_pooled_)

    seen = []

    class Spy(ComBatHarmonizer):
        def fit(self, X, y=None, **kw):
            seen.append(len(X))
            return super().fit(X, y, **kw)

    y = (np.arange(len(df)) % 2).astype(int)
    cross_validate(
        make_pipeline(Spy(), LogisticRegression()),
        df,
        y,
        cv=KFold(3, shuffle=True, random_state=0),
    )
    assert seen == [32, 32, 32]


def test_unseen_site_policies():
    df = _data().drop(columns=["age", "sex"])
    h = ComBatHarmonizer().fit(df[df.site != "c"])
    with pytest.raises(ValueError, match=r"sites \['c'\] were not seen in fit"):
        h.transform(df)
    pooled = ComBatHarmonizer(unseen="pooled").fit(df[df.site != "c"]).transform(df)
    rows = (df.site == "c").to_numpy()
    np.testing.assert_allclose(pooled[rows], df.iloc[:, :P].to_numpy()[rows])
    hf = ComBatHarmonizer(unseen="fit").fit(df[df.site != "c"])
    with pytest.warns(ComBatWarning, match="'c' was not seen in fit"):
        out = hf.transform(df)
    # the new site's own shift (-1) and scale (x2.5) are removed
    raw_c = df.iloc[:, :P].to_numpy()[rows]
    assert out[rows].std(0).mean() < 0.7 * raw_c.std(0).mean()
    with pytest.raises(ValueError, match="at least 2 are needed"):
        hf.transform(df.iloc[[0, 47]])


def test_sample_domain_metadata_routing():
    df = _data().drop(columns=["age", "sex"])
    X = df.iloc[:, :P].to_numpy()
    site = df["site"].to_numpy()
    ref = ComBatHarmonizer().fit_transform(df)
    out = ComBatHarmonizer().fit(X, sample_domain=site).transform(X, sample_domain=site)
    np.testing.assert_allclose(out, ref)
    y = (np.arange(len(df)) % 2).astype(int)
    with sklearn.config_context(enable_metadata_routing=True):
        pipe = make_pipeline(
            ComBatHarmonizer()
            .set_fit_request(sample_domain=True)
            .set_transform_request(sample_domain=True),
            LogisticRegression(),
        )
        pipe.fit(X, y, sample_domain=site)
        np.testing.assert_allclose(pipe[0].transform(X, sample_domain=site), ref)


def test_routed_covariates_equal_column_covariates():
    df = _data()
    a = ComBatHarmonizer(covariates=["age"]).fit_transform(df.drop(columns="sex"))[:, :P]
    X = df.drop(columns=["age", "sex"])
    h = ComBatHarmonizer().fit(X, sample_covariates=df[["age"]])
    b = h.transform(X, sample_covariates=df[["age"]])
    np.testing.assert_allclose(a.astype(float), b)
    with pytest.raises(ValueError, match="pass them to transform"):
        h.transform(X)


def test_set_output_pandas_drops_site_column():
    df = _data().drop(columns=["age", "sex"])
    out = ComBatHarmonizer().set_output(transform="pandas").fit_transform(df)
    assert list(out.columns) == [f"f{i}" for i in range(P)]
    assert out.index.equals(df.index)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d.iloc[:, :P].to_numpy(), "needs the site of every row"),
        (lambda d: d[d.site == "a"], "at least 2 sites"),
        (lambda d: d.iloc[:-11], r"sites \['c'\] have 1"),
        (lambda d: d.assign(sex=d.site), "not numeric features"),
    ],
)
def test_bad_input_errors(make, match):
    df = _data().drop(columns=["age"])
    if match != "not numeric features":
        df = df.drop(columns="sex")
    with pytest.raises(ValueError, match=match):
        ComBatHarmonizer().fit(make(df))


def test_confounded_covariate_and_unseen_level_errors():
    df = _data()
    df["grp"] = np.where(df.site == "a", "x", "y")
    with pytest.raises(ValueError, match="rank deficient"):
        ComBatHarmonizer(covariates=["grp"]).fit(df.drop(columns=["age", "sex"]))
    h = ComBatHarmonizer(covariates=["sex"]).fit(df.drop(columns=["age", "grp"]))
    bad = df.drop(columns=["age", "grp"]).assign(sex="U")
    with pytest.raises(ValueError, match=r"levels \['U'\] not seen"):
        h.transform(bad)


def test_nan_input_rejected():
    df = _data().drop(columns=["age", "sex"])
    df.iloc[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ComBatHarmonizer().fit(df)


def test_held_out_rows_agree_with_neurocombat_estimates():
    """transform of unseen rows = neuroCombatFromTraining's formula on neuroCombat's estimates.

    (neuroCombatFromTraining itself fails on numpy >= 2.3, so its three lines are applied here.)
    """
    neuro = pytest.importorskip("neuroCombat")
    df = _data().drop(columns=["age", "sex"])
    train = np.random.default_rng(0).random(len(df)) < 0.6
    X = df.iloc[:, :P].to_numpy()
    with contextlib.redirect_stdout(io.StringIO()):
        est = neuro.neuroCombat(
            X[train].T.copy(),
            df.loc[train, ["site"]].rename(columns={"site": "batch"}).reset_index(drop=True),
            "batch",
        )["estimates"]
    idx = np.searchsorted(np.asarray(est["batches"], dtype=str), df["site"][~train].astype(str))
    sd, mean = np.sqrt(est["var.pooled"][:, 0]), est["stand.mean"][:, 0]
    ref = (X[~train] - mean) / sd - est["gamma.star"][idx]
    ref = ref / np.sqrt(est["delta.star"][idx]) * sd + mean
    out = ComBatHarmonizer().fit(df[train]).transform(df[~train])
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)


def test_sample_domain_routed_through_pipeline_predict_and_cross_validate():
    df = _data().drop(columns=["age", "sex"])
    X, site = df.iloc[:, :P].to_numpy(), df["site"].to_numpy()
    y = (X[:, 0] > np.median(X[:, 0])).astype(int)
    with sklearn.config_context(enable_metadata_routing=True):
        pipe = make_pipeline(
            ComBatHarmonizer()
            .set_fit_request(sample_domain=True)
            .set_transform_request(sample_domain=True),
            LogisticRegression(),
        )
        pipe.fit(X, y, sample_domain=site)
        proba = pipe.predict_proba(X[:7], sample_domain=site[:7])
        # inside cross_validate, metadata reaches fit only: the scorer's predict gets the site
        # from the DataFrame's site column, so pass a frame (sample_domain must agree with it)
        res = cross_validate(
            make_pipeline(
                ComBatHarmonizer()
                .set_fit_request(sample_domain=True)
                .set_transform_request(sample_domain=True),
                LogisticRegression(),
            ),
            df,
            y,
            cv=KFold(3, shuffle=True, random_state=0),
            params={"sample_domain": site},
            return_estimator=True,
        )
    assert not sklearn.get_config()["enable_metadata_routing"]
    ref = ComBatHarmonizer().fit(df).transform(df.iloc[:7])
    np.testing.assert_allclose(proba, pipe[-1].predict_proba(ref))
    assert len(res["test_score"]) == 3
    assert all(est[0].site_counts_.sum() == 32 for est in res["estimator"])


def test_sklearn_invariants_with_site_data():
    """What sklearn's generic checks cannot test without site labels, on site-labelled data."""
    import pickle

    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    df = _data().drop(columns=["age", "sex"])
    original = df.copy()
    h = ComBatHarmonizer()
    with pytest.raises(NotFittedError):
        h.transform(df)
    assert h.fit(df) is h
    pd.testing.assert_frame_equal(df, original)  # input not modified
    assert h.n_features_in_ == P + 1 and list(h.feature_names_in_) == list(df.columns)
    out = h.transform(df)
    again = clone(h).fit(df).fit(df).transform(df)  # idempotent
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(h)).transform(df), out)
    perm = np.random.default_rng(1).permutation(len(df))  # sample order invariance
    np.testing.assert_allclose(h.transform(df.iloc[perm]), out[perm])
    f32 = df.astype({f"f{i}": np.float32 for i in range(P)})
    assert np.abs(clone(h).fit(f32).transform(f32) - out).max() < 1e-4
    X, site = df.iloc[:, :P].to_numpy(), df["site"].to_numpy()
    ha = ComBatHarmonizer().fit(X, sample_domain=site)
    assert ha.n_features_in_ == P and not hasattr(ha, "feature_names_in_")
    with pytest.raises(ValueError, match=f"expecting {P} features"):
        ha.transform(X[:, :-1], sample_domain=site)
