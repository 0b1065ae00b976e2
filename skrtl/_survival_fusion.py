"""Survival fusion: feature groups (early fusion) and model ensembles (late fusion).

:func:`make_survival_fusion` joins feature groups -- clinical variables, handcrafted
radiomics, deep CNN features -- in one scikit-learn Pipeline whose imputation, scaling and
per-group feature selection are refitted in every training fold, followed by a Cox model (or
any survival estimator). :class:`SurvivalEnsemble` averages the risk scores of several fitted
survival models on a common scale (training-set percentiles or z-scores).
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral

import numpy as np
from sklearn.base import _fit_context, clone
from sklearn.compose import ColumnTransformer
from sklearn.feature_selection import VarianceThreshold
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import Bunch
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.metaestimators import _BaseComposition
from sklearn.utils.validation import check_is_fitted

from ._redundancy import CorrelationClusterSelector
from ._survival import (
    CoxPHSurvival,
    SelectKBestSurvival,
    as_survival_target,
    concordance_index,
)
from ._survival_metrics import survival_function_at

__all__ = ["SurvivalEnsemble", "make_survival_fusion"]


def _group_k(k, name: str, columns):
    value = k.get(name, "all") if isinstance(k, Mapping) else k
    if value != "all" and not (
        isinstance(value, Integral) and not isinstance(value, bool) and value >= 0
    ):
        raise ValueError(
            f"k for group {name!r} must be a non-negative int or 'all', got {value!r}."
        )
    if value != "all" and isinstance(columns, list | tuple) and len(columns) <= value:
        return "all"  # keep a small group whole instead of warning in every fold
    return value


def make_survival_fusion(
    groups: Mapping,
    *,
    k=10,
    penalizer: float | None = None,
    l1_ratio: float | None = None,
    score_func="cox",
    impute: str | None = "median",
    redundancy=None,
    estimator=None,
) -> Pipeline:
    """Pipeline fusing feature groups for survival, with every step fitted inside each fold.

    Each group of columns (e.g. clinical variables, PyRadiomics features, deep CNN features)
    gets its own chain ``SimpleImputer -> VarianceThreshold -> [CorrelationClusterSelector] ->
    StandardScaler -> SelectKBestSurvival(k)`` inside a
    :class:`~sklearn.compose.ColumnTransformer`; the kept columns of all groups go to one
    :class:`~skrtl.CoxPHSurvival` (or ``estimator``). The result is a plain Pipeline: it
    clones, pickles and tunes in ``GridSearchCV``, with parameter names such as
    ``features__radiomics__select__k`` and ``model__penalizer``.

    Parameters
    ----------
    groups : dict of str -> columns
        Group name -> the columns of ``X`` it takes: a list of names or indices, or any
        ColumnTransformer column specification (e.g. ``make_column_selector``). Columns must be
        numeric (encode categories, e.g. stage I-IV as 1-4, first).
    k : int, "all" or dict of str -> int or "all", default=10
        Number of features each group keeps (univariate :class:`~skrtl.SelectKBestSurvival`
        fitted on the training fold). A dict sets it per group; groups it does not name keep
        all their columns (``k={"radiomics": 10, "deep": 20}`` keeps every clinical
        variable). A group with at most ``k`` listed columns is kept whole.
    penalizer : float, optional
        Penalty of the default Cox model (default 0.1). Not allowed with ``estimator``.
    l1_ratio : float, optional
        Elastic-net mix of the default Cox model (default 0). Not allowed with ``estimator``.
    score_func : {"cox", "concordance"} or callable, default="cox"
        Univariate score of :class:`~skrtl.SelectKBestSurvival`.
    impute : {"median", "mean"} or None, default="median"
        Imputation of missing values per group (fitted on the training fold); ``None`` for
        no imputer (then missing values raise).
    redundancy : float, dict of str -> float, or None, default=None
        Redundancy reduction before the selection: a :class:`~skrtl.CorrelationClusterSelector`
        with this ``threshold`` keeps one medoid per cluster of features correlated above it
        (Spearman), so that the univariate selection does not spend ``k`` on copies of one
        signal. A dict sets it per group (``{"radiomics": 0.9}``); ``None`` reduces nothing.
        The step is named ``reduce`` (``features__radiomics__reduce__threshold``).
    estimator : survival estimator, optional
        Final model instead of ``CoxPHSurvival(penalizer, l1_ratio)``, e.g. a
        scikit-survival ``RandomSurvivalForest`` (cloned when the pipeline is fitted in CV).

    Returns
    -------
    Pipeline
        ``Pipeline([("features", ColumnTransformer([...])), ("model", estimator)])``; each
        group's chain has the steps ``impute`` (if any), ``variance``, ``reduce`` (with
        ``redundancy``), ``scale``, ``select``.

    Examples
    --------
    >>> from skrtl import make_survival_fusion
    >>> model = make_survival_fusion(
    ...     {"clinical": ["age", "stage"], "radiomics": ["original_shape_VoxelVolume",
    ...      "original_firstorder_Energy", "original_glrlm_GrayLevelNonUniformity"]},
    ...     k={"radiomics": 2}, penalizer=0.1)
    >>> sorted(model.get_params())[:2]
    ['features', 'features__clinical']
    """
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(
            "groups must be a non-empty dict of group name -> columns, e.g. "
            f"{{'clinical': ['age', 'stage'], 'radiomics': radiomic_columns}}; got {groups!r}."
        )
    for name in groups:
        if not isinstance(name, str) or not name or "__" in name:
            raise ValueError(
                f"group names must be non-empty strings without '__' (they become parameter "
                f"names), got {name!r}."
            )
    if isinstance(k, Mapping):
        unknown = sorted(set(k) - set(groups))
        if unknown:
            raise ValueError(
                f"k names groups {unknown!r} that are not in groups {list(groups)!r}."
            )
    if isinstance(redundancy, Mapping):
        unknown = sorted(set(redundancy) - set(groups))
        if unknown:
            raise ValueError(
                f"redundancy names groups {unknown!r} that are not in groups {list(groups)!r}."
            )
    if impute not in ("median", "mean", None):
        raise ValueError(f"impute must be 'median', 'mean' or None, got {impute!r}.")
    if estimator is None:
        estimator = CoxPHSurvival(
            penalizer=0.1 if penalizer is None else penalizer,
            l1_ratio=0.0 if l1_ratio is None else l1_ratio,
        )
    elif penalizer is not None or l1_ratio is not None:
        raise ValueError(
            "penalizer and l1_ratio set the default CoxPHSurvival; with estimator= set them "
            f"on that estimator instead (got penalizer={penalizer!r}, l1_ratio={l1_ratio!r})."
        )
    transformers = []
    for name, columns in groups.items():
        if isinstance(columns, np.ndarray | tuple):
            columns = list(columns)
        steps = [] if impute is None else [("impute", SimpleImputer(strategy=impute))]
        steps.append(("variance", VarianceThreshold()))
        threshold = redundancy.get(name) if isinstance(redundancy, Mapping) else redundancy
        if threshold is not None:
            steps.append(("reduce", CorrelationClusterSelector(threshold=threshold)))
        steps += [
            ("scale", StandardScaler()),
            ("select", SelectKBestSurvival(k=_group_k(k, name, columns), score_func=score_func)),
        ]
        transformers.append((name, Pipeline(steps), columns))
    return Pipeline(
        [
            ("features", ColumnTransformer(transformers, remainder="drop")),
            ("model", estimator),
        ]
    )


def _training_percentile(ref: np.ndarray, risk: np.ndarray) -> np.ndarray:
    """Mid-rank percentile of ``risk`` among the sorted training risks ``ref``.

    Exact at the training values (ties share their mid-rank), linear in between (so that a
    risk that differs from a training value in the last bit does not jump by ``1 / n``), and
    clamped to the lowest / highest training percentile outside the training range.
    """
    values, first, counts = np.unique(ref, return_index=True, return_counts=True)
    mid = (2.0 * first + counts) / (2.0 * ref.size)
    return np.interp(risk, values, mid)


class SurvivalEnsemble(_BaseComposition):
    """Average the risk scores of several survival models (late fusion, rank or z-score).

    Each member is cloned and fitted on the same data. Their risks live on different scales
    (a Cox linear predictor, a random survival forest's cumulative hazard...), so each is
    first mapped to a common one learnt on the training data: its (mid-rank, linearly
    interpolated) percentile among the training risks (``combine="rank"``, robust to outliers
    and to the scale) or its z-score (``"zscore"``). The ensemble risk is the weighted mean;
    **higher = shorter survival**. ``predict_survival_function`` averages the members'
    survival functions.

    Parameters
    ----------
    estimators : list of (str, estimator)
        Named survival models (Pipelines welcome), each with ``predict`` returning a risk
        score (higher = shorter survival). Parameters are reachable as ``<name>__<param>``
        for GridSearchCV; a member may itself be a GridSearchCV (nested tuning).
    combine : {"rank", "zscore"}, default="rank"
        How member risks are put on one scale before averaging.
    weights : array-like of shape (n_estimators,), optional
        Non-negative weights of the members (default equal).

    Attributes
    ----------
    estimators_ : list of estimators
        Fitted clones, in the order of ``estimators``.
    named_estimators_ : Bunch
        The fitted members by name.
    train_risks_ : list of ndarray
        Sorted training risks of each member (``combine="rank"``).
    risk_mean_, risk_scale_ : ndarray of shape (n_estimators,)
        Training mean and standard deviation of each member's risk (``combine="zscore"``).
    survival_train_ : structured array
        The training target (for the IPCW scorers).
    event_times_ : ndarray
        Distinct training event times (default grid of :meth:`predict_survival_function`).

    Examples
    --------
    >>> from sklearn.decomposition import PCA
    >>> from sklearn.pipeline import make_pipeline
    >>> from skrtl import CoxPHSurvival, SurvivalEnsemble
    >>> ens = SurvivalEnsemble([("cox", CoxPHSurvival(penalizer=0.1)),
    ...                         ("pca_cox", make_pipeline(PCA(2), CoxPHSurvival()))])
    >>> ens.set_params(cox__penalizer=1.0).get_params()["cox__penalizer"]
    1.0
    """

    _parameter_constraints: dict = {
        "estimators": [list],
        "combine": [StrOptions({"rank", "zscore"})],
        "weights": [None, "array-like"],
    }

    def __init__(self, estimators, *, combine="rank", weights=None):
        self.estimators = estimators
        self.combine = combine
        self.weights = weights

    def get_params(self, deep=True):
        return self._get_params("estimators", deep=deep)

    def set_params(self, **params):
        self._set_params("estimators", **params)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def _weights(self) -> np.ndarray:
        n = len(self.estimators)
        if self.weights is None:
            return np.full(n, 1.0 / n)
        w = np.asarray(self.weights, dtype=float)
        if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"weights must be {n} non-negative numbers (one per estimator) with a positive "
                f"sum, got {self.weights!r}."
            )
        return w / w.sum()

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y):
        """Fit every member on ``(X, y)`` and learn the scale of its risks.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
        y : survival target (structured array or DataFrame, see
            :func:`~skrtl.as_survival_target`)

        Returns
        -------
        self
        """
        if not self.estimators:
            raise ValueError("estimators must be a non-empty list of (name, estimator).")
        names, ests = zip(*self.estimators)
        self._validate_names(names)
        self._weights()
        y = as_survival_target(y)
        self.estimators_ = [clone(est).fit(X, y) for est in ests]
        self.named_estimators_ = Bunch(**dict(zip(names, self.estimators_)))
        risks = [np.asarray(est.predict(X), dtype=float).ravel() for est in self.estimators_]
        self.train_risks_ = [np.sort(r) for r in risks]
        self.risk_mean_ = np.array([r.mean() for r in risks])
        scale = np.array([r.std() for r in risks])
        self.risk_scale_ = np.where(scale > 0, scale, 1.0)
        self.survival_train_ = y
        self.event_times_ = np.unique(y["time"][y["event"]])
        return self

    @property
    def n_features_in_(self):
        check_is_fitted(self)
        return self.estimators_[0].n_features_in_

    def _member_scores(self, X) -> np.ndarray:
        check_is_fitted(self)
        cols = []
        for i, est in enumerate(self.estimators_):
            r = np.asarray(est.predict(X), dtype=float).ravel()
            if self.combine == "rank":
                cols.append(_training_percentile(self.train_risks_[i], r))
            else:
                cols.append((r - self.risk_mean_[i]) / self.risk_scale_[i])
        return np.column_stack(cols)

    def predict(self, X) -> np.ndarray:
        """Ensemble risk score (higher = shorter survival).

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
            Weighted mean of the members' training percentiles (``combine="rank"``, in
            [0, 1]) or z-scores (``"zscore"``).
        """
        return self._member_scores(X) @ self._weights()

    def predict_survival_function(self, X, times=None) -> np.ndarray:
        """Weighted mean of the members' survival functions ``S(t | x)`` at ``times``.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
        times : array-like of shape (n_times,), optional
            Defaults to ``event_times_``. Every member must predict survival functions (see
            :func:`~skrtl.survival_function_at`).

        Returns
        -------
        ndarray of shape (n_samples, n_times)
        """
        check_is_fitted(self)
        times = self.event_times_ if times is None else np.asarray(times, dtype=float).ravel()
        w = self._weights()
        return sum(
            wi * survival_function_at(est, X, times) for wi, est in zip(w, self.estimators_)
        )

    def score(self, X, y) -> float:
        """Harrell's C-index of :meth:`predict` (higher risk = shorter survival)."""
        return concordance_index(y, self.predict(X))
