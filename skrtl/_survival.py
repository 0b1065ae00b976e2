"""Survival analysis as scikit-learn estimators: targets, penalized Cox model, C-index, selection.

Radiomics and deep-feature studies often predict *time to event* (overall survival, time to
progression) rather than a class. This module makes a Cox proportional-hazards model a plain
scikit-learn estimator so it can sit at the end of a :class:`~sklearn.pipeline.Pipeline`
(scaling, feature selection, PCA, ...) and be tuned with
:class:`~sklearn.model_selection.GridSearchCV` or evaluated with
:func:`~sklearn.model_selection.cross_validate`.

Survival targets are numpy *structured arrays* with two fields, the event indicator first and
the time second -- the layout of scikit-survival's ``Surv.from_arrays``. Build them with
:func:`make_survival_target`; :func:`as_survival_target` reads structured arrays and
DataFrames by field name (``event``/``status``/``death``..., ``time``/``duration``/``days``...)
in any order. Scorers (C-index, time-dependent AUC, Brier score) live in
``skrtl._survival_metrics``.

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

import re
import warnings
from collections.abc import Mapping
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
    "ProportionalHazardsMixin",
    "SelectKBestSurvival",
    "as_survival_target",
    "breslow_cumulative_hazard",
    "concordance_index",
    "cox_score_test",
    "kaplan_meier",
    "make_survival_target",
    "survival_target_to_frame",
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
#: Name parts that mark a time field (``Survival.time``, ``duration``, ``OS_days``, ``T``...).
_TIME_TOKENS = frozenset(
    {"t", "tte", "futime", "stop", "duration", "durations", "followup", "lenfol"}
    | {"day", "days", "week", "weeks", "month", "months", "year", "years"}
)
_TIME_SUBSTRINGS = ("time", "duration")
#: Name parts that mark an event indicator (``deadstatus.event``, ``status``, ``E``, ``fstat``...).
_EVENT_TOKENS = frozenset(
    {"e", "d", "delta", "fstat", "observed", "died", "deceased", "vital", "relapse"}
    | {"recurrence", "progression", "failure", "fail", "outcome", "indicator"}
)
_EVENT_SUBSTRINGS = ("event", "status", "death", "dead", "cens")


def _name_tokens(name) -> list[str]:
    text = str(name)
    parts = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", text)
    return [p.lower() for p in parts] or [text.lower()]


def _looks_like_time(name) -> bool:
    tokens = _name_tokens(name)
    return any(t in _TIME_TOKENS or any(s in t for s in _TIME_SUBSTRINGS) for t in tokens)


def _looks_like_event(name) -> bool:
    if _looks_like_time(name):  # "days_to_death", "time_to_event", "event_time" are times
        return False
    tokens = _name_tokens(name)
    return any(t in _EVENT_TOKENS or any(s in t for s in _EVENT_SUBSTRINGS) for t in tokens)


def _is_binary(values: np.ndarray) -> bool:
    s = pd.Series(values)
    if s.isna().any():
        return False
    if s.dtype == bool:
        return True
    num = pd.to_numeric(s, errors="coerce")
    return bool(num.notna().all() and num.isin((0, 1)).all())


def _as_event(values, name: str) -> np.ndarray:
    """Validate an event indicator (bool or 0/1, no missing value); ``name`` goes in errors."""
    s = pd.Series(np.asarray(values, dtype=object) if _is_nullable(values) else values)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {np.shape(values)!r}.")
    missing = s.isna().to_numpy()
    if missing.any():
        rows = np.flatnonzero(missing)
        raise ValueError(
            f"{name} has a missing value (None/NaN) in {rows.size} of {s.size} rows (first at "
            f"row {rows[0]}). Every sample needs an event indicator (True/1 = event observed, "
            "False/0 = censored): drop those samples or fill them in."
        )
    if s.dtype == bool:
        return s.to_numpy(dtype=bool)
    num = pd.to_numeric(s, errors="coerce")
    bad = num.isna().to_numpy()
    if bad.any():
        first = s.iloc[int(np.flatnonzero(bad)[0])]
        raise ValueError(
            f"{name} must hold booleans or 0/1 (1 = event observed, 0 = censored), got "
            f"{first!r} (type {type(first).__name__}). Map labels to booleans first, e.g. "
            "y['status'] == 'dead'."
        )
    not01 = ~num.isin((0, 1)).to_numpy()
    if not01.any():
        first = s.iloc[int(np.flatnonzero(not01)[0])]
        first = first.item() if isinstance(first, np.generic) else first
        raise ValueError(
            f"{name} must hold booleans or 0/1 (1 = event observed, 0 = censored), got value "
            f"{first!r}. Codes such as 1 = censored / 2 = dead (R's survival::lung) must be "
            "mapped first, e.g. status == 2."
        )
    return num.to_numpy(dtype=float).astype(bool)


def _as_time(values, name: str) -> np.ndarray:
    """Validate event / censoring times (finite, non-negative, no missing value)."""
    s = pd.Series(np.asarray(values, dtype=object) if _is_nullable(values) else values)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {np.shape(values)!r}.")
    missing = s.isna().to_numpy()
    if missing.any():
        rows = np.flatnonzero(missing)
        raise ValueError(
            f"{name} has a missing value (None/NaN) in {rows.size} of {s.size} rows (first at "
            f"row {rows[0]}). Every sample needs a finite event or censoring time: drop samples "
            "with unknown follow-up."
        )
    if s.dtype == bool:
        raise ValueError(
            f"{name} holds booleans, but times must be numeric (days, months...). Are the "
            "event and time fields swapped? Name them 'event' and 'time', or build the "
            "target with make_survival_target(event, time)."
        )
    num = pd.to_numeric(s, errors="coerce")
    bad = num.isna().to_numpy()
    if bad.any():
        first = s.iloc[int(np.flatnonzero(bad)[0])]
        raise ValueError(
            f"{name} must be numeric (days, months...), got {first!r} (type "
            f"{type(first).__name__}). Convert dates or timedeltas to a number first, e.g. "
            "(end - start).dt.days."
        )
    t = num.to_numpy(dtype=float)
    inf = ~np.isfinite(t)
    if inf.any():
        raise ValueError(
            f"{name} has an infinite value at row {int(np.flatnonzero(inf)[0])}; every sample "
            "needs a finite event or censoring time (for patients still alive use their last "
            "follow-up time, with event False)."
        )
    neg = t < 0
    if neg.any():
        row = int(np.flatnonzero(neg)[0])
        raise ValueError(
            f"{name} must be non-negative, got {float(t[row])!r} at row {row} ({int(neg.sum())} "
            "negative in all). Times are durations since a common origin (diagnosis, start of "
            "treatment)."
        )
    return t


def _is_nullable(values) -> bool:
    """Pandas nullable arrays (``boolean``, ``Int64``) keep ``pd.NA``: read them as objects."""
    return isinstance(getattr(values, "dtype", None), pd.api.extensions.ExtensionDtype)


def _target(event: np.ndarray, time: np.ndarray) -> np.ndarray:
    out = np.empty(event.shape[0], dtype=[("event", bool), ("time", float)])
    out["event"] = event
    out["time"] = time
    return out


def make_survival_target(event, time) -> np.ndarray:
    """Build a survival target: a structured array with fields ``("event", "time")``.

    The layout (and the field names) of scikit-survival's ``Surv.from_arrays(event, time)``:
    targets built here work with scikit-survival, and its targets work with skrtl. For lifelines
    data (a duration and an event column) pass the two columns; to read a structured array or a
    DataFrame whose fields are named differently use :func:`as_survival_target`.

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

    Raises
    ------
    ValueError
        If ``event`` is not boolean or 0/1, a time is negative, infinite or missing, or the
        lengths differ.

    Examples
    --------
    >>> from skrtl import make_survival_target
    >>> y = make_survival_target([1, 0, 1], [5.0, 8.0, 2.5])
    >>> y["event"], y["time"]
    (array([ True, False,  True]), array([5. , 8. , 2.5]))
    """
    if np.ndim(event) != 1 or np.ndim(time) != 1:
        raise ValueError(
            f"event and time must be 1-D, got shapes {np.shape(event)!r} and {np.shape(time)!r}."
        )
    if len(event) != len(time):
        raise ValueError(
            f"event has {len(event)} entries but time has {len(time)}; they must be aligned "
            "(one entry per sample)."
        )
    if isinstance(event, pd.Series):
        event = event.reset_index(drop=True)
    if isinstance(time, pd.Series):
        time = time.reset_index(drop=True)
    time = _as_time(time, "time")  # first: boolean times point at swapped arguments
    return _target(_as_event(event, "event"), time)


def _fields_of(y):
    """``(names, getter, structured)`` for a structured array, DataFrame or mapping."""
    if isinstance(y, Mapping) and not isinstance(y, pd.DataFrame):
        y = pd.DataFrame(dict(y))
    if isinstance(y, pd.DataFrame):
        frame = y.reset_index(drop=True)
        return list(frame.columns), (lambda f: frame[f]), False
    arr = np.asarray(y)
    if arr.dtype.names is None or arr.ndim != 1:
        return None, None, False
    return list(arr.dtype.names), (lambda f: arr[f]), True


def as_survival_target(y, *, event=None, time=None) -> np.ndarray:
    """Read a survival target from a structured array, a record array or a DataFrame.

    Fields (columns) are found **by name** first, the way scikit-survival and lifelines users
    name them: an event indicator such as ``event``, ``status``, ``death``, ``dead``,
    ``deadstatus.event``, ``E``, ``fstat``, ``observed``, and a time such as ``time``,
    ``duration``, ``days``, ``Survival.time``, ``OS_months``, ``T``, ``futime``. Names that hold
    a time word win (``days_to_death`` is a time). With two fields of which names identify
    only one, or none: a boolean field is the event, else the only field holding just 0/1;
    only then does position decide (event first, time second: the layout of scikit-survival's
    ``Surv.from_arrays``). So ``(time, event)`` order and a DataFrame ``[time, event]`` work.

    Parameters
    ----------
    y : structured array, record array, DataFrame or dict of arrays
        Survival target. scikit-survival targets (``Surv.from_arrays``,
        ``Surv.from_dataframe``, its ``load_*`` data sets) and skrtl's are read as they are.
    event, time : str, optional
        Name of the event / time field, when the names do not say it (or say it ambiguously,
        e.g. several time columns).

    Returns
    -------
    ndarray of shape (n_samples,)
        Structured array ``[("event", bool), ("time", float)]`` (as
        :func:`make_survival_target`).

    Raises
    ------
    ValueError
        If ``y`` is not a structured target, the fields cannot be told apart, or the values
        are invalid (missing, negative or infinite times; event not boolean or 0/1). The
        message names the field.

    See Also
    --------
    make_survival_target : build a target from an event and a time array.
    survival_target_to_frame : the reverse, a DataFrame for lifelines.

    Examples
    --------
    >>> import pandas as pd
    >>> from skrtl import as_survival_target
    >>> df = pd.DataFrame({"duration": [5.0, 8.0], "observed": [1, 0]})  # lifelines style
    >>> as_survival_target(df)
    array([( True, 5.), (False, 8.)], dtype=[('event', '?'), ('time', '<f8')])
    """
    if y is None:
        raise ValueError(
            "A survival model requires y to be passed, but the target y is None. Pass a "
            "survival target: y = skrtl.make_survival_target(event, time)."
        )
    names, get, structured = _fields_of(y)
    if names is None:
        shape = np.shape(y)
        dtype = getattr(y, "dtype", type(y).__name__)
        raise ValueError(
            "A survival target must be a structured array (or a DataFrame) with an event "
            "indicator and a time field, e.g. y = skrtl.make_survival_target(event, time) "
            f"(the layout of scikit-survival's Surv.from_arrays). Got {dtype!r} of shape "
            f"{shape!r}."
            + (
                " A plain 1-D array of times has no event indicator: pass the events too."
                if len(shape) == 1
                else ""
            )
        )
    for arg, value in (("event", event), ("time", time)):
        if value is not None and value not in names:
            raise ValueError(f"{arg}={value!r} is not a field of y; fields are {names!r}.")
    if event is not None and event == time:
        raise ValueError(f"event and time name the same field {event!r}.")
    ev_field, t_field = event, time
    rest = [f for f in names if f not in (event, time)]
    if t_field is None:
        cands = [f for f in rest if _looks_like_time(f)]
        if len(cands) > 1:
            raise ValueError(
                f"Several fields of y look like times: {cands!r}. Pass time=<name> (and "
                "event=<name>) to as_survival_target, or build the target with "
                "make_survival_target(event, time)."
            )
        t_field = cands[0] if cands else None
    if ev_field is None:
        cands = [f for f in rest if f != t_field and _looks_like_event(f)]
        if len(cands) > 1:
            raise ValueError(
                f"Several fields of y look like event indicators: {cands!r}. Pass "
                "event=<name> to as_survival_target, or build the target with "
                "make_survival_target(event, time)."
            )
        ev_field = cands[0] if cands else None
    if ev_field is None or t_field is None:
        if len(names) != 2:
            raise ValueError(
                f"Cannot tell the event and time fields of y apart from their names {names!r}"
                f" (found event={ev_field!r}, time={t_field!r}). Name them 'event' and "
                "'time', pass event=/time= to as_survival_target, or use "
                "make_survival_target(event, time)."
            )
        ev_field, t_field = _by_values(names, get, ev_field, t_field)
    ev_values = get(ev_field)
    sksurv_layout = structured and ev_field == names[0] and np.asarray(ev_values).dtype == bool
    if event is None and not sksurv_layout and any("cens" in t for t in _name_tokens(ev_field)):
        raise ValueError(
            f"Field {ev_field!r} would be read as the event indicator, but its name suggests "
            "1 = censored, the opposite. Build the target explicitly: "
            f"make_survival_target(event=~y[{ev_field!r}].astype(bool), time=y[{t_field!r}]) "
            f"if 1 means censored, or as_survival_target(y, event={ev_field!r}) if 1 means "
            "the event was observed."
        )
    n = len(ev_values)
    out_event = _as_event(ev_values, f"y[{ev_field!r}] (event)")
    out_time = _as_time(get(t_field), f"y[{t_field!r}] (time)")
    if out_time.shape[0] != n:  # pragma: no cover - fields of one array have one length
        raise ValueError("event and time fields differ in length.")
    return _target(out_event, out_time)


def _by_values(names, get, ev_field, t_field):
    """Two fields, names not decisive: boolean dtype, then 0/1 values, then position."""
    if ev_field is not None:
        return ev_field, next(f for f in names if f != ev_field)
    if t_field is not None:
        return next(f for f in names if f != t_field), t_field
    is_bool = [pd.Series(get(f)).dtype == bool for f in names]
    if sum(is_bool) == 1:
        ev = names[is_bool.index(True)]
        return ev, next(f for f in names if f != ev)
    for drop_missing in (False, True):  # a 0/1 field with gaps is still the event field
        binary = [_is_binary(_values(get(f), drop_missing)) for f in names]
        if sum(binary) == 1:
            ev = names[binary.index(True)]
            return ev, next(f for f in names if f != ev)
        if sum(binary) == 2:
            return names[0], names[1]
    raise ValueError(
        f"Neither field of y {names!r} holds an event indicator (booleans or 0/1). Name the "
        "fields 'event' and 'time', pass event=/time= to as_survival_target, or build the "
        "target with make_survival_target(event, time)."
    )


def _values(column, drop_missing: bool) -> np.ndarray:
    s = pd.Series(np.asarray(column, dtype=object) if _is_nullable(column) else column)
    return (s.dropna() if drop_missing else s).to_numpy()


def survival_target_to_frame(
    y, *, duration_col: str = "duration", event_col: str = "event"
) -> pd.DataFrame:
    """A survival target as a lifelines-style DataFrame (a duration and an event column).

    Parameters
    ----------
    y : structured array or DataFrame
        Any target :func:`as_survival_target` reads.
    duration_col, event_col : str
        Column names, to pass on as ``CoxPHFitter().fit(df, duration_col, event_col)``.

    Returns
    -------
    DataFrame
        Columns ``duration_col`` (float) and ``event_col`` (int 0/1).

    Examples
    --------
    >>> from skrtl import make_survival_target, survival_target_to_frame
    >>> survival_target_to_frame(make_survival_target([1, 0], [5.0, 8.0]), duration_col="T",
    ...                          event_col="E")
         T  E
    0  5.0  1
    1  8.0  0
    """
    if duration_col == event_col:
        raise ValueError(f"duration_col and event_col must differ, both are {event_col!r}.")
    y = as_survival_target(y)
    return pd.DataFrame({duration_col: y["time"], event_col: y["event"].astype(int)})


def _check_survival_y(y, *, estimator_name: str = "estimator") -> tuple[np.ndarray, np.ndarray]:
    """Return ``(event, time)`` from a survival target, or raise a clear error."""
    if y is None:
        raise ValueError(
            f"{estimator_name} requires y to be passed, but the target y is None. Pass a "
            "survival target: y = skrtl.make_survival_target(event, time)."
        )
    try:
        y = as_survival_target(y)
    except ValueError as exc:
        raise ValueError(f"{estimator_name}: {exc}") from None
    return y["event"], y["time"]


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


# --------------------------------------------------------------------------------------------
# proportional hazards: baseline hazard, survival functions, score
# --------------------------------------------------------------------------------------------
def breslow_cumulative_hazard(y, risk) -> tuple[np.ndarray, np.ndarray]:
    """Breslow estimate of the baseline cumulative hazard given risk scores.

    ``H0(t) = sum_{t_j <= t} d_j / sum_{i : time_i >= t_j} exp(risk_i)`` at every distinct
    time ``t_j`` of ``y`` (``d_j`` events at ``t_j``), so that ``H(t | x) = H0(t) *
    exp(risk(x))``. For a Cox model's risks it is lifelines' ``baseline_cumulative_hazard_``.

    Parameters
    ----------
    y : structured array of shape (n,)
        Survival target (:func:`make_survival_target`).
    risk : array-like of shape (n,)
        Risk scores (log partial hazards) of the same samples.

    Returns
    -------
    times : ndarray
        Distinct times of ``y``, sorted.
    cumulative_hazard : ndarray
        ``H0`` at ``times``.
    """
    event, time = _check_survival_y(y, estimator_name="breslow_cumulative_hazard")
    risk = np.asarray(risk, dtype=float).reshape(-1)
    check_consistent_length(time, risk)
    times, inv = np.unique(time, return_inverse=True)
    deaths = np.bincount(inv, weights=event.astype(float), minlength=times.size)
    hazard = np.bincount(inv, weights=np.exp(risk), minlength=times.size)
    at_risk = np.cumsum(hazard[::-1])[::-1]
    return times, np.cumsum(deaths / at_risk)


class ProportionalHazardsMixin:
    """Survival functions and the C-index of a fitted proportional-hazards risk model.

    The estimator's ``predict(X)`` returns the risk score (log partial hazard, higher =
    shorter survival) and ``fit`` sets ``unique_times_`` and ``baseline_cumulative_hazard_``
    (the baseline ``H0`` at those times, e.g. :func:`breslow_cumulative_hazard` of the
    training risks) and ``event_times_`` (the default time grid). Shared by
    :class:`CoxPHSurvival` and :class:`~skrtl.FineTuneSurvival`.
    """

    def predict_partial_hazard(self, X) -> np.ndarray:
        """Hazard ratio relative to a sample of risk 0: ``exp(predict(X))``."""
        return np.exp(self.predict(X))

    def predict_cumulative_hazard_function(self, X, times=None) -> np.ndarray:
        """Cumulative hazard ``H(t | x) = H0(t) * exp(predict(x))`` at ``times``.

        Parameters
        ----------
        X : array-like or image frame
            What ``predict`` takes.
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
        X : array-like or image frame
            What ``predict`` takes.
        times : array-like of shape (n_times,), optional
            Defaults to ``event_times_``. For :class:`CoxPHSurvival` it equals lifelines'
            ``predict_survival_function``.

        Returns
        -------
        ndarray of shape (n_samples, n_times)
        """
        return np.exp(-self.predict_cumulative_hazard_function(X, times))

    def score(self, X, y, sample_weight=None) -> float:
        """Harrell's C-index of ``predict(X)`` (higher risk = shorter survival).

        For Uno's IPCW C-index use ``scoring=make_concordance_scorer("uno")``; for
        time-dependent AUC and Brier scores :func:`make_time_dependent_auc_scorer` and
        :func:`make_brier_scorer`.

        Parameters
        ----------
        X : array-like or image frame
            What ``predict`` takes.
        y : structured array of shape (n_samples,)
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        float
        """
        return concordance_index(y, self.predict(X), sample_weight=sample_weight)


# --------------------------------------------------------------------------------------------
# Cox model
# --------------------------------------------------------------------------------------------
class CoxPHSurvival(ProportionalHazardsMixin, BaseEstimator):
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
        Kaplan-Meier estimate of the training *censoring* distribution.
    survival_train_ : structured array of shape (n_train,)
        The training target (samples with positive weight). The IPCW scorers (Uno's C,
        time-dependent AUC, Brier score) estimate the censoring distribution from it, so that
        a test fold is weighted by the *training* censoring, as scikit-survival's metrics
        expect. lifelines' model stores the same times (``lifelines_model_.durations``).
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
        self.survival_train_ = make_survival_target(event, time)
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
