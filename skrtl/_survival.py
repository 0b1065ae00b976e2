"""Survival analysis as scikit-learn estimators: penalized Cox model, C-index scorers, selection.

Radiomics and deep-feature studies often predict *time to event* (overall survival, time to
progression) rather than a class. This module makes a Cox proportional-hazards model a plain
scikit-learn estimator so it can sit at the end of a :class:`~sklearn.pipeline.Pipeline`
(scaling, feature selection, PCA, ...) and be tuned with
:class:`~sklearn.model_selection.GridSearchCV` or evaluated with
:func:`~sklearn.model_selection.cross_validate`.

Survival targets are numpy *structured arrays* with two fields, the event indicator first and
the time second -- the layout of scikit-survival's ``Surv.from_arrays``. Build them with
:func:`make_survival_target`.

Sign convention (important)
---------------------------
``CoxPHSurvival.predict`` returns a **risk score**: the linear predictor (log partial hazard)
``(x - mean_) @ coef_``. **Higher = higher hazard = shorter expected survival.** All C-index
functions here take such risk scores, like scikit-survival's ``concordance_index_censored(event,
time, risk)``. lifelines' ``concordance_index(T, score, E)`` takes the opposite (higher = longer
survival), so ``lifelines.utils.concordance_index(T, -risk, E)`` equals
``concordance_index(make_survival_target(E, T), risk)``.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.base import BaseEstimator, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectorMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    _check_sample_weight,
    check_consistent_length,
    check_is_fitted,
    validate_data,
)

__all__ = [
    "CoxPHSurvival",
    "SelectKBestSurvival",
    "concordance_index",
    "concordance_scorer",
    "cox_score_test",
    "kaplan_meier",
    "make_concordance_scorer",
    "make_survival_target",
]

_GUIDANCE = (
    "For many correlated features (deep CNN features, full radiomics sets) use a penalty "
    "(penalizer=0.1 or larger; l1_ratio>0 for sparsity) and/or reduce the features inside the "
    "Pipeline before the Cox model: VarianceThreshold, StandardScaler + "
    "SelectKBestSurvival(k=10..50), or PCA(n_components=10..30)."
)


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------
def make_survival_target(event, time) -> np.ndarray:
    """Build a survival target: a structured array with fields ``("event", "time")``.

    The layout matches scikit-survival's ``Surv.from_arrays(event, time)``, so targets built
    here work with scikit-survival too, and its targets work with skrtl.

    Parameters
    ----------
    event : array-like of shape (n_samples,)
        Event indicator: ``True``/``1`` if the event (e.g. death) was observed, ``False``/``0``
        if the time is censored.
    time : array-like of shape (n_samples,)
        Time of the event or of censoring (any unit, e.g. days). Finite and non-negative.

    Returns
    -------
    ndarray of shape (n_samples,)
        Structured array with dtype ``[("event", bool), ("time", float)]``.

    Examples
    --------
    >>> from skrtl._survival import make_survival_target
    >>> y = make_survival_target([1, 0, 1], [5.0, 8.0, 2.5])
    >>> y["event"], y["time"]
    (array([ True, False,  True]), array([5. , 8. , 2.5]))
    """
    event = np.asarray(event)
    time = np.asarray(time)
    if event.ndim != 1 or time.ndim != 1:
        raise ValueError(
            f"event and time must be 1-D, got shapes {event.shape!r} and {time.shape!r}."
        )
    if event.shape[0] != time.shape[0]:
        raise ValueError(
            f"event has {event.shape[0]} entries but time has {time.shape[0]}; they must be "
            "aligned (one entry per sample)."
        )
    event = _as_event(event, "event")
    time = _as_time(time, "time")
    out = np.empty(event.shape[0], dtype=[("event", bool), ("time", float)])
    out["event"] = event
    out["time"] = time
    return out


def _as_event(event: np.ndarray, name: str) -> np.ndarray:
    if event.dtype == bool:
        return event
    try:
        ev = event.astype(float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold booleans or 0/1, got dtype {event.dtype!r}.") from None
    bad = ~np.isin(ev, (0.0, 1.0))
    if bad.any():
        raise ValueError(
            f"{name} must hold booleans or 0/1 (1 = event observed, 0 = censored), got value "
            f"{event[np.flatnonzero(bad)[0]]!r}."
        )
    return ev.astype(bool)


def _as_time(time: np.ndarray, name: str) -> np.ndarray:
    try:
        t = time.astype(float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got dtype {time.dtype!r}.") from None
    if not np.isfinite(t).all():
        raise ValueError(
            f"{name} contains NaN or infinite values; every sample needs a finite event or "
            "censoring time (drop samples with unknown follow-up)."
        )
    if (t < 0).any():
        raise ValueError(f"{name} must be non-negative, got minimum {t.min()!r}.")
    return t


def _check_survival_y(y, *, estimator_name: str = "estimator") -> tuple[np.ndarray, np.ndarray]:
    """Return ``(event, time)`` from a structured survival target, or raise a clear error."""
    if y is None:
        raise ValueError(
            f"{estimator_name} requires y to be passed, but the target y is None. Pass a "
            "survival target: y = skrtl.make_survival_target(event, time)."
        )
    if isinstance(y, pd.DataFrame):
        y = y.to_records(index=False)
    y = np.asarray(y)
    names = y.dtype.names
    if names is None or len(names) != 2 or y.ndim != 1:
        raise ValueError(
            f"{estimator_name} needs a survival target: a structured array with two fields, "
            "event indicator first and time second, e.g. "
            "y = skrtl.make_survival_target(event, time) (same layout as scikit-survival's "
            f"Surv.from_arrays). Got an array of dtype {y.dtype!r} and shape {y.shape!r}."
        )
    event = _as_event(np.asarray(y[names[0]]), f"y[{names[0]!r}] (event)")
    time = _as_time(np.asarray(y[names[1]]), f"y[{names[1]!r}] (time)")
    return event, time


# --------------------------------------------------------------------------------------------
# Kaplan-Meier
# --------------------------------------------------------------------------------------------
def kaplan_meier(time, event, *, sample_weight=None) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate of ``P(T > t)``.

    Parameters
    ----------
    time : array-like of shape (n_samples,)
    event : array-like of shape (n_samples,)
        1 where the "event" of interest happened at ``time``. Pass ``~event`` to estimate the
        *censoring* distribution (used by Uno's IPCW C-index).
    sample_weight : array-like of shape (n_samples,), optional

    Returns
    -------
    times : ndarray
        Sorted distinct times.
    survival : ndarray
        Right-continuous survival probability at each of ``times``. Subjects whose event and
        censoring coincide count as still at risk at that time.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    w = np.ones_like(time) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    times, inv = np.unique(time, return_inverse=True)
    d = np.bincount(inv, weights=w * event, minlength=times.size)
    total = np.bincount(inv, weights=w, minlength=times.size)
    at_risk = np.cumsum(total[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(at_risk > 0, d / at_risk, 0.0)
    return times, np.cumprod(1.0 - frac)


def _step_left(times: np.ndarray, values: np.ndarray, t: np.ndarray, start: float) -> np.ndarray:
    """Left limit ``f(t-)`` of a right-continuous step function."""
    idx = np.searchsorted(times, t, side="left") - 1
    return np.where(idx >= 0, values[np.clip(idx, 0, None)], start)


def _step_right(times: np.ndarray, values: np.ndarray, t: np.ndarray, start: float) -> np.ndarray:
    """Value ``f(t)`` of a right-continuous step function."""
    idx = np.searchsorted(times, t, side="right") - 1
    return np.where(idx >= 0, values[np.clip(idx, 0, None)], start)


# --------------------------------------------------------------------------------------------
# concordance
# --------------------------------------------------------------------------------------------
def _concordance_counts(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    *,
    row_weight: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    tau: float | None = None,
) -> tuple[float, float, float]:
    """Weighted (concordant, tied-risk, comparable) pair totals.

    Pair (i, j) is comparable when ``event[i]`` and (``time[i] < time[j]`` or ``time[i] ==
    time[j]`` and j is censored), and ``time[i] < tau``. It is concordant when ``risk[i] >
    risk[j]``. Each pair carries ``row_weight[i] * sample_weight[i] * sample_weight[j]``.
    """
    n = time.shape[0]
    rows = np.flatnonzero(event if tau is None else event & (time < tau))
    sw = np.ones(n) if sample_weight is None else sample_weight
    rw = np.ones(n) if row_weight is None else row_weight
    conc = tied = comp = 0.0
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, rows.size, chunk):
        r = rows[start : start + chunk]
        ti = time[r, None]
        comparable = (time[None, :] > ti) | ((time[None, :] == ti) & ~event[None, :])
        wpair = comparable * (rw[r] * sw[r])[:, None] * sw[None, :]
        ri = risk[r, None]
        conc += float((wpair * (ri > risk[None, :])).sum())
        tied += float((wpair * (ri == risk[None, :])).sum())
        comp += float(wpair.sum())
    return conc, tied, comp


def concordance_index(
    y,
    risk,
    *,
    method: str = "harrell",
    y_train=None,
    tau: float | None = None,
    sample_weight=None,
) -> float:
    """Concordance index (C-index) of risk scores: Harrell's C or Uno's IPCW C.

    **Convention: higher ``risk`` = shorter survival** (e.g. ``CoxPHSurvival.predict``, a
    hazard ratio, a predicted probability of death). For predicted *survival times* pass
    their negation. A pair of samples (i, j) is comparable when i had the event and j was still
    under follow-up at that time (``time[i] < time[j]``, or equal times with j censored); it is
    concordant when ``risk[i] > risk[j]``; tied risks count 1/2. This equals
    ``lifelines.utils.concordance_index(time, -risk, event)`` and scikit-survival's
    ``concordance_index_censored(event, time, risk)[0]``.

    Parameters
    ----------
    y : structured array of shape (n_samples,)
        Survival target (:func:`make_survival_target`).
    risk : array-like of shape (n_samples,)
        Predicted risk scores.
    method : {"harrell", "uno"}
        ``"harrell"``: Harrell's C (depends on the censoring distribution). ``"uno"``: Uno's
        C, where each comparable pair is weighted by ``1 / G(time[i]-)**2``, ``G`` the
        Kaplan-Meier estimate of the censoring survival function; consistent for the
        concordance up to ``tau`` whatever the (independent) censoring.
    y_train : structured array, optional
        Target whose censoring distribution ``G`` is estimated (``method="uno"``); usually the
        training target. Defaults to ``y``.
    tau : float, optional
        Truncation time: only pairs with ``time[i] < tau`` count. For ``"uno"`` event times at
        which ``G`` has dropped to 0 (beyond the last follow-up of ``y_train``) are always
        left out, since their weight is undefined; pass ``tau`` to make the horizon explicit.
    sample_weight : array-like of shape (n_samples,), optional
        Pair (i, j) counts ``sample_weight[i] * sample_weight[j]`` times (integer weights are
        equivalent to repeating samples).

    Returns
    -------
    float
        C in [0, 1]; 0.5 is random, 1 perfect ranking.

    Raises
    ------
    ValueError
        If there is no comparable pair (e.g. no event).
    """
    event, time = _check_survival_y(y, estimator_name="concordance_index")
    risk = np.asarray(risk, dtype=float).ravel()
    check_consistent_length(time, risk)
    if not np.isfinite(risk).all():
        raise ValueError(
            "risk contains NaN or infinite values; a diverged model (increase the penalty) or "
            "missing features are the usual cause."
        )
    if method not in ("harrell", "uno"):
        raise ValueError(f"method must be 'harrell' or 'uno', got {method!r}.")
    sw = None if sample_weight is None else _check_sample_weight(sample_weight, risk)
    row_weight = None
    if method == "uno":
        if y_train is None:
            ev_tr, t_tr = event, time
        else:
            ev_tr, t_tr = _check_survival_y(y_train, estimator_name="concordance_index(y_train)")
        g_times, g_surv = kaplan_meier(t_tr, ~ev_tr)
        row_weight = _ipcw_weights(g_times, g_surv, time)
    conc, tied, comp = _concordance_counts(
        time, event, risk, row_weight=row_weight, sample_weight=sw, tau=tau
    )
    if comp == 0:
        raise ValueError(
            f"No comparable pairs: the C-index needs at least one event that happened before "
            f"another sample's event or censoring time (n={time.size}, events="
            f"{int(event.sum())}, tau={tau!r}). Use larger test folds or a later tau."
        )
    return (conc + 0.5 * tied) / comp


def _ipcw_weights(g_times: np.ndarray, g_surv: np.ndarray, time: np.ndarray) -> np.ndarray:
    g = _step_left(g_times, g_surv, time, 1.0)
    with np.errstate(divide="ignore"):
        return np.where(g > 0, 1.0 / np.square(g), 0.0)


class _ConcordanceScorer:
    """Scorer ``scorer(estimator, X, y)`` computing the C-index of ``estimator.predict(X)``."""

    def __init__(self, method: str = "harrell", tau: float | None = None, censoring="auto"):
        self.method = method
        self.tau = tau
        self.censoring = censoring

    def __call__(self, estimator, X, y, sample_weight=None) -> float:
        risk = estimator.predict(X)
        if self.method == "harrell":
            return concordance_index(y, risk, tau=self.tau, sample_weight=sample_weight)
        event, time = _check_survival_y(y, estimator_name="concordance scorer")
        g = _censoring_of(estimator) if self.censoring == "auto" else None
        if g is None:
            g = kaplan_meier(time, ~event)
        row_weight = _ipcw_weights(g[0], g[1], time)
        risk = np.asarray(risk, dtype=float).ravel()
        sw = None if sample_weight is None else _check_sample_weight(sample_weight, risk)
        conc, tied, comp = _concordance_counts(
            time, event, risk, row_weight=row_weight, sample_weight=sw, tau=self.tau
        )
        if comp == 0:
            raise ValueError("No comparable pairs in this split for Uno's C-index.")
        return (conc + 0.5 * tied) / comp

    def __repr__(self) -> str:
        return (
            f"make_concordance_scorer(method={self.method!r}, tau={self.tau!r}, "
            f"censoring={self.censoring!r})"
        )


def _censoring_of(estimator):
    """The training censoring distribution stored by a fitted skrtl survival estimator."""
    for _ in range(8):
        if hasattr(estimator, "censoring_times_"):
            return estimator.censoring_times_, estimator.censoring_survival_
        if hasattr(estimator, "best_estimator_"):
            estimator = estimator.best_estimator_
        elif hasattr(estimator, "_final_estimator"):
            estimator = estimator._final_estimator
        else:
            return None
    return None


def make_concordance_scorer(
    method: str = "harrell", *, tau: float | None = None, censoring: str = "auto"
):
    """Make a C-index scorer for ``scoring=`` in GridSearchCV, cross_validate, ...

    The scorer calls ``estimator.predict(X)`` and treats the result as a risk score (higher =
    shorter survival; see :func:`concordance_index`).

    Parameters
    ----------
    method : {"harrell", "uno"}
        Harrell's C or Uno's IPCW C.
    tau : float, optional
        Truncation time (pairs whose earlier time is ``>= tau`` are ignored).
    censoring : {"auto", "test"}
        Where Uno's censoring distribution comes from. ``"auto"``: the training censoring
        distribution stored by a fitted :class:`CoxPHSurvival` (also found inside a
        Pipeline / GridSearchCV), else the test fold's own. ``"test"``: always the test fold.

    Returns
    -------
    callable
        ``scorer(estimator, X, y, sample_weight=None) -> float``.

    Examples
    --------
    >>> from skrtl._survival import make_concordance_scorer
    >>> scoring = {"harrell": make_concordance_scorer(), "uno": make_concordance_scorer("uno")}
    """
    if method not in ("harrell", "uno"):
        raise ValueError(f"method must be 'harrell' or 'uno', got {method!r}.")
    if censoring not in ("auto", "test"):
        raise ValueError(f"censoring must be 'auto' or 'test', got {censoring!r}.")
    if tau is not None and not (isinstance(tau, Real) and tau > 0):
        raise ValueError(f"tau must be a positive number or None, got {tau!r}.")
    return _ConcordanceScorer(method=method, tau=tau, censoring=censoring)


#: Harrell's C-index scorer (``scoring=concordance_scorer``).
concordance_scorer = make_concordance_scorer()


# --------------------------------------------------------------------------------------------
# Cox model
# --------------------------------------------------------------------------------------------
class CoxPHSurvival(BaseEstimator):
    """Cox proportional-hazards model (lifelines' ``CoxPHFitter``) as a scikit-learn estimator.

    Fits exactly lifelines' penalized Cox model (Efron ties, Breslow baseline) on a feature
    matrix and a structured survival target, so it can be cloned and used in Pipelines,
    ``GridSearchCV`` and ``cross_val_score`` (lifelines' own sklearn adapter cannot be cloned).

    Parameters
    ----------
    penalizer : float or array-like of shape (n_features,), default=0.0
        Strength of the elastic-net penalty, applied by lifelines to the *standardized*
        coefficients (so it does not depend on feature units):
        ``penalizer * (l1_ratio * |beta|_1 + 0.5 * (1 - l1_ratio) * |beta|_2^2)``. Needed when
        features are many or correlated (deep features, full radiomics sets): with
        ``penalizer=0`` and at least as many features as events the model has no finite
        solution and fitting raises.
    l1_ratio : float in [0, 1], default=0.0
        Share of the L1 (lasso) part of the penalty; > 0 gives (approximately) sparse
        coefficients.
    max_iter : int, default=500
        Maximum Newton-Raphson steps.
    tol : float, default=1e-7
        Convergence tolerance on the Newton decrement.
    step_size : float in (0, 1], default=0.95
        Initial Newton step size (lifelines halves it when the likelihood gets worse).
    verbose : int, default=0
        Print lifelines' per-iteration progress when > 0.

    Attributes
    ----------
    coef_ : ndarray of shape (n_features_in_,)
        Log hazard ratio per unit of each feature (0 for constant features, which are left out
        of the fit since they carry no information).
    mean_ : ndarray of shape (n_features_in_,)
        Training means; the linear predictor is centered on them (like lifelines).
    unique_times_ : ndarray
        Distinct training times, the grid of the baseline hazard.
    baseline_cumulative_hazard_ : ndarray
        Breslow baseline cumulative hazard at ``unique_times_`` (for a sample at ``mean_``).
    baseline_survival_ : ndarray
        ``exp(-baseline_cumulative_hazard_)``.
    event_times_ : ndarray
        Distinct training event times (default grid of :meth:`predict_survival_function`).
    censoring_times_, censoring_survival_ : ndarray
        Kaplan-Meier estimate of the training *censoring* distribution (used by Uno's C).
    concordance_index_ : float
        Harrell's C on the training data (same value as lifelines' ``concordance_index_``).
    log_likelihood_ : float
        Penalized log partial likelihood at the optimum.
    lifelines_model_ : lifelines.CoxPHFitter
        The fitted lifelines model (``lifelines_model_.print_summary()``; standard errors and
        p-values are only meaningful without penalty).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when X was a DataFrame with string column names.

    Notes
    -----
    ``predict`` returns the linear predictor (log partial hazard): **higher = higher risk =
    shorter survival**; ``score`` is Harrell's C-index of that risk (see
    :func:`concordance_index`). Use ``predict_partial_hazard`` for hazard ratios
    ``exp(predict)``.

    Examples
    --------
    >>> from lifelines.datasets import load_rossi
    >>> from skrtl._survival import CoxPHSurvival, make_survival_target
    >>> df = load_rossi()
    >>> y = make_survival_target(df.pop("arrest"), df.pop("week"))
    >>> model = CoxPHSurvival(penalizer=0.01).fit(df, y)
    >>> round(model.score(df, y), 2)
    0.64
    """

    _parameter_constraints: dict = {
        "penalizer": [Interval(Real, 0, None, closed="left"), "array-like"],
        "l1_ratio": [Interval(Real, 0, 1, closed="both")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "step_size": [Interval(Real, 0, 1, closed="right")],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        penalizer=0.0,
        l1_ratio=0.0,
        max_iter=500,
        tol=1e-7,
        step_size=0.95,
        verbose=0,
    ):
        self.penalizer = penalizer
        self.l1_ratio = l1_ratio
        self.max_iter = max_iter
        self.tol = tol
        self.step_size = step_size
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.allow_nan = False
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the Cox model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : structured array of shape (n_samples,)
            Survival target from :func:`make_survival_target` (event, time). Times must be > 0.
        sample_weight : array-like of shape (n_samples,), optional
            Case weights (lifelines ``weights_col``).

        Returns
        -------
        self
        """
        from lifelines import CoxPHFitter

        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        event, time = _check_survival_y(y, estimator_name=type(self).__name__)
        check_consistent_length(X, time)
        if (time <= 0).any():
            raise ValueError(
                f"{type(self).__name__} needs strictly positive times (the Cox partial "
                f"likelihood is undefined at 0); got minimum {time.min()!r}. Add a small offset "
                "(e.g. 0.5 day) to zero times."
            )
        if not event.any():
            raise ValueError(
                f"y has no event (all {time.size} samples censored): a Cox model cannot be fitted."
            )
        sw = None
        if sample_weight is not None:
            sw = _check_sample_weight(sample_weight, X, ensure_non_negative=True)
            if not (sw > 0).any():
                raise ValueError(
                    "sample_weight is zero for every sample; at least one sample needs a "
                    "positive weight."
                )
            if (sw == 0).any():  # zero weight = sample left out (lifelines needs weights > 0)
                keep_rows = sw > 0
                X, event, time, sw = X[keep_rows], event[keep_rows], time[keep_rows], sw[keep_rows]
                if not event.any():
                    raise ValueError(
                        "every sample with an event has sample_weight 0: a Cox model needs at "
                        "least one weighted event."
                    )
        n_samples, n_features = X.shape
        penalizer = self.penalizer
        if not isinstance(penalizer, Real):
            penalizer = np.asarray(penalizer, dtype=float)
            if penalizer.shape != (n_features,) or (penalizer < 0).any():
                raise ValueError(
                    "penalizer must be a non-negative float or an array of shape "
                    f"(n_features,)=({n_features},) of non-negative floats, got shape "
                    f"{penalizer.shape!r}."
                )

        keep = X.max(axis=0) > X.min(axis=0)
        n_kept = int(keep.sum())
        n_events = int(event.sum())
        pen_kept = penalizer if isinstance(penalizer, Real) else penalizer[keep]
        if np.all(np.asarray(pen_kept) == 0) and n_kept >= n_events:
            raise ValueError(
                f"{type(self).__name__}(penalizer=0) with {n_kept} non-constant features and "
                f"only {n_events} events: the unpenalized Cox likelihood has no finite maximum "
                f"when features >= events. {_GUIDANCE}"
            )

        names = getattr(self, "feature_names_in_", None)
        names = (
            [str(c) for c in names] if names is not None else [f"x{i}" for i in range(n_features)]
        )
        kept_names = [nm for nm, k in zip(names, keep) if k]
        df = pd.DataFrame(X[:, keep], columns=kept_names)
        dur, ev, wcol = "__skrtl_time__", "__skrtl_event__", None
        df[dur] = time
        df[ev] = event.astype(int)
        if sw is not None:
            wcol = "__skrtl_weight__"
            df[wcol] = sw

        cph = CoxPHFitter(penalizer=pen_kept, l1_ratio=float(self.l1_ratio))
        fit_options = {
            "step_size": self.step_size,
            "precision": self.tol,
            "max_steps": self.max_iter,
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cph.fit(
                    df,
                    duration_col=dur,
                    event_col=ev,
                    weights_col=wcol,
                    show_progress=bool(self.verbose),
                    fit_options=fit_options,
                )
            except Exception as exc:
                if type(exc).__name__ != "ConvergenceError":
                    raise
                raise type(exc)(
                    f"{type(self).__name__}(penalizer={self.penalizer!r}, l1_ratio="
                    f"{self.l1_ratio!r}) did not converge on {n_samples} samples x {n_kept} "
                    f"features ({n_events} events): {str(exc).splitlines()[0]} {_GUIDANCE}"
                ) from exc
        self._reemit_warnings(caught, n_samples, n_kept, n_events)

        self.lifelines_model_ = cph
        coef = np.zeros(n_features)
        coef[keep] = cph.params_.to_numpy()
        mean = X.mean(axis=0)
        mean[keep] = cph._norm_mean.to_numpy()
        self.coef_ = coef
        self.mean_ = mean
        bch = cph.baseline_cumulative_hazard_
        self.unique_times_ = bch.index.to_numpy(dtype=float)
        self.baseline_cumulative_hazard_ = bch.iloc[:, 0].to_numpy(dtype=float)
        self.baseline_survival_ = np.exp(-self.baseline_cumulative_hazard_)
        self.event_times_ = np.unique(time[event])
        self.censoring_times_, self.censoring_survival_ = kaplan_meier(
            time, ~event, sample_weight=sw
        )
        self.log_likelihood_ = float(cph.log_likelihood_)
        self.concordance_index_ = concordance_index(
            make_survival_target(event, time), self._linear_predictor(X)
        )
        return self

    def _reemit_warnings(self, caught, n_samples, n_kept, n_events) -> None:
        for w in caught:
            msg = str(w.message)
            # lifelines warns on absolute variance < 1e-4 although it standardizes features
            # itself; truly constant features were already removed above.
            if "have very low variance. This may harm" in msg:
                continue
            if "weights are not integers" in msg or "non-integer weights" in msg:
                continue
            if type(w.message).__name__ == "ConvergenceWarning":
                warnings.warn(
                    f"{type(self).__name__} ({n_samples} samples x {n_kept} features, "
                    f"{n_events} events): {msg.strip()} {_GUIDANCE}",
                    ConvergenceWarning,
                    stacklevel=3,
                )
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _linear_predictor(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) @ self.coef_

    def _validate_X(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, dtype=np.float64, reset=False)

    def predict(self, X) -> np.ndarray:
        """Risk score: linear predictor (log partial hazard) ``(X - mean_) @ coef_``.

        Higher = higher hazard = shorter expected survival. Equals lifelines'
        ``predict_log_partial_hazard``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        return self._linear_predictor(self._validate_X(X))

    def predict_partial_hazard(self, X) -> np.ndarray:
        """Hazard ratio relative to a sample at the training mean: ``exp(predict(X))``."""
        return np.exp(self.predict(X))

    def predict_cumulative_hazard_function(self, X, times=None) -> np.ndarray:
        """Cumulative hazard ``H(t | x) = H0(t) * exp(predict(x))`` at ``times``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        times : array-like of shape (n_times,), optional
            Defaults to ``event_times_``.

        Returns
        -------
        ndarray of shape (n_samples, n_times)
        """
        lp = self.predict(X)
        times = self.event_times_ if times is None else np.asarray(times, dtype=float).ravel()
        h0 = _step_right(self.unique_times_, self.baseline_cumulative_hazard_, times, 0.0)
        return np.exp(lp)[:, None] * h0[None, :]

    def predict_survival_function(self, X, times=None) -> np.ndarray:
        """Survival probability ``S(t | x) = exp(-H(t | x))`` at ``times``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        times : array-like of shape (n_times,), optional
            Defaults to ``event_times_``. Equals lifelines' ``predict_survival_function``.

        Returns
        -------
        ndarray of shape (n_samples, n_times)
        """
        return np.exp(-self.predict_cumulative_hazard_function(X, times))

    def score(self, X, y, sample_weight=None) -> float:
        """Harrell's C-index of ``predict(X)`` (higher risk = shorter survival).

        For Uno's IPCW C-index use ``scoring=make_concordance_scorer("uno")``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : structured array of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        float
        """
        return concordance_index(y, self.predict(X), sample_weight=sample_weight)


# --------------------------------------------------------------------------------------------
# univariate selection
# --------------------------------------------------------------------------------------------
def cox_score_test(X, y) -> tuple[np.ndarray, np.ndarray]:
    """Univariate Cox score (log-rank) test of every feature, vectorized.

    For each feature alone, the score statistic ``U**2 / I`` of the Cox partial likelihood at
    ``beta = 0`` (Breslow ties), chi-squared with 1 degree of freedom under no effect. It
    needs no model fitting, so it scales to thousands of features.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    y : structured array of shape (n_samples,)

    Returns
    -------
    statistics : ndarray of shape (n_features,)
        0 for constant features.
    pvalues : ndarray of shape (n_features,)
    """
    X = np.asarray(X, dtype=float)
    event, time = _check_survival_y(y, estimator_name="cox_score_test")
    order = np.argsort(time, kind="mergesort")
    t, e, Xs = time[order], event[order], X[order]
    # standardize for numerical stability (the statistic is scale invariant)
    sd = Xs.std(axis=0)
    Xs = (Xs - Xs.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    s0 = np.arange(t.size, 0, -1, dtype=float)  # risk set size from position k on
    s1 = np.cumsum(Xs[::-1], axis=0)[::-1]
    s2 = np.cumsum(Xs[::-1] ** 2, axis=0)[::-1]
    first = np.searchsorted(t, t, side="left")  # start of each sample's risk set
    ev = np.flatnonzero(e)
    rs = first[ev]
    mean_r = s1[rs] / s0[rs, None]
    var_r = s2[rs] / s0[rs, None] - mean_r**2
    U = (Xs[ev] - mean_r).sum(axis=0)
    info = np.clip(var_r, 0, None).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.where(info > 1e-12, U**2 / info, 0.0)
    stat[sd == 0] = 0.0
    return stat, stats.chi2.sf(stat, 1)


def _univariate_concordance(X: np.ndarray, event: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Harrell's C of every column used as a risk score."""
    rows = np.flatnonzero(event)
    comp = (time[None, :] > time[rows, None]) | (
        (time[None, :] == time[rows, None]) & ~event[None, :]
    )
    n_comp = comp.sum()
    out = np.empty(X.shape[1])
    step = max(1, 4_000_000 // max(comp.size, 1))
    for s in range(0, X.shape[1], step):
        xi = X[rows, s : s + step][:, None, :]
        xj = X[None, :, s : s + step]
        sign = np.sign(xi - xj) * comp[:, :, None]
        out[s : s + step] = 0.5 + 0.5 * sign.sum(axis=(0, 1)) / n_comp
    return out


class SelectKBestSurvival(SelectorMixin, BaseEstimator):
    """Keep the ``k`` features most associated with survival (univariate filter).

    Use it inside a Pipeline before :class:`CoxPHSurvival` so that selection is re-done in
    every cross-validation fold (selecting on all data first leaks the outcome and inflates the
    C-index).

    Parameters
    ----------
    k : int or "all", default=10
        Number of features to keep. If larger than the number of features, all are kept (with
        a warning).
    score_func : {"cox", "concordance"} or callable, default="cox"
        ``"cox"``: univariate Cox score (log-rank) statistic, see :func:`cox_score_test`
        (fast, O(n * p)). ``"concordance"``: ``|C - 0.5|`` of each feature used as a risk
        score (direction-free, robust to outliers, O(n^2 * p)). A callable ``f(X, y)`` returns
        scores (higher = better) or a ``(scores, pvalues)`` pair.

    Attributes
    ----------
    scores_ : ndarray of shape (n_features_in_,)
    pvalues_ : ndarray of shape (n_features_in_,) or None
        Only for ``"cox"`` (or a callable returning p-values).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
    """

    _parameter_constraints: dict = {
        "k": [StrOptions({"all"}), Interval(Integral, 0, None, closed="left")],
        "score_func": [StrOptions({"cox", "concordance"}), callable],
    }

    def __init__(self, *, k=10, score_func="cox"):
        self.k = k
        self.score_func = score_func

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Score every feature against the survival target.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : structured array of shape (n_samples,)

        Returns
        -------
        self
        """
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        event, time = _check_survival_y(y, estimator_name=type(self).__name__)
        check_consistent_length(X, time)
        if not event.any():
            raise ValueError("y has no event: survival scores need at least one event.")
        pvalues = None
        if self.score_func == "cox":
            scores, pvalues = cox_score_test(X, make_survival_target(event, time))
        elif self.score_func == "concordance":
            scores = np.abs(_univariate_concordance(X, event, time) - 0.5)
        else:
            res = self.score_func(X, y)
            if isinstance(res, tuple | list):
                scores, pvalues = res
            else:
                scores = res
        scores = np.asarray(scores, dtype=float)
        if scores.shape != (X.shape[1],):
            raise ValueError(
                f"score_func returned shape {scores.shape!r}, expected ({X.shape[1]},)."
            )
        self.scores_ = scores
        self.pvalues_ = None if pvalues is None else np.asarray(pvalues, dtype=float)
        if self.k != "all" and self.k > X.shape[1]:
            warnings.warn(
                f"k={self.k} is greater than n_features={X.shape[1]}; all features are kept.",
                UserWarning,
                stacklevel=2,
            )
        return self

    def _get_support_mask(self):
        check_is_fitted(self)
        n = self.scores_.shape[0]
        if self.k == "all" or self.k >= n:
            return np.ones(n, dtype=bool)
        mask = np.zeros(n, dtype=bool)
        if self.k == 0:
            return mask
        scores = np.nan_to_num(self.scores_, nan=-np.inf)
        mask[np.argsort(-scores, kind="mergesort")[: self.k]] = True
        return mask
