"""Survival metrics as scikit-learn scorers: C-index, time-dependent AUC, Brier score.

Every scorer here has the signature ``scorer(estimator, X, y)`` and can be passed as
``scoring=`` to :func:`~sklearn.model_selection.cross_validate`,
:class:`~sklearn.model_selection.GridSearchCV` or
:class:`~skrtl.TransferSearchCV`; greater is always better (the Brier scorers return the
*negated* score, like scikit-learn's ``"neg_brier_score"``).

Censoring weights come from the training data
-----------------------------------------------
Uno's C, the cumulative/dynamic AUC and the Brier score weight test samples by the inverse
probability of remaining uncensored (IPCW), estimated by Kaplan-Meier on the **training**
censoring -- scikit-survival's ``survival_train`` argument. A scorer only sees the fitted
estimator and the test fold, so skrtl's survival estimators keep their training target in
``survival_train_`` (:class:`~skrtl.CoxPHSurvival`, :class:`~skrtl.SurvivalEnsemble`; found
inside a Pipeline, a search's ``best_estimator_`` and scikit-survival's ``as_*_scorer``
wrappers). With ``censoring="auto"`` (default) a scorer uses it when present and otherwise
falls back to the test fold's own censoring with a warning; ``"train"`` makes its absence an
error, ``"test"`` always uses the test fold.

The time-dependent metrics come from scikit-survival (``cumulative_dynamic_auc``; the
Brier scores with its ``CensoringDistributionEstimator``, equal to its ``brier_score`` and
``integrated_brier_score``; install ``skrtl[survival]``). scikit-survival
refuses a test fold with a sample followed up beyond the last training time, although such a
sample only counts as "still event-free" at every evaluation time; skrtl moves those times
down to just after ``max(times)``, which changes no metric value, so that random CV folds do
not fail.
"""

from __future__ import annotations

import inspect
import warnings
from numbers import Real

import numpy as np
from scipy.integrate import trapezoid
from sklearn.pipeline import Pipeline

from ._survival import as_survival_target, concordance_index

__all__ = [
    "brier_score",
    "concordance_scorer",
    "integrated_brier_score",
    "make_brier_scorer",
    "make_concordance_scorer",
    "make_time_dependent_auc_scorer",
    "survival_function_at",
    "time_dependent_auc",
]

_CENSORING = ("auto", "train", "test")


def _sksurv_metrics():
    try:
        from sksurv import metrics
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Time-dependent AUC and Brier scores are computed by scikit-survival, which is not "
            "installed: pip install 'skrtl[survival]' (or pip install scikit-survival)."
        ) from exc
    return metrics


# --------------------------------------------------------------------------------------------
# fitted estimators: training target and survival functions
# --------------------------------------------------------------------------------------------
def _training_target(estimator):
    """The training survival target kept by a fitted estimator, or None."""
    est = estimator
    for _ in range(16):
        if hasattr(est, "survival_train_"):
            return est.survival_train_
        if hasattr(est, "_train_y"):  # scikit-survival's as_*_scorer wrappers
            return est._train_y
        if hasattr(est, "best_estimator_"):
            est = est.best_estimator_
        elif isinstance(est, Pipeline):
            est = est.steps[-1][1]
        elif hasattr(est, "estimator_"):
            est = est.estimator_
        else:
            return None
    return None


def _unwrap_search(estimator):
    """The fitted model inside searches (``best_estimator_``) and ``FrozenEstimator``."""
    from sklearn.frozen import FrozenEstimator

    while True:
        if isinstance(estimator, FrozenEstimator):
            estimator = estimator.estimator
        elif hasattr(estimator, "best_estimator_") and not isinstance(estimator, Pipeline):
            estimator = estimator.best_estimator_
        else:
            return estimator


def survival_function_at(estimator, X, times) -> np.ndarray:
    """Predicted survival probabilities ``S(t | x)`` of a fitted estimator at given times.

    Works with skrtl's estimators (``predict_survival_function(X, times=...)``), with
    scikit-survival's (which return step functions), and with either inside a
    :class:`~sklearn.pipeline.Pipeline`, a fitted search (``best_estimator_``) or a
    :class:`~sklearn.frozen.FrozenEstimator`.

    Parameters
    ----------
    estimator : fitted estimator
        Has ``predict_survival_function`` (itself or as the last step of a Pipeline).
    X : array-like of shape (n_samples, n_features)
    times : array-like of shape (n_times,)

    Returns
    -------
    ndarray of shape (n_samples, n_times)

    Raises
    ------
    TypeError
        If the estimator cannot predict survival functions (e.g. a plain risk model).
    """
    times = np.atleast_1d(np.asarray(times, dtype=float)).ravel()
    estimator = _unwrap_search(estimator)
    if isinstance(estimator, Pipeline):
        Xt = estimator[:-1].transform(X) if len(estimator.steps) > 1 else X
        return survival_function_at(estimator.steps[-1][1], Xt, times)
    fn = getattr(estimator, "predict_survival_function", None)
    if fn is None:
        raise TypeError(
            f"{type(estimator).__name__} has no predict_survival_function, so it gives no "
            "survival probabilities (needed by the Brier score and the calibration plot). Use "
            "a model that does, e.g. CoxPHSurvival, or evaluate it with the C-index / "
            "time-dependent AUC, which need only a risk score."
        )
    try:
        takes_times = "times" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        takes_times = False
    if takes_times:
        out = np.asarray(fn(X, times=times), dtype=float)
    else:
        raw = fn(X)
        arr = np.asarray(raw)
        if arr.dtype == object or (arr.ndim == 1 and callable(arr.flat[0])):
            try:
                out = np.vstack([np.asarray(f(times), dtype=float) for f in raw])
            except ValueError as exc:
                raise ValueError(
                    f"{type(estimator).__name__}'s survival functions cannot be evaluated at "
                    f"times in [{times.min():g}, {times.max():g}]: {exc}. Choose times inside "
                    "the training follow-up."
                ) from exc
        elif hasattr(estimator, "unique_times_") and arr.shape[-1] == len(estimator.unique_times_):
            grid = np.asarray(estimator.unique_times_, dtype=float)
            idx = np.searchsorted(grid, times, side="right") - 1
            out = np.where(idx[None, :] >= 0, arr[:, np.clip(idx, 0, None)], 1.0)
        else:
            raise TypeError(
                f"{type(estimator).__name__}.predict_survival_function(X) returned an array "
                f"of shape {arr.shape!r} on an unknown time grid; return step functions or "
                "accept a times= argument."
            )
    if out.ndim != 2 or out.shape[1] != times.size:
        raise ValueError(
            f"predict_survival_function returned shape {out.shape!r}, expected "
            f"(n_samples, {times.size})."
        )
    return out


# --------------------------------------------------------------------------------------------
# metric functions (scikit-survival behind skrtl's target handling)
# --------------------------------------------------------------------------------------------
def _check_times(times, name: str = "times") -> np.ndarray:
    arr = np.atleast_1d(np.asarray(times, dtype=float)).ravel()
    if arr.size == 0 or not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError(
            f"{name} must be one or more finite positive times (in the unit of y's times), "
            f"got {times!r}."
        )
    return np.unique(arr)


def _ipcw_inputs(y_train, y_test, times, *, metric: str, before_first: bool = False):
    """Normalised ``(train, test, times)`` for scikit-survival's IPCW metrics, or a clear error.

    Test samples followed beyond ``max(times)`` are moved to just after it (see the module
    docstring): at every evaluation time they stay "event-free", so no metric changes.
    ``before_first`` allows times before the first test time (the Brier score is defined
    there: every test sample is still event-free).
    """
    train = as_survival_target(y_train)
    test = as_survival_target(y_test)
    times = _check_times(times)
    t_test, e_test = test["time"], test["event"]
    if not e_test.any():
        raise ValueError(
            f"{metric}: the test samples have no event, so the metric is undefined. Use "
            "larger test folds (or stratify the folds on the event indicator)."
        )
    if not train["event"].any():
        raise ValueError(f"{metric}: the training target has no event.")
    if (times[0] < t_test.min() and not before_first) or times[-1] >= t_test.max():
        raise ValueError(
            f"{metric}: times must lie within the follow-up of the test samples, "
            f"[{t_test.min():g}, {t_test.max():g}); got times from {times[0]:g} to "
            f"{times[-1]:g}. In cross-validation choose times every test fold covers, e.g. "
            "between the 10th and the 80th percentile of the observed times."
        )
    last_train = float(train["time"].max())
    if times[-1] >= last_train:
        raise ValueError(
            f"{metric}: times up to {times[-1]:g} reach beyond the longest training follow-up "
            f"({last_train:g}), where the censoring distribution is unknown. Use earlier times."
        )
    beyond = t_test > times[-1]
    if beyond.any():
        cap = times[-1] + 0.5 * (last_train - times[-1])
        test = test.copy()
        test["time"] = np.where(beyond, np.minimum(t_test, cap), t_test)
    return train, test, times


def time_dependent_auc(y_train, y_test, risk, times) -> tuple[np.ndarray, float]:
    """Cumulative/dynamic time-dependent AUC of risk scores (Uno et al. 2007, IPCW).

    At each time ``t`` the AUC of telling the samples with an event by ``t`` (cases) from those
    still event-free after ``t`` (controls), cases weighted by the inverse probability of
    censoring estimated on ``y_train``. Computed by scikit-survival's
    ``cumulative_dynamic_auc``; **higher ``risk`` = shorter survival** (skrtl's and
    scikit-survival's convention).

    Parameters
    ----------
    y_train : structured array
        Training target; its censoring distribution gives the weights.
    y_test : structured array of shape (n_samples,)
        Targets of the evaluated samples.
    risk : array-like of shape (n_samples,) or (n_samples, n_times)
        Risk scores (e.g. ``CoxPHSurvival.predict``), or one column per time.
    times : array-like of shape (n_times,)
        Evaluation times, inside the test follow-up and below the last training time.

    Returns
    -------
    auc : ndarray of shape (n_times,)
        AUC at each of the sorted unique ``times``.
    mean_auc : float
        Mean AUC over ``times`` weighted by the Kaplan-Meier drop of ``y_test`` (equal to
        ``auc[0]`` for one time).
    """
    train, test, times = _ipcw_inputs(y_train, y_test, times, metric="time-dependent AUC")
    risk = np.asarray(risk, dtype=float)
    if not np.isfinite(risk).all():
        raise ValueError("risk contains NaN or infinite values.")
    first_case = test["time"][test["event"]].min()
    if times[0] < first_case:
        raise ValueError(
            f"time-dependent AUC: no test event at or before times[0]={times[0]:g} (the first "
            f"is at {first_case:g}), so there are no cases. Use later times."
        )
    auc, mean_auc = _sksurv_metrics().cumulative_dynamic_auc(train, test, risk, times)
    return np.asarray(auc, dtype=float), float(mean_auc)


def brier_score(y_train, y_test, survival, times) -> np.ndarray:
    """Time-dependent Brier score of predicted survival probabilities (Graf et al. 1999, IPCW).

    Mean squared difference between the predicted ``S(t | x)`` and the observed status at
    ``t`` (1 = still event-free), weighted by the inverse probability of censoring estimated
    on ``y_train`` (scikit-survival's ``CensoringDistributionEstimator``); the value of
    scikit-survival's ``brier_score``, which skrtl also computes at times before the first test
    time (scikit-survival refuses them; there every test sample counts as event-free). Lower is
    better; 0.25 is what a constant prediction of 0.5 scores.

    Parameters
    ----------
    y_train : structured array
    y_test : structured array of shape (n_samples,)
    survival : array-like of shape (n_samples, n_times)
        Predicted survival probabilities at the sorted unique ``times`` (e.g.
        :func:`survival_function_at` or ``CoxPHSurvival.predict_survival_function(X,
        times)``).
    times : array-like of shape (n_times,)

    Returns
    -------
    ndarray of shape (n_times,)
    """
    train, test, times = _ipcw_inputs(
        y_train, y_test, times, metric="Brier score", before_first=True
    )
    surv = _check_survival_probabilities(survival, len(test), times.size)
    return _brier(train, test, surv, times)


def _brier(train, test, surv: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Graf et al.'s IPCW Brier score, term for term as scikit-survival's ``brier_score``."""
    _sksurv_metrics()  # clear ImportError without the extra
    from sksurv.nonparametric import CensoringDistributionEstimator

    cens = CensoringDistributionEstimator().fit(train)
    t, e = test["time"], test["event"]
    g_t = cens.predict_proba(times)
    out = np.empty(times.size)
    for i, h in enumerate(times):
        case = (t <= h) & e
        control = t > h
        g_y = np.ones_like(t)
        if case.any():
            g_y[case] = cens.predict_proba(t[case])
        with np.errstate(divide="ignore", invalid="ignore"):  # G = 0: weight 0, as sksurv
            w_case = np.where(case & (g_y > 0), 1.0 / g_y, 0.0)
            w_control = np.where(control, 1.0 / g_t[i], 0.0) if g_t[i] > 0 else 0.0
        out[i] = np.mean(surv[:, i] ** 2 * w_case + (1.0 - surv[:, i]) ** 2 * w_control)
    return out


def integrated_brier_score(y_train, y_test, survival, times) -> float:
    """Integrated Brier score over ``[times[0], times[-1]]`` (trapezoidal rule).

    The value of scikit-survival's ``integrated_brier_score``: the Brier score
    (:func:`brier_score`) averaged over time. Lower is better. Use a dense grid (e.g. 50
    times) spanning the horizon of interest.

    Parameters
    ----------
    y_train, y_test, survival, times
        As in :func:`brier_score`; at least two times.

    Returns
    -------
    float
    """
    train, test, times = _ipcw_inputs(
        y_train, y_test, times, metric="integrated Brier score", before_first=True
    )
    if times.size < 2:
        raise ValueError(
            "integrated Brier score needs at least two distinct times; use brier_score for one."
        )
    surv = _check_survival_probabilities(survival, len(test), times.size)
    scores = _brier(train, test, surv, times)
    return float(trapezoid(scores, times) / (times[-1] - times[0]))


def _check_survival_probabilities(survival, n: int, n_times: int) -> np.ndarray:
    surv = np.asarray(survival, dtype=float)
    if surv.ndim == 1 and n_times == 1:
        surv = surv[:, None]
    if surv.shape != (n, n_times):
        raise ValueError(
            f"survival must have shape (n_samples, n_times)=({n}, {n_times}) (one column per "
            f"sorted unique time), got {surv.shape!r}."
        )
    if not np.isfinite(surv).all() or (surv < 0).any() or (surv > 1).any():
        raise ValueError(
            "survival must hold probabilities in [0, 1] (predict_survival_function, not "
            "predict: the Brier score needs survival probabilities, not risk scores)."
        )
    return surv


# --------------------------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------------------------
class _SurvivalScorer:
    """Base of skrtl's survival scorers: finds the training target of a fitted estimator."""

    metric = "survival scorer"

    def __init__(self, censoring: str):
        self.censoring = censoring

    def _train_target(self, estimator, y_test):
        if self.censoring == "test":
            return y_test
        y_train = _training_target(estimator)
        if y_train is not None:
            return y_train
        msg = (
            f"{self.metric}: {type(estimator).__name__} does not keep its training target "
            "(survival_train_), so the censoring weights cannot come from the training data."
        )
        if self.censoring == "train":
            raise ValueError(
                f"{msg} Use a skrtl survival estimator (CoxPHSurvival, SurvivalEnsemble), wrap "
                "a scikit-survival model in sksurv.metrics.as_*_scorer, or pass "
                "censoring='test'."
            )
        warnings.warn(
            f"{msg} The test fold's own censoring is used instead (censoring='test' silences "
            "this warning).",
            UserWarning,
            stacklevel=3,
        )
        return y_test

    @staticmethod
    def _no_weights(sample_weight):
        if sample_weight is not None:
            raise ValueError(
                "sample_weight is not supported by the time-dependent survival metrics."
            )


class _ConcordanceScorer(_SurvivalScorer):
    """Scorer ``scorer(estimator, X, y)`` computing the C-index of ``estimator.predict(X)``."""

    metric = "C-index scorer"

    def __init__(self, method: str, tau: float | None, censoring: str):
        super().__init__(censoring)
        self.method = method
        self.tau = tau

    def __call__(self, estimator, X, y, sample_weight=None) -> float:
        risk = estimator.predict(X)
        if self.method == "harrell":
            return concordance_index(y, risk, tau=self.tau, sample_weight=sample_weight)
        return concordance_index(
            y,
            risk,
            method="uno",
            y_train=self._train_target(estimator, y),
            tau=self.tau,
            sample_weight=sample_weight,
        )

    def __repr__(self) -> str:
        return (
            f"make_concordance_scorer(method={self.method!r}, tau={self.tau!r}, "
            f"censoring={self.censoring!r})"
        )


def _check_censoring(censoring) -> None:
    if censoring not in _CENSORING:
        raise ValueError(
            f"censoring must be one of {_CENSORING!r} (where the IPCW censoring distribution "
            f"comes from), got {censoring!r}."
        )


def make_concordance_scorer(
    method: str = "harrell", *, tau: float | None = None, censoring: str = "auto"
):
    """Make a C-index scorer for ``scoring=`` in GridSearchCV, cross_validate, ...

    The scorer calls ``estimator.predict(X)`` and treats the result as a risk score (higher =
    shorter survival; see :func:`~skrtl.concordance_index`).

    Parameters
    ----------
    method : {"harrell", "uno"}
        Harrell's C or Uno's IPCW C.
    tau : float, optional
        Truncation time (pairs whose earlier time is ``>= tau`` are ignored).
    censoring : {"auto", "train", "test"}
        Where Uno's censoring distribution comes from: the training target kept by the fitted
        estimator (``survival_train_``; ``"auto"`` falls back to the test fold with a warning,
        ``"train"`` raises), or always the test fold (``"test"``). Unused by Harrell's C.

    Returns
    -------
    callable
        ``scorer(estimator, X, y, sample_weight=None) -> float``.

    Examples
    --------
    >>> from skrtl import make_concordance_scorer
    >>> scoring = {"harrell": make_concordance_scorer(), "uno": make_concordance_scorer("uno")}
    """
    if method not in ("harrell", "uno"):
        raise ValueError(f"method must be 'harrell' or 'uno', got {method!r}.")
    _check_censoring(censoring)
    if tau is not None and not (isinstance(tau, Real) and tau > 0):
        raise ValueError(f"tau must be a positive number or None, got {tau!r}.")
    return _ConcordanceScorer(method=method, tau=tau, censoring=censoring)


#: Harrell's C-index scorer (``scoring=concordance_scorer``).
concordance_scorer = make_concordance_scorer()


class _TimeDependentAUCScorer(_SurvivalScorer):
    metric = "time-dependent AUC scorer"

    def __init__(self, times: np.ndarray, censoring: str):
        super().__init__(censoring)
        self.times = times

    def __call__(self, estimator, X, y, sample_weight=None) -> float:
        self._no_weights(sample_weight)
        risk = estimator.predict(X)
        y_train = self._train_target(estimator, y)
        auc, mean_auc = time_dependent_auc(y_train, y, risk, self.times)
        return mean_auc

    def __repr__(self) -> str:
        return (
            f"make_time_dependent_auc_scorer(times={self.times.tolist()!r}, "
            f"censoring={self.censoring!r})"
        )


def make_time_dependent_auc_scorer(times, *, censoring: str = "auto"):
    """Make a scorer of the cumulative/dynamic time-dependent AUC (:func:`time_dependent_auc`).

    The scorer calls ``estimator.predict(X)`` (a risk score, higher = shorter survival) and
    returns the AUC at ``times`` (one time) or the mean AUC over them (several times), with
    censoring weights from the estimator's training target (see ``censoring``).

    Parameters
    ----------
    times : float or array-like of shape (n_times,)
        Evaluation times (e.g. ``[365, 730, 1095]`` days). In cross-validation they must lie
        inside every test fold's follow-up and below the last training time.
    censoring : {"auto", "train", "test"}
        Where the censoring distribution comes from: the training target kept by the fitted
        estimator (``survival_train_``; ``"auto"`` falls back to the test fold with a warning,
        ``"train"`` raises), or the test fold (``"test"``).

    Returns
    -------
    callable
        ``scorer(estimator, X, y) -> float`` (greater is better).

    Examples
    --------
    >>> from skrtl import make_time_dependent_auc_scorer
    >>> scoring = {"auc_1_3y": make_time_dependent_auc_scorer(times=[365, 730, 1095])}
    """
    _check_censoring(censoring)
    return _TimeDependentAUCScorer(_check_times(times), censoring)


class _BrierScorer(_SurvivalScorer):
    metric = "Brier scorer"

    def __init__(self, times: np.ndarray, censoring: str):
        super().__init__(censoring)
        self.times = times

    def __call__(self, estimator, X, y, sample_weight=None) -> float:
        self._no_weights(sample_weight)
        surv = survival_function_at(estimator, X, self.times)
        y_train = self._train_target(estimator, y)
        if self.times.size == 1:
            return -float(brier_score(y_train, y, surv, self.times)[0])
        return -integrated_brier_score(y_train, y, surv, self.times)

    def __repr__(self) -> str:
        return f"make_brier_scorer(times={self.times.tolist()!r}, censoring={self.censoring!r})"


def make_brier_scorer(times, *, censoring: str = "auto"):
    """Make a scorer of the (integrated) Brier score, negated so that greater is better.

    The scorer predicts survival probabilities with :func:`survival_function_at` (so the model
    needs ``predict_survival_function``, e.g. :class:`~skrtl.CoxPHSurvival`) and returns
    ``-brier_score`` at a single time, or ``-integrated_brier_score`` over ``[min(times),
    max(times)]`` for several times, like scikit-learn's ``"neg_brier_score"``.

    Parameters
    ----------
    times : float or array-like of shape (n_times,)
        One time (Brier score at that horizon) or a grid (integrated Brier score, e.g.
        ``np.linspace(90, 1825, 50)`` days).
    censoring : {"auto", "train", "test"}
        As in :func:`make_time_dependent_auc_scorer`.

    Returns
    -------
    callable
        ``scorer(estimator, X, y) -> float``: minus the (integrated) Brier score.

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import make_brier_scorer
    >>> scoring = {"neg_ibs": make_brier_scorer(times=np.linspace(90, 1825, 50)),
    ...            "neg_brier_2y": make_brier_scorer(times=730)}
    """
    _check_censoring(censoring)
    return _BrierScorer(_check_times(times), censoring)
