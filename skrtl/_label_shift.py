"""Prior-shift (label-shift) adaptation: calibrate on source, estimate target priors, adjust.

Under label shift the class-conditional image distribution ``p(x | y)`` is the same at source
and target hospitals while the prevalence ``pi(y)`` differs (screening vs referral centre). Then
``p_T(y | x)`` is proportional to ``p_S(y | x) * pi_T(y) / pi_S(y)`` (Saerens et al. 2002), and
``pi_T`` can be estimated from *unlabelled* target images:

* EM (Saerens et al. 2002) on calibrated posteriors, with the source priors taken as the mean
  calibrated prediction on held-out source data (Alexandari et al. 2020);
* BBSE (Lipton et al. 2018), hard or soft confusion matrix.

Main entry point: :class:`LabelShiftAdapter`, a meta-estimator around any probabilistic
classifier. Standalone functions are available for users who already have probabilities.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
from scipy.optimize import nnls
from sklearn.base import (
    BaseEstimator,
    ClassifierMixin,
    MetaEstimatorMixin,
    _fit_context,
    clone,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold, check_cv, cross_val_predict
from sklearn.utils import get_tags
from sklearn.utils._metadata_requests import (
    MetadataRouter,
    MethodMapping,
    _routing_enabled,
    process_routing,
)
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    _num_samples,
    check_is_fitted,
    column_or_1d,
    has_fit_parameter,
    indexable,
)

from ._calibration import (
    BiasCorrectedTemperatureScaling,
    TemperatureScaling,
    VectorScaling,
)
from .utils import PROBA_FLOOR, check_class_labels, derive_seed, reweight_posteriors, root_seed

__all__ = [
    "LabelShiftAdapter",
    "LabelShiftWarning",
    "adjust_posteriors",
    "bbse_prior_estimate",
    "em_prior_estimate",
    "prior_shift_class_weight",
    "prior_shift_sample_weight",
]

_CALIBRATORS = {
    "ts": TemperatureScaling,
    "bcts": BiasCorrectedTemperatureScaling,
    "vs": VectorScaling,
}


class LabelShiftWarning(UserWarning):
    """Label-shift adaptation fell back to a documented default (small target, singular BBSE)."""


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_proba(proba, name: str, n_classes: int | None = None) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (n_samples, n_classes) of probabilities, "
            f"got shape {proba.shape!r}."
        )
    if n_classes is not None and proba.shape[1] != n_classes:
        raise ValueError(
            f"{name} must have {n_classes} columns (one per class), got {proba.shape[1]}."
        )
    if not np.all(np.isfinite(proba)):
        raise ValueError(f"{name} contains NaN or infinite values; pass valid probabilities.")
    if np.any(proba < 0) or not np.allclose(proba.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(
            f"{name} must hold probabilities: non-negative rows summing to 1 "
            "(pass predict_proba output, not logits or decision_function)."
        )
    return proba


def _check_priors(priors, name: str, n_classes: int, classes=None) -> np.ndarray:
    """Validate class priors given as an array (in class order) or a ``{class: prior}`` dict."""
    if isinstance(priors, dict):
        if classes is None:
            raise TypeError(f"{name} as a dict needs known classes; pass an array instead.")
        unknown = set(priors) - set(classes.tolist())
        missing = [c for c in classes.tolist() if c not in priors]
        if unknown or missing:
            raise ValueError(
                f"{name}={priors!r} must give one prior per class {classes.tolist()!r}; "
                f"unknown keys {sorted(unknown, key=str)!r}, missing {missing!r}."
            )
        priors = [priors[c] for c in classes.tolist()]
    arr = np.asarray(priors, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != n_classes:
        raise ValueError(
            f"{name}={priors!r} must have one entry per class ({n_classes} classes), "
            f"got shape {arr.shape!r}."
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name}={priors!r} must be finite and non-negative.")
    total = arr.sum()
    if not np.isclose(total, 1.0, atol=1e-6):
        raise ValueError(
            f"{name}={priors!r} must sum to 1 (sums to {total!r}); divide by the sum first."
        )
    return arr / total


# --------------------------------------------------------------------------------------------
# standalone functions
# --------------------------------------------------------------------------------------------


def adjust_posteriors(proba, source_priors, target_priors) -> np.ndarray:
    """Re-weight source posteriors to new class priors (Saerens et al. 2002, eq. 2.4).

    ``p_T(y | x) = p_S(y | x) * w(y) / sum_k p_S(k | x) * w(k)`` with
    ``w = target_priors / source_priors``.

    Parameters
    ----------
    proba : array-like of shape (n_samples, n_classes)
        Source posteriors ``p_S(y | x)`` (ideally calibrated).
    source_priors : array-like of shape (n_classes,)
        Class priors implied by ``proba`` (the mean calibrated prediction on held-out source data
        is the consistent choice).
    target_priors : array-like of shape (n_classes,)
        Target class priors.

    Returns
    -------
    ndarray of shape (n_samples, n_classes)
        Adjusted posteriors ``p_T(y | x)``; rows sum to 1.
    """
    proba = _check_proba(proba, "proba")
    k = proba.shape[1]
    source = _check_priors(source_priors, "source_priors", k)
    target = _check_priors(target_priors, "target_priors", k)
    if np.any(source <= 0):
        raise ValueError(
            f"source_priors={source!r} must be strictly positive to form the ratio "
            "target_priors / source_priors."
        )
    return reweight_posteriors(proba, target / source)


def _em(proba, source, *, init, tol, max_iter):
    ratio_base = 1.0 / source
    priors = init.copy()
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is used after the loop
        post = reweight_posteriors(proba, priors * ratio_base)
        new = post.mean(axis=0)
        delta = np.max(np.abs(new - priors))
        priors = new
        if delta < tol:
            converged = True
            break
    return priors, n_iter, converged


def em_prior_estimate(
    proba,
    source_priors,
    *,
    init=None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    return_n_iter: bool = False,
):
    """Maximum-likelihood target priors by EM (Saerens, Latinne & Decaestecker 2002).

    Alternates the E-step (adjust the posteriors of the unlabelled target samples to the current
    priors) and the M-step (priors = mean adjusted posterior) until the largest change of a
    prior is below ``tol``. Use calibrated posteriors (BCTS, Alexandari et al. 2020) and
    ``source_priors`` = mean calibrated posterior on held-out source data.

    Parameters
    ----------
    proba : array-like of shape (n_target, n_classes)
        Source-model posteriors on the unlabelled target samples.
    source_priors : array-like of shape (n_classes,)
        Priors implied by the source model.
    init : array-like of shape (n_classes,), default=None
        Starting priors; ``None`` starts from ``source_priors``.
    tol : float, default=1e-6
        Stop when ``max |pi_new - pi_old| < tol``.
    max_iter : int, default=1000
        Maximum number of EM iterations; a :class:`~sklearn.exceptions.ConvergenceWarning` is
        raised when it is reached.
    return_n_iter : bool, default=False
        Also return the number of iterations run and whether EM converged.

    Returns
    -------
    priors : ndarray of shape (n_classes,)
        Estimated target priors.
    n_iter : int
        Iterations run (only with ``return_n_iter=True``).
    converged : bool
        Whether ``tol`` was reached (only with ``return_n_iter=True``).
    """
    proba = _check_proba(proba, "proba")
    k = proba.shape[1]
    if proba.shape[0] == 0:
        raise ValueError("proba has no rows: EM needs unlabelled target samples.")
    source = _check_priors(source_priors, "source_priors", k)
    if np.any(source <= 0):
        raise ValueError(f"source_priors={source!r} must be strictly positive.")
    init = source if init is None else _check_priors(init, "init", k)
    if not (isinstance(tol, Real) and tol > 0):
        raise ValueError(f"tol={tol!r} must be a positive number.")
    if not (isinstance(max_iter, Integral) and max_iter >= 1):
        raise ValueError(f"max_iter={max_iter!r} must be an integer >= 1.")
    priors, n_iter, converged = _em(proba, source, init=init, tol=tol, max_iter=max_iter)
    if not converged:
        warnings.warn(
            f"EM prior estimation did not converge in max_iter={max_iter} iterations "
            f"(tol={tol!r}); increase max_iter or tol. Returning the last estimate.",
            ConvergenceWarning,
            stacklevel=2,
        )
    if return_n_iter:
        return priors, n_iter, converged
    return priors


def bbse_prior_estimate(
    source_proba,
    source_y,
    target_proba,
    *,
    soft: bool = False,
    max_condition: float = 1e8,
) -> np.ndarray:
    """Black-box shift estimation of target priors (Lipton, Wang & Smola 2018).

    Solves ``C w = mu`` where ``C[i, j] = P_S(yhat = i, y = j)`` is the joint confusion matrix
    on held-out labelled source data and ``mu[i] = P_T(yhat = i)`` the prediction frequencies on
    target data; then ``pi_T = w * pi_S`` (``pi_S`` the source label frequencies), with negative
    weights clipped to 0 and the result renormalised.

    Parameters
    ----------
    source_proba : array-like of shape (n_source, n_classes)
        Held-out posteriors of labelled source samples.
    source_y : array-like of shape (n_source,)
        Their labels as column indices ``0 .. n_classes - 1``.
    target_proba : array-like of shape (n_target, n_classes)
        Posteriors of the unlabelled target samples.
    soft : bool, default=False
        Hard BBSE (``yhat`` = argmax, confusion counts) or soft BBSE (expected confusion from
        probabilities).
    max_condition : float, default=1e8
        When the condition number of ``C`` exceeds this (singular or nearly so: a class is
        never predicted, or two classes are confused completely), a :class:`LabelShiftWarning`
        is raised and ``w`` is found by non-negative least squares instead (documented
        fallback; its estimate for the confused classes is not identifiable).

    Returns
    -------
    ndarray of shape (n_classes,)
        Estimated target priors.
    """
    source_proba = _check_proba(source_proba, "source_proba")
    k = source_proba.shape[1]
    target_proba = _check_proba(target_proba, "target_proba", k)
    y = column_or_1d(source_y)
    if y.shape[0] != source_proba.shape[0]:
        raise ValueError(
            f"source_y has {y.shape[0]} labels but source_proba has {source_proba.shape[0]} rows."
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
        raise ValueError(
            f"source_y must hold integer class indices in [0, {k - 1}] (column positions of "
            "source_proba); encode labels with LabelEncoder first."
        )
    if target_proba.shape[0] == 0:
        raise ValueError("target_proba has no rows: BBSE needs unlabelled target samples.")
    counts = np.bincount(y, minlength=k)
    if np.any(counts == 0):
        raise ValueError(
            f"classes {np.flatnonzero(counts == 0).tolist()!r} are absent from source_y: BBSE "
            "cannot estimate their confusion-matrix column. Provide labelled source samples "
            "of every class."
        )
    source_priors = counts / counts.sum()
    if soft:
        pred_s, pred_t = source_proba, target_proba
    else:
        pred_s = np.eye(k)[np.argmax(source_proba, axis=1)]
        pred_t = np.eye(k)[np.argmax(target_proba, axis=1)]
    onehot = np.eye(k)[y]
    conf = pred_s.T @ onehot / len(y)  # conf[i, j] = P_S(yhat = i, y = j)
    mu = pred_t.mean(axis=0)
    cond = np.linalg.cond(conf)
    if not np.isfinite(cond) or cond > max_condition:
        warnings.warn(
            f"BBSE confusion matrix is singular or ill-conditioned (condition number "
            f"{cond:.3g} > max_condition={max_condition!r}): the classifier does not separate "
            "all classes on source data. Falling back to non-negative least squares; consider "
            "prior_estimation='em' or a better classifier.",
            LabelShiftWarning,
            stacklevel=2,
        )
        w, _ = nnls(conf, mu)
    else:
        w = np.linalg.solve(conf, mu)
    w = np.clip(w, 0.0, None)
    priors = w * source_priors
    total = priors.sum()
    if total <= 0:
        warnings.warn(
            "BBSE gave all-zero class weights; returning the source priors.",
            LabelShiftWarning,
            stacklevel=2,
        )
        return source_priors
    return priors / total


def _class_weights(y, target_priors, source_priors):
    y = column_or_1d(y, warn=True)
    check_classification_targets(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    k = len(classes)
    if k < 2:
        raise ValueError(f"y must contain at least 2 classes, got only {classes.tolist()!r}.")
    target = _check_priors(target_priors, "target_priors", k, classes)
    if source_priors is None:
        source = np.bincount(y_idx, minlength=k) / len(y_idx)
    else:
        source = _check_priors(source_priors, "source_priors", k, classes)
        if np.any(source <= 0):
            raise ValueError(f"source_priors={source_priors!r} must be strictly positive.")
    return classes, y_idx, target / source


def prior_shift_class_weight(y, target_priors, *, source_priors=None) -> dict:
    """Class weights ``pi_T(c) / pi_S(c)`` that make training mimic the target prevalence.

    Pass the result as ``class_weight=`` to any sklearn classifier (or skrtl's
    ``FineTuneClassifier``) when the target prevalence is known: the weighted source risk is
    then the target risk under label shift.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Source training labels.
    target_priors : array-like of shape (n_classes,) or dict
        Target priors in the order of ``np.unique(y)``, or ``{class: prior}``.
    source_priors : array-like or dict, default=None
        Source priors; ``None`` uses the class frequencies of ``y``.

    Returns
    -------
    dict
        ``{class: weight}``.

    Examples
    --------
    >>> from skrtl._label_shift import prior_shift_class_weight
    >>> prior_shift_class_weight([0, 0, 0, 1], {0: 0.5, 1: 0.5})
    {0: 0.666..., 1: 2.0}
    """
    classes, _, ratio = _class_weights(y, target_priors, source_priors)
    return {c: float(r) for c, r in zip(classes.tolist(), ratio)}


def prior_shift_sample_weight(y, target_priors, *, source_priors=None) -> np.ndarray:
    """Per-sample weights ``pi_T(y_i) / pi_S(y_i)`` (mean 1 when ``source_priors`` is None).

    Use as ``fit(X, y, sample_weight=...)`` of any classifier when the target prevalence is
    known; see :func:`prior_shift_class_weight` for the ``class_weight`` form.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Source training labels.
    target_priors : array-like of shape (n_classes,) or dict
        Target priors in the order of ``np.unique(y)``, or ``{class: prior}``.
    source_priors : array-like or dict, default=None
        Source priors; ``None`` uses the class frequencies of ``y``.

    Returns
    -------
    ndarray of shape (n_samples,)
        Sample weights.
    """
    _, y_idx, ratio = _class_weights(y, target_priors, source_priors)
    return ratio[y_idx]


# --------------------------------------------------------------------------------------------
# meta-estimator
# --------------------------------------------------------------------------------------------


class LabelShiftAdapter(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """Wrap a probabilistic classifier to adapt its posteriors to a new class prevalence.

    ``fit(X, y)`` fits a clone of ``estimator`` on all labelled source data and fits the
    calibrator (TS / BCTS / VS) on held-out source predictions obtained by internal
    cross-validation (``cv``). ``adapt(X_target)`` estimates the target class priors from
    *unlabelled* target samples (EM or BBSE); afterwards ``predict_proba`` and ``predict``
    return the prior-adjusted posteriors ``p_T(y | x)``.

    Before :meth:`adapt` (and without known ``target_priors``) predictions are the
    **calibrated source posteriors**.

    Parameters
    ----------
    estimator : estimator object, default=None
        Classifier with ``fit`` and ``predict_proba`` (a whole Pipeline is fine, and the
        recommended way: then ``adapt`` takes raw target inputs). ``None`` means
        ``LogisticRegression()``.
    calibration : {"bcts", "ts", "vs"} or None, default="bcts"
        Calibrator fitted on held-out source log-probabilities: bias-corrected temperature
        scaling (recommended before EM), temperature scaling, vector scaling, or none.
    prior_estimation : {"em", "bbse-hard", "bbse-soft", "known"}, default="em"
        How ``adapt`` estimates the target priors. ``"known"`` uses ``target_priors`` and needs
        no target data (predictions are adjusted right after ``fit``).
    target_priors : array-like of shape (n_classes,) or dict, default=None
        Known target priors (class order of ``classes_`` or ``{class: prior}``); required when
        ``prior_estimation="known"``, ignored otherwise.
    source_priors : {"calibrated", "empirical"}, default="calibrated"
        Priors ``pi_S`` in the adjustment ratio: mean calibrated held-out prediction (consistent
        with the calibrated model; Alexandari et al. 2020) or source label frequencies.
    cv : int, cross-validation generator, iterable or "prefit", default=5
        Held-out source predictions for calibration and BBSE. An int uses a shuffled
        ``StratifiedKFold``. ``"prefit"``: ``estimator`` is already fitted and is used as is;
        ``fit(X, y)`` then receives separate calibration data only.
    adapt_on_predict : bool, default=False
        If True, every ``predict_proba`` / ``predict`` call estimates the target priors from the
        batch it receives (transductive mode, for ``cross_validate`` / ``GridSearchCV`` where
        each test fold is a target site); the fitted state is not changed. Explicit
        :meth:`adapt` estimates are ignored in this mode.
    min_target_samples : int, default=20
        Target sets smaller than this are too noisy to estimate priors from: a
        :class:`LabelShiftWarning` is raised and the source priors are used (no adjustment).
    em_tol : float, default=1e-6
        EM stops when the largest prior change is below ``em_tol``.
    em_max_iter : int, default=1000
        Maximum EM iterations (``ConvergenceWarning`` when reached).
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffling of the internal ``StratifiedKFold`` (int ``cv`` only).

    Attributes
    ----------
    estimator_ : estimator
        Fitted base estimator (``estimator`` itself when ``cv="prefit"``).
    calibrator_ : TemperatureScaling, BiasCorrectedTemperatureScaling, VectorScaling or None
        Fitted calibrator on held-out source log-probabilities.
    classes_ : ndarray of shape (n_classes,)
        Class labels.
    source_priors_ : ndarray of shape (n_classes,)
        ``pi_S`` used in the adjustment.
    empirical_source_priors_ : ndarray of shape (n_classes,)
        Source label frequencies.
    held_out_proba_ : ndarray of shape (n_samples, n_classes)
        Calibrated held-out (cross-validated, or prefit) source posteriors used for the
        calibration, ``source_priors_`` and the BBSE confusion matrix.
    target_priors_ : ndarray of shape (n_classes,)
        Estimated (or known) target priors; set by :meth:`adapt` (or ``fit`` when
        ``prior_estimation="known"`` or ``X_target`` is passed).
    n_iter_ : int
        EM iterations of the last adaptation (0 for BBSE / known).
    converged_ : bool
        Whether EM converged (True for BBSE / known).
    n_target_ : int
        Number of target samples used by the last adaptation.
    n_features_in_ : int
        Number of features seen by the base estimator (when it exposes it).

    See Also
    --------
    em_prior_estimate, bbse_prior_estimate, adjust_posteriors, prior_shift_class_weight

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skrtl._label_shift import LabelShiftAdapter
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 400)
    >>> X = rng.normal(size=(400, 2)) + 1.5 * y[:, None]
    >>> yt = (rng.random(400) < 0.8).astype(int)          # target: 80 % positives
    >>> Xt = rng.normal(size=(400, 2)) + 1.5 * yt[:, None]
    >>> ada = LabelShiftAdapter(LogisticRegression(), random_state=0).fit(X, y).adapt(Xt)
    >>> bool(abs(ada.target_priors_[1] - 0.8) < 0.1)
    True
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit", "predict_proba"]), None],
        "calibration": [StrOptions({"bcts", "ts", "vs"}), None],
        "prior_estimation": [StrOptions({"em", "bbse-hard", "bbse-soft", "known"})],
        "target_priors": ["array-like", dict, None],
        "source_priors": [StrOptions({"calibrated", "empirical"})],
        "cv": ["cv_object", StrOptions({"prefit"})],
        "adapt_on_predict": ["boolean"],
        "min_target_samples": [Interval(Integral, 1, None, closed="left")],
        "em_tol": [Interval(Real, 0, None, closed="neither")],
        "em_max_iter": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        estimator=None,
        *,
        calibration="bcts",
        prior_estimation="em",
        target_priors=None,
        source_priors="calibrated",
        cv=5,
        adapt_on_predict=False,
        min_target_samples=20,
        em_tol=1e-6,
        em_max_iter=1000,
        random_state=None,
    ):
        self.estimator = estimator
        self.calibration = calibration
        self.prior_estimation = prior_estimation
        self.target_priors = target_priors
        self.source_priors = source_priors
        self.cv = cv
        self.adapt_on_predict = adapt_on_predict
        self.min_target_samples = min_target_samples
        self.em_tol = em_tol
        self.em_max_iter = em_max_iter
        self.random_state = random_state

    # ---------------------------------------------------------------- helpers
    def _get_estimator(self):
        if self.estimator is None:
            from sklearn.linear_model import LogisticRegression

            return LogisticRegression()
        return self.estimator

    def _column_order(self, est_classes) -> np.ndarray:
        est_classes = np.asarray(est_classes)
        pos = {c: i for i, c in enumerate(est_classes.tolist())}
        return np.array([pos[c] for c in self.classes_.tolist()])

    def _raw_proba(self, X) -> np.ndarray:
        proba = np.asarray(self.estimator_.predict_proba(X), dtype=np.float64)
        return proba[:, self._columns_]

    def _calibrate(self, proba: np.ndarray) -> np.ndarray:
        if self.calibrator_ is None:
            return proba / proba.sum(axis=1, keepdims=True)
        return self.calibrator_.predict_proba(np.log(np.clip(proba, PROBA_FLOOR, None)))

    # ---------------------------------------------------------------- fit
    @_fit_context(
        # the base estimator is validated when it is fitted
        prefer_skip_nested_validation=False
    )
    def fit(self, X, y, *, X_target=None, sample_weight=None, **fit_params):
        """Fit the base classifier and the calibrator on labelled source data.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, ...)
            Source inputs, anything the base estimator accepts (e.g. a skrtl image frame).
        y : array-like of shape (n_samples,)
            Source labels.
        X_target : array-like, default=None
            Optional unlabelled target inputs; if given, :meth:`adapt` is called on them after
            fitting (one-shot form). In a Pipeline, pass it only when this adapter wraps the
            whole pipeline (``X_target`` is not transformed by earlier pipeline steps).
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights: they weight the source priors and the calibration, and are passed
            to the base estimator's ``fit`` (which must accept them).
        **fit_params
            Passed to the base estimator's ``fit`` (in the held-out calibration folds too;
            sample-aligned values are split with the folds). With metadata routing enabled
            they are routed as the base estimator requests them, and ``groups`` reaches a
            group-aware ``cv`` splitter.

        Returns
        -------
        self : object
            Fitted adapter.
        """
        X, y = indexable(X, y)
        y = check_class_labels(y, estimator_name=type(self).__name__)
        weights = None
        if sample_weight is not None:
            weights = _check_sample_weight(sample_weight, np.empty((len(y), 0)), dtype=np.float64)
            totals = {c: float(weights[y == c].sum()) for c in np.unique(y)}
            empty = [c for c, t in totals.items() if not t > 0]
            if empty:
                raise ValueError(
                    f"classes {empty!r} have a total sample_weight of 0: the source priors and "
                    "the calibration need every class with a positive weight. Drop those "
                    "samples (and classes) or give them weight."
                )
        if len(y) == 0:
            raise ValueError("y is empty: LabelShiftAdapter needs labelled source samples.")
        for attr in ("target_priors_", "n_iter_", "converged_", "n_target_"):
            if hasattr(self, attr):
                delattr(self, attr)
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise ValueError(
                f"LabelShiftAdapter needs at least 2 classes in y, got only 1 class "
                f"({classes[0]!r})."
            )
        base = self._get_estimator()
        if self.prior_estimation == "known" and self.target_priors is None:
            raise ValueError(
                "prior_estimation='known' needs target_priors (one prior per class, or a "
                "{class: prior} dict); pass target_priors or choose 'em' / 'bbse-hard'."
            )

        if isinstance(self.cv, str) and self.cv == "prefit":
            check_is_fitted(base, msg="cv='prefit' needs a fitted estimator; fit it first.")
            self.estimator_ = base
            est_classes = np.asarray(self.estimator_.classes_)
            unknown = np.setdiff1d(classes, est_classes)
            if unknown.size:
                raise ValueError(
                    f"y contains classes {unknown.tolist()!r} unknown to the prefit estimator "
                    f"(its classes_ are {est_classes.tolist()!r})."
                )
            absent = np.setdiff1d(est_classes, classes)
            if absent.size:
                raise ValueError(
                    f"classes {absent.tolist()!r} of the prefit estimator are absent from the "
                    "calibration labels y: calibration and source priors need every class. "
                    "Add calibration samples of these classes."
                )
            self.classes_ = est_classes
            self._columns_ = np.arange(len(est_classes))
            held_out = np.asarray(self.estimator_.predict_proba(X), dtype=np.float64)
        else:
            self.classes_ = classes
            if isinstance(self.cv, Integral):
                if counts.min() < self.cv:
                    raise ValueError(
                        f"class {classes[np.argmin(counts)]!r} has only {counts.min()} samples, "
                        f"fewer than cv={self.cv!r} folds: every class needs at least cv samples "
                        "for held-out calibration. Lower cv, or add samples of that class."
                    )
                seed = derive_seed(root_seed(self.random_state), "calibration folds")
                splitter = StratifiedKFold(n_splits=self.cv, shuffle=True, random_state=seed)
            else:
                splitter = check_cv(self.cv, y, classifier=True)
            if _routing_enabled():
                extra = {} if weights is None else {"sample_weight": weights}
                routed = process_routing(self, "fit", **extra, **fit_params)
                est_params = routed.estimator.fit
                split_params = routed.splitter.split if "splitter" in routed else {}
            else:
                est_params, split_params = dict(fit_params), {}
                if weights is not None:
                    if not has_fit_parameter(base, "sample_weight"):
                        raise ValueError(
                            f"sample_weight was given but the base estimator "
                            f"{type(base).__name__} does not take sample_weight in fit. Use "
                            "an estimator that does, or drop sample_weight."
                        )
                    est_params["sample_weight"] = weights
            held_out = cross_val_predict(
                clone(base),
                X,
                y,
                cv=list(splitter.split(X, y, **split_params)),
                method="predict_proba",
                params=est_params or None,
            ).astype(np.float64)
            self.estimator_ = clone(base).fit(X, y, **est_params)
            self._columns_ = self._column_order(self.estimator_.classes_)

        pos = {c: i for i, c in enumerate(self.classes_.tolist())}
        y_idx = np.array([pos[c] for c in y.tolist()], dtype=np.intp)
        if self.calibration is None:
            self.calibrator_ = None
        else:
            logp = np.log(np.clip(held_out, PROBA_FLOOR, None))
            self.calibrator_ = _CALIBRATORS[self.calibration]().fit(
                logp, y_idx, sample_weight=weights
            )
        cal = self._calibrate(held_out)
        self.held_out_proba_ = cal
        self._source_y_ = y_idx
        k = len(self.classes_)
        w = np.ones(len(y_idx)) if weights is None else weights
        self.empirical_source_priors_ = np.bincount(y_idx, weights=w, minlength=k) / w.sum()
        if self.source_priors == "calibrated":
            self.source_priors_ = np.average(cal, axis=0, weights=w)
        else:
            self.source_priors_ = self.empirical_source_priors_.copy()
        if hasattr(self.estimator_, "n_features_in_"):
            self.n_features_in_ = self.estimator_.n_features_in_
        if hasattr(self.estimator_, "feature_names_in_"):
            self.feature_names_in_ = self.estimator_.feature_names_in_

        if self.prior_estimation == "known":
            self.target_priors_ = _check_priors(
                self.target_priors, "target_priors", k, self.classes_
            )
            self.n_iter_, self.converged_, self.n_target_ = 0, True, 0
        elif X_target is not None:
            self.adapt(X_target)
        return self

    # ---------------------------------------------------------------- adaptation
    def _estimate(self, cal_target: np.ndarray) -> tuple[np.ndarray, int, bool]:
        n = cal_target.shape[0]
        if n < self.min_target_samples:
            warnings.warn(
                f"only {n} target samples, fewer than min_target_samples="
                f"{self.min_target_samples!r}: too few to estimate class priors; using the "
                "source priors (no adjustment). Pass more target samples or lower "
                "min_target_samples.",
                LabelShiftWarning,
                stacklevel=3,
            )
            return self.source_priors_.copy(), 0, True
        if self.prior_estimation == "em":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                priors, n_iter, conv = em_prior_estimate(
                    cal_target,
                    self.source_priors_,
                    tol=self.em_tol,
                    max_iter=self.em_max_iter,
                    return_n_iter=True,
                )
            for w in caught:
                warnings.warn(w.message, w.category, stacklevel=3)
            return priors, n_iter, conv
        priors = bbse_prior_estimate(
            self.held_out_proba_,
            self._source_y_,
            cal_target,
            soft=self.prior_estimation == "bbse-soft",
        )
        return priors, 0, True

    def adapt(self, X_target):
        """Estimate the target class priors from unlabelled target inputs.

        After this call ``target_priors_`` holds the estimate and ``predict_proba`` /
        ``predict`` return the adjusted posteriors. Calling it again re-estimates (for another
        target site). With ``prior_estimation="known"`` it only checks that the adapter is
        fitted.

        Parameters
        ----------
        X_target : array-like or DataFrame
            Unlabelled target inputs, in the same form as the ``X`` given to ``fit``.

        Returns
        -------
        self : object
            The adapted estimator.
        """
        check_is_fitted(self, "classes_")
        if self.prior_estimation == "known":
            return self
        if _num_samples(X_target) == 0:
            raise ValueError("X_target has no samples: adapt needs unlabelled target inputs.")
        proba = self._calibrate(self._raw_proba(X_target))
        self.target_priors_, self.n_iter_, self.converged_ = self._estimate(proba)
        self.n_target_ = int(proba.shape[0])
        return self

    # ---------------------------------------------------------------- prediction
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities adjusted to the target priors.

        Calibrated source posteriors if the adapter has not been adapted yet.

        Parameters
        ----------
        X : array-like or DataFrame
            Inputs.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Probabilities in the order of ``classes_``.
        """
        check_is_fitted(self, "classes_")
        proba = self._calibrate(self._raw_proba(X))
        if self.adapt_on_predict and self.prior_estimation != "known":
            priors = self._estimate(proba)[0]
        else:
            priors = getattr(self, "target_priors_", None)
        if priors is None:
            return proba
        return reweight_posteriors(proba, priors / self.source_priors_)

    def predict_log_proba(self, X) -> np.ndarray:
        """Logarithm of :meth:`predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """Most probable class under the adjusted posteriors."""
        check_is_fitted(self, "classes_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def get_metadata_routing(self):
        """Metadata routing: fit parameters to the base estimator, ``groups`` to ``cv``.

        Returns
        -------
        sklearn.utils.metadata_routing.MetadataRouter
        """
        router = MetadataRouter(owner=type(self).__name__).add_self_request(self)
        router.add(
            estimator=self._get_estimator(),
            method_mapping=MethodMapping().add(caller="fit", callee="fit"),
        )
        if not (isinstance(self.cv, str) or isinstance(self.cv, Integral)):
            router.add(
                splitter=check_cv(self.cv, classifier=True),
                method_mapping=MethodMapping().add(caller="fit", callee="split"),
            )
        return router

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        est_tags = get_tags(self._get_estimator())
        tags.input_tags = est_tags.input_tags
        tags.classifier_tags.multi_class = True
        return tags
