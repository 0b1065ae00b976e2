"""Shift diagnostics: MMD test, proxy A-distance, diagnose_shift."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skrtl._diagnostics import (
    MMDResult,
    ShiftDiagnosis,
    diagnose_shift,
    mmd_test,
    proxy_a_distance,
)


def _gauss(n, shift=0.0, d=5, seed=0):
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, d))


@pytest.mark.parametrize("kernel", ["rbf", "laplacian", "linear"])
def test_mmd_detects_mean_shift(kernel):
    res = mmd_test(_gauss(100), _gauss(100, 0.6, seed=1), kernel=kernel, n_permutations=200,
                   random_state=0)  # fmt: skip
    assert isinstance(res, MMDResult)
    assert res.p_value < 0.01
    assert res.null_distribution.shape == (200,)


def test_mmd_no_shift_p_values_roughly_uniform():
    ps = [
        mmd_test(_gauss(60, seed=2 * i), _gauss(60, seed=2 * i + 1), n_permutations=100,
                 random_state=i).p_value
        for i in range(20)
    ]  # fmt: skip
    assert np.mean(np.asarray(ps) < 0.05) <= 0.15
    assert 0.3 < np.mean(ps) < 0.7


def test_mmd_detects_scale_shift_and_is_deterministic():
    a, b = _gauss(120, seed=3), 1.8 * _gauss(120, seed=4)
    r1 = mmd_test(a, b, n_permutations=200, random_state=0)
    r2 = mmd_test(a, b, n_permutations=200, random_state=0)
    assert r1.p_value < 0.01
    assert r1.statistic == r2.statistic and r1.p_value == r2.p_value


def test_mmd_max_samples_and_errors():
    res = mmd_test(_gauss(300), _gauss(50, seed=1), max_samples=40, n_permutations=20,
                   random_state=0)  # fmt: skip
    assert (res.n_source, res.n_target) == (40, 40)
    with pytest.raises(ValueError, match="features"):
        mmd_test(_gauss(10, d=3), _gauss(10, d=4))
    with pytest.raises(ValueError, match="kernel"):
        mmd_test(_gauss(10), _gauss(10), kernel="poly")
    with pytest.raises(ValueError, match="gamma"):
        mmd_test(_gauss(10), _gauss(10), gamma=-1.0)


def test_proxy_a_distance():
    far = proxy_a_distance(_gauss(100), _gauss(100, 2.0, seed=1), random_state=0)
    near = proxy_a_distance(_gauss(100), _gauss(100, seed=1), random_state=0)
    assert far > 1.5
    assert near < 0.5
    with pytest.raises(ValueError, match="cv"):
        proxy_a_distance(_gauss(10), _gauss(10), cv=1)


def _label_shift_data(n=300, prior_t=0.2, seed=0):
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, 2, n)
    yt = (rng.random(n) < prior_t).astype(int)
    Xs = rng.normal(size=(n, 4)) + 2.0 * ys[:, None]
    Xt = rng.normal(size=(n, 4)) + 2.0 * yt[:, None]
    return Xs, ys, Xt, yt


def test_diagnose_label_shift_unlabelled_target():
    Xs, ys, Xt, yt = _label_shift_data()
    diag = diagnose_shift(Xs, ys, Xt, n_permutations=100, n_bootstrap=50, random_state=0)
    assert isinstance(diag, ShiftDiagnosis)
    assert diag.target_priors_method == "em"
    assert abs(diag.target_priors[1] - 0.2) < 0.07
    assert diag.target_priors_ci.shape == (2, 2)
    assert diag.label_shift
    assert diag.conditional_labels == "pseudo"
    assert diag.concept_shift is None
    assert "LabelShiftAdapter" in diag.advice()


def test_diagnose_label_shift_labelled_target():
    Xs, ys, Xt, yt = _label_shift_data()
    diag = diagnose_shift(Xs, ys, Xt, yt, n_permutations=100, n_bootstrap=50, random_state=0)
    assert diag.label_shift and diag.prior_p_value < 1e-4
    assert diag.conditional_p_value >= 0.05  # p(x|y) unchanged
    assert not diag.concept_shift
    summary = diag.summary()
    assert isinstance(summary, pd.DataFrame)
    assert list(summary["shift"]) == ["covariate", "covariate", "label", "label", "concept"]
    assert "label" in str(diag)


def test_diagnose_no_shift():
    Xs, ys, _, _ = _label_shift_data(seed=0)
    Xt, yt = _label_shift_data(prior_t=0.5, seed=1)[:2]
    diag = diagnose_shift(Xs, ys, Xt, yt, n_permutations=100, n_bootstrap=50, random_state=0)
    assert not diag.covariate_shift
    assert not diag.label_shift
    assert not diag.concept_shift
    assert "no significant shift" in diag.advice()


def test_diagnose_covariate_and_concept_shift():
    rng = np.random.default_rng(0)
    Xs, ys, _, _ = _label_shift_data(seed=0)
    yt = rng.integers(0, 2, 300)
    # the class signal flips on two features: p(y|x) changes
    Xt = rng.normal(size=(300, 4)) + 2.0 * yt[:, None] * np.array([1, -1, 1, -1])
    diag = diagnose_shift(Xs, ys, Xt, yt, n_permutations=100, n_bootstrap=50, random_state=0)
    assert diag.covariate_shift
    assert diag.concept_shift
    assert diag.target_score < diag.source_score - 0.2
    assert not diag.label_shift


def test_diagnose_plot_and_multiclass():
    rng = np.random.default_rng(0)
    ys = rng.integers(0, 3, 240)
    Xs = rng.normal(size=(240, 3)) + 3.0 * np.eye(3)[ys]
    yt = rng.choice(3, 240, p=[0.6, 0.3, 0.1])
    Xt = rng.normal(size=(240, 3)) + 3.0 * np.eye(3)[yt]
    diag = diagnose_shift(Xs, ys, Xt, n_permutations=50, n_bootstrap=30, random_state=0)
    assert diag.score_name == "balanced_accuracy"
    assert diag.label_shift
    assert np.allclose(diag.target_priors, np.bincount(yt) / len(yt), atol=0.12)
    fig = diag.plot()
    assert len(fig.axes) == 3
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_diagnose_errors():
    Xs, ys, Xt, yt = _label_shift_data(n=40)
    with pytest.raises(ValueError, match="y_source has"):
        diagnose_shift(Xs, ys[:-1], Xt)
    with pytest.raises(ValueError, match="absent from y_source"):
        diagnose_shift(Xs, ys, Xt, yt + 5)
    with pytest.raises(ValueError, match="alpha"):
        diagnose_shift(Xs, ys, Xt, alpha=2.0)
