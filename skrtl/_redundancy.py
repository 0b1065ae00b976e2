"""Redundancy reduction: one representative feature per cluster of correlated features.

Radiomics sets hold many near-copies of the same measurement (a first-order statistic on the
original image and on its LoG and wavelet filterings; shape features that all grow with
volume). Univariate selection then picks several copies of one signal, and a Cox model on
them is unstable. :class:`CorrelationClusterSelector` clusters the features by their absolute
(Spearman or Pearson) correlation and keeps the medoid of each cluster; it learns only from
``X`` (unsupervised), so it can sit anywhere in a Pipeline before a supervised selector.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, _fit_context
from sklearn.feature_selection import SelectorMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["CorrelationClusterSelector"]


class CorrelationClusterSelector(SelectorMixin, BaseEstimator):
    """Keep one feature per cluster of correlated features (the cluster's medoid).

    Features are clustered hierarchically on the distance ``1 - |r|``, ``r`` their Spearman
    (default) or Pearson correlation, and the tree is cut at ``1 - threshold``: with the
    default complete linkage every pair of features in a cluster has ``|r| >= threshold``.
    Each cluster is represented by its medoid, the member with the largest mean ``|r|`` to
    the other members (the lowest column index on ties). Constant features form clusters of
    their own. ``y`` is ignored: the selection is unsupervised and leaks no outcome.

    Parameters
    ----------
    threshold : float in (0, 1], default=0.9
        Absolute correlation above which features count as redundant. ``1`` keeps every
        feature (only exact copies merge).
    method : {"spearman", "pearson"}, default="spearman"
        Spearman is robust to the skewed distributions of radiomic features.
    linkage : {"complete", "average", "single"}, default="complete"
        ``"complete"``: all pairs of a cluster reach ``threshold``; ``"average"``: their mean
        distance does; ``"single"``: chains of correlated features merge (largest clusters).

    Attributes
    ----------
    labels_ : ndarray of shape (n_features_in_,)
        Cluster of each feature (0-based).
    n_clusters_ : int
    representatives_ : ndarray of shape (n_clusters_,)
        Column index of each cluster's medoid, sorted.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` was a DataFrame with string column names.

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import CorrelationClusterSelector
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(2, 50))
    >>> X = np.column_stack([a, a + 0.01 * rng.normal(size=50), b, 2 * b])
    >>> CorrelationClusterSelector(threshold=0.9).fit(X).get_support()
    array([ True, False,  True, False])
    """

    _parameter_constraints: dict = {
        "threshold": [Interval(Real, 0, 1, closed="right")],
        "method": [StrOptions({"spearman", "pearson"})],
        "linkage": [StrOptions({"complete", "average", "single"})],
    }

    def __init__(self, *, threshold=0.9, method="spearman", linkage="complete"):
        self.threshold = threshold
        self.method = method
        self.linkage = linkage

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Cluster the features of ``X`` and pick each cluster's medoid.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self
        """
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        corr = np.abs(self._correlation(X))
        n = X.shape[1]
        if n == 1:
            labels = np.zeros(1, dtype=int)
        else:
            dist = np.clip(1.0 - corr, 0.0, None)
            np.fill_diagonal(dist, 0.0)
            tree = linkage(squareform(dist, checks=False), method=self.linkage)
            # a distance just above 1 - threshold so that |r| == threshold still merges
            cut = (1.0 - float(self.threshold)) * (1 + 1e-12) + 1e-12
            labels = fcluster(tree, t=cut, criterion="distance") - 1
        reps = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if members.size == 1:
                reps.append(members[0])
                continue
            sub = corr[np.ix_(members, members)]
            closeness = (sub.sum(axis=1) - 1.0) / (members.size - 1)
            reps.append(members[int(np.argmax(closeness))])
        _, self.labels_ = np.unique(labels, return_inverse=True)
        self.representatives_ = np.sort(np.asarray(reps, dtype=int))
        self.n_clusters_ = int(self.representatives_.size)
        return self

    def _correlation(self, X: np.ndarray) -> np.ndarray:
        if self.method == "spearman":
            X = np.apply_along_axis(rankdata, 0, X)
        Xc = X - X.mean(axis=0)
        sd = np.sqrt((Xc**2).sum(axis=0))
        constant = sd == 0
        Z = Xc / np.where(constant, 1.0, sd)
        corr = Z.T @ Z
        # a constant feature correlates with nothing (not even another constant one)
        corr[constant, :] = 0.0
        corr[:, constant] = 0.0
        np.fill_diagonal(corr, 1.0)
        return np.clip(corr, -1.0, 1.0)

    def _get_support_mask(self):
        check_is_fitted(self, "representatives_")
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.representatives_] = True
        return mask

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
