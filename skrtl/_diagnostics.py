"""Dataset-shift diagnostics between a source and a target set of features.

Three kinds of shift need three different remedies (Moreno-Torres et al. 2012):

* **covariate shift** -- ``p(x)`` differs (scanner, protocol): harmonize (ComBat, histogram
  matching, AdaBN) or re-weight;
* **label shift** -- ``p(y)`` differs while ``p(x | y)`` is the same (screening vs referral
  prevalence): re-estimate the priors and adjust posteriors
  (:class:`~skrtl._label_shift.LabelShiftAdapter`);
* **concept shift** -- ``p(y | x)`` differs (another definition of the label, another
  population): the source model cannot be fixed without target labels; re-train or fine-tune.

:func:`diagnose_shift` collects evidence for each from feature matrices (e.g. the output of
``PretrainedCNNFeatures``): a kernel two-sample test (:func:`mmd_test`) and a domain classifier
(:func:`proxy_a_distance`) for ``p(x)``; a prior comparison (observed target labels, or EM
estimates from unlabelled target data) and class-conditional MMD for ``p(y)`` and ``p(x | y)``;
the source model's target discrimination for ``p(y | x)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.metrics.pairwise import pairwise_distances, pairwise_kernels
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_array
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d

from .utils import derive_seed, reweight_posteriors, root_seed

__all__ = [
    "MMDResult",
    "ShiftDiagnosis",
    "diagnose_shift",
    "mmd_test",
    "proxy_a_distance",
]

_KERNELS = ("rbf", "laplacian", "linear")


def _check_pair(X_source, X_target) -> tuple[np.ndarray, np.ndarray]:
    Xs = check_array(X_source, dtype=np.float64, input_name="X_source")
    Xt = check_array(X_target, dtype=np.float64, input_name="X_target")
    if Xs.shape[1] != Xt.shape[1]:
        raise ValueError(
            f"X_source has {Xs.shape[1]} features but X_target has {Xt.shape[1]}; both must "
            "be feature matrices of the same feature extractor."
        )
    if Xs.shape[0] < 2 or Xt.shape[0] < 2:
        raise ValueError(
            f"need at least 2 samples in each set, got {Xs.shape[0]} source and "
            f"{Xt.shape[0]} target samples."
        )
    return Xs, Xt


def _default_classifier():
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


# --------------------------------------------------------------------------------------------
# domain classifier / proxy A-distance
# --------------------------------------------------------------------------------------------
def _domain_classifier(Xs, Xt, estimator, cv, seed) -> tuple[float, float]:
    X = np.vstack([Xs, Xt])
    d = np.r_[np.zeros(len(Xs), dtype=int), np.ones(len(Xt), dtype=int)]
    n_splits = int(min(cv, len(Xs), len(Xt)))
    if n_splits < 2:
        raise ValueError(f"cv must be >= 2, got {cv!r}.")
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    est = _default_classifier() if estimator is None else clone(estimator)
    proba = cross_val_predict(est, X, d, cv=splitter, method="predict_proba")[:, 1]
    error = 1.0 - balanced_accuracy_score(d, (proba >= 0.5).astype(int))
    return float(error), float(roc_auc_score(d, proba))


def proxy_a_distance(
    X_source, X_target, *, estimator=None, cv: int = 5, random_state=None
) -> float:
    """Proxy A-distance: how well a classifier tells source from target samples.

    A domain classifier (``estimator``, default standardisation + logistic regression) is
    cross-validated on the pooled samples labelled 0 (source) / 1 (target); with its balanced
    error ``err`` the proxy A-distance is ``PAD = 2 (1 - 2 err)`` (Ben-David et al. 2007):
    about 0 when the sets are indistinguishable, 2 when perfectly separable (slightly negative
    values are chance).

    Parameters
    ----------
    X_source, X_target : array-like of shape (n, n_features)
    estimator : classifier with predict_proba, default=None
    cv : int, default=5
        Number of stratified folds.
    random_state : int, RandomState instance or None

    Returns
    -------
    float
        The proxy A-distance.

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import proxy_a_distance
    >>> rng = np.random.default_rng(0)
    >>> pad = proxy_a_distance(rng.normal(size=(100, 3)), rng.normal(2, 1, size=(100, 3)),
    ...                        random_state=0)
    >>> bool(pad > 1.5)
    True
    """
    Xs, Xt = _check_pair(X_source, X_target)
    if not (isinstance(cv, Integral) and cv >= 2):
        raise ValueError(f"cv must be an integer >= 2, got {cv!r}.")
    err, _ = _domain_classifier(Xs, Xt, estimator, cv, root_seed(random_state))
    return 2.0 * (1.0 - 2.0 * err)


# --------------------------------------------------------------------------------------------
# MMD two-sample test
# --------------------------------------------------------------------------------------------
@dataclass
class MMDResult:
    """Result of :func:`mmd_test`.

    Attributes
    ----------
    statistic : float
        Unbiased estimate of the squared maximum mean discrepancy.
    p_value : float
        Permutation p-value ``(1 + #{null >= statistic}) / (1 + n_permutations)``.
    kernel : str
    gamma : float or None
        Kernel bandwidth used (after the median heuristic).
    n_source, n_target : int
        Samples used (after sub-sampling to ``max_samples``).
    n_permutations : int
    null_distribution : ndarray of shape (n_permutations,)
    """

    statistic: float
    p_value: float
    kernel: str
    gamma: float | None
    n_source: int
    n_target: int
    n_permutations: int
    null_distribution: np.ndarray = field(repr=False)


def _unbiased_mmd(K0: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 for indicator columns ``A`` (n, P) of the first sample; K0 has 0 diag."""
    B = 1.0 - A
    m = A.sum(axis=0)
    n = B.sum(axis=0)
    KA = K0 @ A
    aKa = np.einsum("ip,ip->p", A, KA)
    bKa = np.einsum("ip,ip->p", B, KA)
    total = K0.sum()
    bKb = total - 2.0 * bKa - aKa
    return aKa / (m * (m - 1)) + bKb / (n * (n - 1)) - 2.0 * bKa / (m * n)


def mmd_test(
    X_source,
    X_target,
    *,
    kernel: str = "rbf",
    gamma="median",
    n_permutations: int = 500,
    max_samples: int | None = 1000,
    standardize: bool = True,
    random_state=None,
) -> MMDResult:
    """Kernel two-sample test (maximum mean discrepancy) with a permutation null.

    Parameters
    ----------
    X_source, X_target : array-like of shape (n, n_features)
    kernel : {"rbf", "laplacian", "linear"}, default="rbf"
    gamma : float or "median", default="median"
        Bandwidth of the rbf / laplacian kernel; ``"median"``: the inverse median pairwise
        squared (rbf) or L1 (laplacian) distance of the pooled sample.
    n_permutations : int, default=500
        Random relabellings of the pooled sample for the null distribution.
    max_samples : int or None, default=1000
        Randomly sub-sample each set to at most this many rows (the kernel matrix is
        ``(n_source + n_target)^2``).
    standardize : bool, default=True
        Scale every feature by the pooled mean and standard deviation first (the test stays
        exact: the scaling does not depend on the labels).
    random_state : int, RandomState instance or None

    Returns
    -------
    MMDResult

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import mmd_test
    >>> rng = np.random.default_rng(0)
    >>> res = mmd_test(rng.normal(size=(80, 5)), rng.normal(0.7, 1, size=(80, 5)),
    ...                n_permutations=200, random_state=0)
    >>> bool(res.p_value < 0.05)
    True
    """
    Xs, Xt = _check_pair(X_source, X_target)
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS!r}, got {kernel!r}.")
    if not (isinstance(n_permutations, Integral) and n_permutations >= 1):
        raise ValueError(f"n_permutations must be an integer >= 1, got {n_permutations!r}.")
    if not (isinstance(gamma, str) and gamma == "median") and not (
        isinstance(gamma, Real) and gamma > 0
    ):
        raise ValueError(f"gamma must be 'median' or a positive number, got {gamma!r}.")
    if max_samples is not None and not (isinstance(max_samples, Integral) and max_samples >= 2):
        raise ValueError(f"max_samples must be None or an integer >= 2, got {max_samples!r}.")
    rng = np.random.default_rng(root_seed(random_state))
    if max_samples is not None:
        if len(Xs) > max_samples:
            Xs = Xs[rng.choice(len(Xs), max_samples, replace=False)]
        if len(Xt) > max_samples:
            Xt = Xt[rng.choice(len(Xt), max_samples, replace=False)]
    X = np.vstack([Xs, Xt])
    if standardize:
        sd = X.std(axis=0)
        sd[sd == 0] = 1.0
        X = (X - X.mean(axis=0)) / sd
    g = None
    # memory: a few (n_source + n_target)^2 matrices, never (n, n, n_features)
    if kernel == "linear":
        K = X @ X.T
    else:
        if isinstance(gamma, str):
            metric = "sqeuclidean" if kernel == "rbf" else "manhattan"
            D = pairwise_distances(X, metric=metric)
            med = float(np.median(D[np.triu_indices(len(X), k=1)]))
            del D
            g = 1.0 / med if med > 0 else 1.0
        else:
            g = float(gamma)
        K = pairwise_kernels(X, metric=kernel, gamma=g)
    np.fill_diagonal(K, 0.0)
    K0 = K
    m, n = len(Xs), len(Xt)
    a = np.r_[np.ones(m), np.zeros(n)]
    stat = float(_unbiased_mmd(K0, a[:, None])[0])
    null = np.empty(n_permutations)
    chunk = max(1, int(4_000_000 // (m + n)))
    for start in range(0, n_permutations, chunk):
        p = min(chunk, n_permutations - start)
        A = np.stack([a[rng.permutation(m + n)] for _ in range(p)], axis=1)
        null[start : start + p] = _unbiased_mmd(K0, A)
    p_value = float((1 + np.sum(null >= stat)) / (1 + n_permutations))
    return MMDResult(
        statistic=stat,
        p_value=p_value,
        kernel=kernel,
        gamma=g,
        n_source=m,
        n_target=n,
        n_permutations=int(n_permutations),
        null_distribution=null,
    )


# --------------------------------------------------------------------------------------------
# diagnose_shift
# --------------------------------------------------------------------------------------------
@dataclass
class ShiftDiagnosis:
    """Evidence for covariate, label and concept shift (result of :func:`diagnose_shift`).

    Attributes
    ----------
    classes : ndarray
    mmd : MMDResult
        Two-sample test of ``p(x)``.
    proxy_a_distance : float
    domain_auc : float
        Cross-validated AUC of the source-vs-target classifier (0.5 = indistinguishable).
    source_priors : ndarray
        Source label frequencies.
    target_priors : ndarray
        Observed target label frequencies, or EM estimates from unlabelled target data.
    target_priors_method : {"observed", "em"}
    target_priors_ci : ndarray of shape (n_classes, 2) or None
        Bootstrap interval of the EM estimates.
    prior_p_value : float
        Chi-square test (observed labels), or for EM estimates a z-test with the bootstrap
        standard error (Bonferroni over classes when more than two) of equal priors.
    conditional_mmd : dict
        Class -> :class:`MMDResult` comparing ``p(x | y)`` (classes with >= 5 samples on
        both sides).
    conditional_labels : {"observed", "pseudo"}
        Target labels of the class-conditional tests: true labels, or the prior-adjusted
        predictions of the source model when ``y_target`` is not given.
    score_name : {"roc_auc", "balanced_accuracy"}
        Both are insensitive to a pure change of class priors.
    source_score : float
        Cross-validated score of the source model on source data.
    target_score : float or None
        Score of the source model on the labelled target data.
    target_score_ci : ndarray of shape (2,) or None
    concept_p_value : float or None
        One-sided z-test (bootstrap standard error of the target score) of
        ``target_score >= source_score``.
    alpha : float
        Significance level used for the ``evidence`` column.
    """

    classes: np.ndarray
    mmd: MMDResult
    proxy_a_distance: float
    domain_auc: float
    source_priors: np.ndarray
    target_priors: np.ndarray
    target_priors_method: str
    target_priors_ci: np.ndarray | None
    prior_p_value: float
    conditional_mmd: dict
    conditional_labels: str
    score_name: str
    source_score: float
    target_score: float | None
    target_score_ci: np.ndarray | None
    concept_p_value: float | None
    alpha: float = 0.05
    projection: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------
    @property
    def conditional_p_value(self) -> float:
        """Bonferroni-corrected smallest class-conditional MMD p-value (nan if none)."""
        ps = [r.p_value for r in self.conditional_mmd.values()]
        return float(min(1.0, min(ps) * len(ps))) if ps else float("nan")

    @property
    def covariate_shift(self) -> bool:
        """``p(x)`` differs (MMD test significant)."""
        return bool(self.mmd.p_value < self.alpha)

    @property
    def label_shift(self) -> bool:
        """``p(y)`` differs (prior test significant)."""
        return bool(self.prior_p_value < self.alpha)

    @property
    def concept_shift(self) -> bool | None:
        """The source model discriminates worse on the target (None without target labels)."""
        if self.concept_p_value is None:
            return None
        return bool(self.concept_p_value < self.alpha)

    def summary(self) -> pd.DataFrame:
        """One row per question: test, statistic, p-value and evidence at level ``alpha``."""

        def yes(p):
            return "n/a" if p is None or np.isnan(p) else ("yes" if p < self.alpha else "no")

        tv = 0.5 * float(np.abs(self.target_priors - self.source_priors).sum())
        prior_test = (
            "chi-square test of the label counts"
            if self.target_priors_method == "observed"
            else "EM prior estimate, bootstrap test"
        )
        cond_p = self.conditional_p_value
        max_cond = max((r.statistic for r in self.conditional_mmd.values()), default=np.nan)
        drop = (
            np.nan if self.target_score is None else float(self.source_score - self.target_score)
        )
        rows = [
            ("covariate", "p(x) differs?", "MMD permutation test", self.mmd.statistic,
             self.mmd.p_value, yes(self.mmd.p_value)),
            ("covariate", "domain classifier", f"proxy A-distance (AUC {self.domain_auc:.2f})",
             self.proxy_a_distance, np.nan, "yes" if self.domain_auc > 0.6 else "no"),
            ("label", "p(y) differs?", prior_test, tv, self.prior_p_value,
             yes(self.prior_p_value)),
            ("label", "p(x|y) differs?",
             f"class-conditional MMD ({self.conditional_labels} labels, Bonferroni)",
             max_cond, cond_p, yes(cond_p)),
            ("concept", "p(y|x) differs?",
             f"source model {self.score_name} drop on target", drop, self.concept_p_value,
             yes(self.concept_p_value)),
        ]  # fmt: skip
        return pd.DataFrame(
            rows, columns=["shift", "question", "test", "statistic", "p_value", "evidence"]
        )

    def advice(self) -> str:
        """A short plain-text reading of the evidence."""
        lines = []
        cond = self.conditional_p_value
        cond_equal = bool(np.isnan(cond) or cond >= self.alpha)
        explained = self.label_shift and cond_equal
        if self.covariate_shift and not explained:
            lines.append(
                "p(x) differs (covariate shift): harmonize images (HistogramMatcher, AdaBN) or "
                "features (ComBatHarmonizer) before training."
            )
        if explained:
            lines.append(
                "p(y) differs (label shift) and p(x|y) looks equal"
                + (", which explains the change of p(x)" if self.covariate_shift else "")
                + ": adjust the posteriors with LabelShiftAdapter."
            )
        elif self.label_shift:
            lines.append(
                "p(y) differs, but p(x|y) differs too: harmonize first, then re-estimate the "
                "priors (LabelShiftAdapter)."
            )
        if self.concept_shift:
            lines.append(
                "the source model discriminates worse on the target (concept shift, or covariate "
                "shift outside the source support): fine-tune or re-train with target labels."
            )
        if not lines:
            lines.append(f"no significant shift detected at alpha={self.alpha:.3g}.")
        return "\n".join(lines)

    def __str__(self) -> str:
        table = self.summary().to_string(index=False, float_format=lambda v: f"{v:.4g}")
        return f"{table}\n\n{self.advice()}"

    def plot(self, *, figsize=(13.0, 4.0)):
        """Plot a 2-D PCA projection of both sets, the class priors and the evidence.

        Returns
        -------
        matplotlib.figure.Figure
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=figsize)
        ax = axes[0]
        ps, pt = self.projection.get("source"), self.projection.get("target")
        if ps is not None:
            ax.scatter(ps[:, 0], ps[:, 1], s=10, alpha=0.6, label="source")
            ax.scatter(pt[:, 0], pt[:, 1], s=10, alpha=0.6, marker="^", label="target")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(
            f"PCA of features (MMD p={self.mmd.p_value:.3g}, PAD={self.proxy_a_distance:.2f})",
            fontsize=9,
        )
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")

        ax = axes[1]
        k = len(self.classes)
        pos = np.arange(k)
        ax.bar(pos - 0.2, self.source_priors, width=0.4, label="source")
        yerr = None
        if self.target_priors_ci is not None:
            ci = np.asarray(self.target_priors_ci)
            tp = self.target_priors
            yerr = np.abs(np.vstack([tp - ci[:, 0], ci[:, 1] - tp]))
        ax.bar(
            pos + 0.2,
            self.target_priors,
            width=0.4,
            yerr=yerr,
            capsize=3,
            label=f"target ({self.target_priors_method})",
        )
        ax.set_xticks(pos, [str(c) for c in self.classes])
        ax.set_ylabel("class prior")
        ax.set_title(f"p(y): test p={self.prior_p_value:.3g}", fontsize=9)
        ax.legend(fontsize=8)

        ax = axes[2]
        table = self.summary().dropna(subset=["p_value"])
        logp = -np.log10(np.clip(table["p_value"].to_numpy(dtype=float), 1e-12, 1.0))
        labels = [f"{s}\n{q}" for s, q in zip(table["shift"], table["question"])]
        colors = ["tab:red" if e == "yes" else "tab:gray" for e in table["evidence"]]
        ax.barh(np.arange(len(logp)), logp, color=colors)
        ax.axvline(-np.log10(self.alpha), color="k", ls="--", lw=1, label=f"alpha={self.alpha}")
        ax.set_yticks(np.arange(len(logp)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("-log10 p-value")
        ax.set_title("evidence", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def _bootstrap_p(boot: np.ndarray, estimate: float, ref: float, *, two_sided: bool) -> float:
    """Normal-approximation p-value of ``estimate == ref`` with the bootstrap standard error.

    One-sided (``two_sided=False``): the alternative is ``estimate < ref``.
    """
    se = float(np.std(boot, ddof=1)) if len(boot) > 1 else 0.0
    diff = float(estimate - ref)
    if se <= 0:
        return 1.0 if diff == 0 or (not two_sided and diff >= 0) else 0.0
    z = diff / se
    return float(2 * stats.norm.sf(abs(z)) if two_sided else stats.norm.cdf(z))


def _score(y_idx, proba, k) -> float:
    if k == 2:
        return float(roc_auc_score(y_idx, proba[:, 1]))
    return float(balanced_accuracy_score(y_idx, proba.argmax(axis=1)))


def diagnose_shift(
    X_source,
    y_source,
    X_target,
    y_target=None,
    *,
    estimator=None,
    domain_estimator=None,
    cv: int = 5,
    n_permutations: int = 500,
    n_bootstrap: int = 200,
    alpha: float = 0.05,
    max_samples: int | None = 1000,
    random_state=None,
) -> ShiftDiagnosis:
    """Evidence for covariate, label and concept shift between source and target features.

    * ``p(x)``: :func:`mmd_test` and :func:`proxy_a_distance` on the pooled features.
    * ``p(y)``: with ``y_target`` a chi-square test on the label counts; without it the target
      priors are estimated by EM on calibrated source-model posteriors
      (:class:`~skrtl._label_shift.LabelShiftAdapter`) and compared with a bootstrap over
      target samples (the source model is held fixed).
    * ``p(x | y)``: :func:`mmd_test` per class (target labels, or prior-adjusted predictions
      of the source model as pseudo-labels), Bonferroni-corrected. Label shift proper means
      ``p(y)`` differs while ``p(x | y)`` does not.
    * ``p(y | x)`` (needs ``y_target``): the source model's ROC AUC (binary) or balanced
      accuracy (multi-class) on the target against its cross-validated source value. Both are
      unchanged by a pure prior change, so a significant drop (bootstrap) points to concept
      shift, or to covariate shift beyond the source support.

    Parameters
    ----------
    X_source : array-like of shape (n_source, n_features)
        Source features (e.g. ``PretrainedCNNFeatures().fit_transform(images)``).
    y_source : array-like of shape (n_source,)
    X_target : array-like of shape (n_target, n_features)
    y_target : array-like of shape (n_target,), optional
    estimator : classifier with predict_proba, default=None
        Source model (default: standardisation + logistic regression, C=0.1).
    domain_estimator : classifier with predict_proba, default=None
        Domain classifier of the proxy A-distance (default as ``estimator``).
    cv : int, default=5
    n_permutations : int, default=500
        Permutations of every MMD test.
    n_bootstrap : int, default=200
        Bootstrap resamples of the target set (prior and score intervals).
    alpha : float, default=0.05
        Level of the ``evidence`` column of :meth:`ShiftDiagnosis.summary`.
    max_samples : int or None, default=1000
        Sub-sampling cap of the MMD tests.
    random_state : int, RandomState instance or None

    Returns
    -------
    ShiftDiagnosis
        With ``summary()`` (DataFrame), ``advice()`` and ``plot()``.

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import diagnose_shift
    >>> rng = np.random.default_rng(0)
    >>> ys = rng.integers(0, 2, 300); yt = (rng.random(300) < 0.2).astype(int)
    >>> Xs = rng.normal(size=(300, 4)) + 2.0 * ys[:, None]
    >>> Xt = rng.normal(size=(300, 4)) + 2.0 * yt[:, None]
    >>> diag = diagnose_shift(Xs, ys, Xt, n_permutations=100, random_state=0)
    >>> diag.label_shift, round(float(diag.target_priors[1]), 1)
    (True, 0.2)
    """
    from ._label_shift import LabelShiftAdapter, em_prior_estimate

    Xs, Xt = _check_pair(X_source, X_target)
    ys = column_or_1d(y_source, warn=True)
    check_classification_targets(ys)
    if len(ys) != len(Xs):
        raise ValueError(f"y_source has {len(ys)} labels but X_source has {len(Xs)} rows.")
    classes, ys_idx = np.unique(ys, return_inverse=True)
    k = len(classes)
    if k < 2:
        raise ValueError(f"y_source needs at least 2 classes, got {classes.tolist()!r}.")
    yt_idx = None
    if y_target is not None:
        yt = column_or_1d(y_target, warn=True)
        if len(yt) != len(Xt):
            raise ValueError(f"y_target has {len(yt)} labels but X_target has {len(Xt)} rows.")
        unknown = np.setdiff1d(yt, classes)
        if unknown.size:
            raise ValueError(
                f"y_target has classes {unknown.tolist()!r} absent from y_source "
                f"({classes.tolist()!r})."
            )
        yt_idx = np.searchsorted(classes, yt)
    if not (isinstance(alpha, Real) and 0 < alpha < 1):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")
    if not (isinstance(n_bootstrap, Integral) and n_bootstrap >= 10):
        raise ValueError(f"n_bootstrap must be an integer >= 10, got {n_bootstrap!r}.")
    seed = root_seed(random_state)

    # p(x)
    mmd = mmd_test(
        Xs,
        Xt,
        n_permutations=n_permutations,
        max_samples=max_samples,
        random_state=derive_seed(seed, "mmd"),
    )
    err, dom_auc = _domain_classifier(
        Xs, Xt, domain_estimator or estimator, cv, derive_seed(seed, "domain classifier")
    )
    pad = 2.0 * (1.0 - 2.0 * err)

    # source model, calibrated held-out posteriors
    min_count = int(np.bincount(ys_idx).min())
    ada = LabelShiftAdapter(
        _default_classifier() if estimator is None else estimator,
        cv=int(max(2, min(cv, min_count))),
        random_state=derive_seed(seed, "source model"),
    ).fit(Xs, ys_idx)
    source_score = _score(ys_idx, ada.held_out_proba_, k)
    proba_t = ada.predict_proba(Xt)  # calibrated, not adapted
    source_priors = np.bincount(ys_idx, minlength=k) / len(ys_idx)

    boot_rng = np.random.default_rng(derive_seed(seed, "bootstrap"))
    boot_idx = [boot_rng.integers(0, len(Xt), len(Xt)) for _ in range(n_bootstrap)]
    # p(y)
    if yt_idx is not None:
        target_priors = np.bincount(yt_idx, minlength=k) / len(yt_idx)
        method, ci = "observed", None
        table = np.vstack([np.bincount(ys_idx, minlength=k), np.bincount(yt_idx, minlength=k)])
        table = table[:, table.sum(axis=0) > 0]
        prior_p = float(stats.chi2_contingency(table).pvalue) if table.shape[1] > 1 else 1.0
    else:
        method = "em"

        def em(p):
            return em_prior_estimate(p, ada.source_priors_, max_iter=2000, tol=1e-6)

        target_priors = em(proba_t)
        with warnings.catch_warnings():
            # a resample may sit on the boundary (prior -> 0) where EM converges slowly
            warnings.simplefilter("ignore", ConvergenceWarning)
            boot = np.array([em(proba_t[b]) for b in boot_idx])
        ci = np.percentile(boot, [2.5, 97.5], axis=0).T
        # compare with the priors the source model itself implies
        ps = [
            _bootstrap_p(boot[:, c], target_priors[c], ada.source_priors_[c], two_sided=True)
            for c in range(k)
        ]
        prior_p = float(min(1.0, min(ps) * (k if k > 2 else 1)))

    # p(x | y)
    if yt_idx is not None:
        yt_used, cond_labels = yt_idx, "observed"
    else:
        adjusted = reweight_posteriors(proba_t, target_priors / ada.source_priors_)
        yt_used, cond_labels = adjusted.argmax(axis=1), "pseudo"
    conditional = {}
    for c in range(k):
        a, b = Xs[ys_idx == c], Xt[yt_used == c]
        if len(a) >= 5 and len(b) >= 5:
            conditional[classes[c]] = mmd_test(
                a, b, n_permutations=n_permutations, max_samples=max_samples,
                random_state=derive_seed(seed, "mmd p(x|y)", c),
            )  # fmt: skip

    # p(y | x)
    target_score = score_ci = concept_p = None
    if yt_idx is not None and len(np.unique(yt_idx)) == k:
        target_score = _score(yt_idx, proba_t, k)
        boots = []
        for b in boot_idx:
            if len(np.unique(yt_idx[b])) == k:
                boots.append(_score(yt_idx[b], proba_t[b], k))
        boots = np.asarray(boots)
        score_ci = np.percentile(boots, [2.5, 97.5])
        concept_p = _bootstrap_p(boots, target_score, source_score, two_sided=False)

    # 2-D projection for plots
    pooled = np.vstack([Xs, Xt])
    sd = pooled.std(axis=0)
    sd[sd == 0] = 1.0
    Z = (pooled - pooled.mean(axis=0)) / sd
    if Z.shape[1] >= 2:
        _, _, vt = np.linalg.svd(Z - Z.mean(axis=0), full_matrices=False)
        proj = Z @ vt[:2].T
    else:
        proj = np.column_stack([Z[:, 0], np.zeros(len(Z))])
    projection = {"source": proj[: len(Xs)], "target": proj[len(Xs) :]}

    return ShiftDiagnosis(
        classes=classes,
        mmd=mmd,
        proxy_a_distance=float(pad),
        domain_auc=float(dom_auc),
        source_priors=source_priors,
        target_priors=np.asarray(target_priors, dtype=float),
        target_priors_method=method,
        target_priors_ci=ci,
        prior_p_value=float(prior_p),
        conditional_mmd=conditional,
        conditional_labels=cond_labels,
        score_name="roc_auc" if k == 2 else "balanced_accuracy",
        source_score=source_score,
        target_score=target_score,
        target_score_ci=score_ci,
        concept_p_value=concept_p,
        alpha=float(alpha),
        projection=projection,
    )
