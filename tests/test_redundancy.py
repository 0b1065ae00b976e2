"""Tests of CorrelationClusterSelector (one medoid per cluster of correlated features)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skrtl import CorrelationClusterSelector


def _groups(n=200, seed=0):
    """Three groups of 4, 3 and 1 features, |r| > 0.95 inside a group, ~0 between."""
    rng = np.random.default_rng(seed)
    a, b, c = rng.normal(size=(3, n))
    cols = [a + 0.05 * rng.normal(size=n) for _ in range(4)]
    cols += [np.exp(b + 0.05 * rng.normal(size=n)) for _ in range(3)]  # monotone: Spearman
    cols.append(c)
    return np.column_stack(cols), np.array([0, 0, 0, 0, 1, 1, 1, 2])


def test_one_representative_per_group():
    X, groups = _groups()
    sel = CorrelationClusterSelector(threshold=0.9).fit(X)
    assert sel.n_clusters_ == 3
    # the clusters are exactly the groups (up to relabelling)
    assert len({(g, l) for g, l in zip(groups, sel.labels_)}) == 3
    assert sorted(groups[sel.representatives_]) == [0, 1, 2]
    assert sel.transform(X).shape == (200, 3)


def test_complete_linkage_keeps_every_pair_above_the_threshold():
    rng = np.random.default_rng(1)
    base = rng.normal(size=300)
    X = np.column_stack([base + s * rng.normal(size=300) for s in np.linspace(0, 1.5, 12)])
    for threshold in (0.5, 0.8, 0.95):
        sel = CorrelationClusterSelector(threshold=threshold, method="pearson").fit(X)
        corr = np.abs(np.corrcoef(X.T))
        for c in range(sel.n_clusters_):
            members = np.flatnonzero(sel.labels_ == c)
            assert corr[np.ix_(members, members)].min() >= threshold - 1e-12
    # single linkage chains the same features into fewer clusters
    chain = CorrelationClusterSelector(threshold=0.8, method="pearson", linkage="single").fit(X)
    full = CorrelationClusterSelector(threshold=0.8, method="pearson").fit(X)
    assert chain.n_clusters_ <= full.n_clusters_


def test_medoid_is_the_most_central_member():
    rng = np.random.default_rng(2)
    centre = rng.normal(size=500)
    left = centre + 0.3 * rng.normal(size=500)
    right = centre + 0.3 * rng.normal(size=500)
    X = np.column_stack([left, right, centre])  # the centre correlates best with both
    sel = CorrelationClusterSelector(threshold=0.8, method="pearson").fit(X)
    assert sel.n_clusters_ == 1 and sel.representatives_.tolist() == [2]


def test_spearman_merges_monotone_copies_that_pearson_keeps():
    rng = np.random.default_rng(3)
    x = rng.normal(size=300)
    X = np.column_stack([x, np.exp(3 * x)])
    assert CorrelationClusterSelector(threshold=0.95).fit(X).n_clusters_ == 1
    assert CorrelationClusterSelector(threshold=0.95, method="pearson").fit(X).n_clusters_ == 2


def test_constant_features_threshold_one_and_names():
    X, _ = _groups()
    X = np.column_stack([X, np.ones(200), np.zeros(200)])
    sel = CorrelationClusterSelector(threshold=0.9).fit(X)
    assert sel.n_clusters_ == 5  # two constant features stay apart
    everything = CorrelationClusterSelector(threshold=1.0).fit(X)
    assert everything.n_clusters_ == X.shape[1]
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    pipe = make_pipeline(CorrelationClusterSelector(), StandardScaler()).set_output(
        transform="pandas"
    )
    out = pipe.fit_transform(frame)
    assert list(out.columns) == [f"f{i}" for i in sel.representatives_]


def test_refuses_nan():
    X, _ = _groups()
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        CorrelationClusterSelector().fit(X)
