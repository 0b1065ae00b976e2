"""Scaling calibrators on logits: temperature, bias-corrected temperature and vector scaling.

These are the calibrators that Alexandari, Kundaje and Shrikumar (ICML 2020, "Maximum likelihood
with bias-corrected calibration is hard-to-beat at label shift adaptation") found to make EM prior
estimation work. Each one maps a row of logits ``z`` (or log-probabilities, which differ from
logits only by a per-row constant that the softmax ignores) to calibrated probabilities:

* temperature scaling (TS): ``softmax(z / T)``;
* bias-corrected temperature scaling (BCTS): ``softmax(z / T + b)``;
* vector scaling (VS): ``softmax(w * z + b)`` (one weight and one bias per class).

Parameters are fitted by minimising the negative log-likelihood on held-out data with L-BFGS and
analytic gradients. One bias is fixed at zero (the softmax is invariant to a common shift).
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .utils import PROBA_FLOOR

__all__ = [
    "BiasCorrectedTemperatureScaling",
    "TemperatureScaling",
    "VectorScaling",
]


def _to_logits(X: np.ndarray, inputs: str, n_classes: int, name: str) -> np.ndarray:
    """Turn the calibrator input into an ``(n, n_classes)`` array of logits."""
    n_cols = X.shape[1]
    if n_cols == 1 and n_classes == 2:
        col = X[:, 0]
        if inputs == "logits":  # a binary decision_function: logit of the positive class
            return np.column_stack([np.zeros_like(col), col])
        if np.any((col < 0) | (col > 1)):
            raise ValueError(
                f"{name}(inputs='proba') needs probabilities in [0, 1]; got values in "
                f"[{col.min()!r}, {col.max()!r}]. Pass logits with inputs='logits'."
            )
        X = np.column_stack([1.0 - col, col])
        n_cols = 2
    if n_cols != n_classes:
        raise ValueError(
            f"{name} expects one column of {inputs} per class ({n_classes} classes"
            f"{', or 1 column for binary' if n_classes == 2 else ''}), got X with {n_cols} "
            "columns. Pass the logits or predict_proba output of a classifier, not features."
        )
    if inputs == "logits":
        return X
    if np.any(X < 0) or np.any(X > 1):
        raise ValueError(
            f"{name}(inputs='proba') needs probabilities in [0, 1]; got values in "
            f"[{X.min()!r}, {X.max()!r}]. Pass logits with inputs='logits'."
        )
    return np.log(np.clip(X, PROBA_FLOOR, None))


class _ScalingCalibrator(ClassifierMixin, BaseEstimator):
    """Shared fitting code; subclasses set ``_use_bias``, ``_use_vector``."""

    _use_bias = False
    _use_vector = False

    _parameter_constraints: dict = {
        "inputs": [StrOptions({"logits", "proba"})],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, *, inputs: str = "logits", tol: float = 1e-8, max_iter: int = 1000):
        self.inputs = inputs
        self.tol = tol
        self.max_iter = max_iter

    # parameter vector <-> (scale per class, bias per class)
    def _unpack(self, theta: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        pos = 0
        if self._use_vector:
            scale = theta[:k]
            pos = k
        else:
            scale = np.full(k, np.exp(theta[0]))
            pos = 1
        bias = np.zeros(k)
        if self._use_bias:
            bias[1:] = theta[pos : pos + k - 1]
        return scale, bias

    def _initial(self, k: int) -> np.ndarray:
        parts = [np.ones(k)] if self._use_vector else [np.zeros(1)]
        if self._use_bias:
            parts.append(np.zeros(k - 1))
        return np.concatenate(parts)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the scaling parameters by minimising the (weighted) log-loss.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_classes) or (n_samples, 1)
            Held-out logits (``inputs="logits"``) or predicted probabilities
            (``inputs="proba"``) of some classifier, columns in the order of ``np.unique(y)``.
            One column is accepted for binary problems (positive-class logit or probability).
        y : array-like of shape (n_samples,)
            True labels.
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the samples in the log-loss.

        Returns
        -------
        self : object
            Fitted calibrator.
        """
        X, y = validate_data(self, X, y, dtype=np.float64)
        w = _check_sample_weight(sample_weight, X, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        name = type(self).__name__
        if k < 2:
            raise ValueError(
                f"{name} needs at least 2 classes in y, got only one class ({self.classes_[0]!r})."
            )
        z = _to_logits(X, self.inputs, k, name)
        onehot = np.eye(k)[y_idx]
        n = len(y_idx)
        total = float(w.sum())
        if not total > 0:
            raise ValueError(f"{name}: sample_weight sums to {total!r}; it must be positive.")
        w = w / total

        def objective(theta):
            scale, bias = self._unpack(theta, k)
            s = z * scale + bias
            logp = log_softmax(s, axis=1)
            loss = -np.sum(w * logp[np.arange(n), y_idx])
            resid = w[:, None] * (np.exp(logp) - onehot)  # d loss / d s
            grads = []
            if self._use_vector:
                grads.append(np.sum(resid * z, axis=0))
            else:
                grads.append([np.sum(resid * z) * scale[0]])  # chain rule through exp
            if self._use_bias:
                grads.append(np.sum(resid, axis=0)[1:])
            return loss, np.concatenate(grads)

        res = minimize(
            objective,
            self._initial(k),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self.max_iter, "gtol": self.tol, "ftol": self.tol},
        )
        scale, bias = self._unpack(res.x, k)
        self.scale_ = scale
        self.bias_ = bias
        self.n_iter_ = int(res.nit)
        self.nll_ = float(res.fun)
        return self

    def _scaled_logits(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        z = _to_logits(X, self.inputs, len(self.classes_), type(self).__name__)
        return z * self.scale_ + self.bias_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags

    def predict_log_proba(self, X) -> np.ndarray:
        """Calibrated log-probabilities, shape ``(n_samples, n_classes)``."""
        return log_softmax(self._scaled_logits(X), axis=1)

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated probabilities, shape ``(n_samples, n_classes)``."""
        return np.exp(self.predict_log_proba(X))

    def predict(self, X) -> np.ndarray:
        """Most probable class under the calibrated probabilities."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self._scaled_logits(X), axis=1)]


class TemperatureScaling(_ScalingCalibrator):
    """Temperature scaling of logits: ``softmax(z / T)`` (Guo et al. 2017).

    One parameter; it changes confidence but never the predicted class.

    Parameters
    ----------
    inputs : {"logits", "proba"}, default="logits"
        What ``X`` holds: logits (e.g. ``decision_function`` output, or log-probabilities) or
        probabilities (``predict_proba`` output; their clipped logarithm is used).
    tol : float, default=1e-8
        Gradient and function tolerance of L-BFGS.
    max_iter : int, default=1000
        Maximum L-BFGS iterations.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels; column ``j`` of ``X`` belongs to ``classes_[j]``.
    temperature_ : float
        Fitted temperature ``T`` (> 1 softens over-confident models).
    scale_ : ndarray of shape (n_classes,)
        ``1 / T`` for every class.
    bias_ : ndarray of shape (n_classes,)
        Zeros (temperature scaling has no bias).
    nll_ : float
        Mean negative log-likelihood on the fitting data after calibration.
    n_iter_ : int
        L-BFGS iterations run.

    Examples
    --------
    >>> import numpy as np
    >>> from skrtl import TemperatureScaling
    >>> logits = np.array([[4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [-4.0, 4.0]])
    >>> ts = TemperatureScaling().fit(logits, [0, 1, 1, 0])
    >>> bool(ts.temperature_ > 1)
    True
    """

    @property
    def temperature_(self) -> float:
        check_is_fitted(self)
        return float(1.0 / self.scale_[0])


class BiasCorrectedTemperatureScaling(TemperatureScaling):
    """Bias-corrected temperature scaling (BCTS): ``softmax(z / T + b)``.

    Temperature scaling plus one bias per class (the first fixed at 0), as recommended by
    Alexandari et al. (2020) before EM prior estimation: the biases remove the systematic
    class-frequency miscalibration that plain temperature scaling cannot fix.

    Parameters
    ----------
    inputs : {"logits", "proba"}, default="logits"
        What ``X`` holds: logits or probabilities.
    tol : float, default=1e-8
        Gradient and function tolerance of L-BFGS.
    max_iter : int, default=1000
        Maximum L-BFGS iterations.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels.
    temperature_ : float
        Fitted temperature ``T``.
    scale_ : ndarray of shape (n_classes,)
        ``1 / T`` for every class.
    bias_ : ndarray of shape (n_classes,)
        Fitted per-class bias ``b`` (``bias_[0] == 0``).
    nll_ : float
        Mean negative log-likelihood on the fitting data after calibration.
    n_iter_ : int
        L-BFGS iterations run.
    """

    _use_bias = True


class VectorScaling(_ScalingCalibrator):
    """Vector scaling: ``softmax(w * z + b)`` with one weight and one bias per class.

    The most flexible of the three (``2K - 1`` parameters); it can change the predicted class
    and needs more calibration data than TS or BCTS.

    Parameters
    ----------
    inputs : {"logits", "proba"}, default="logits"
        What ``X`` holds: logits or probabilities.
    tol : float, default=1e-8
        Gradient and function tolerance of L-BFGS.
    max_iter : int, default=1000
        Maximum L-BFGS iterations.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels.
    scale_ : ndarray of shape (n_classes,)
        Fitted per-class weights ``w``.
    bias_ : ndarray of shape (n_classes,)
        Fitted per-class bias ``b`` (``bias_[0] == 0``).
    nll_ : float
        Mean negative log-likelihood on the fitting data after calibration.
    n_iter_ : int
        L-BFGS iterations run.
    """

    _use_bias = True
    _use_vector = True
