"""Survival plots as scikit-learn style displays: risk-group Kaplan-Meier curves, calibration.

Both classes follow scikit-learn's display API (:class:`~sklearn.calibration.CalibrationDisplay`):
``from_estimator(estimator, X, y, ...)`` or ``from_predictions(y, ...)`` compute what is
plotted and call :meth:`plot`, which draws on a matplotlib ``Axes`` and keeps ``ax_`` and
``figure_``. The computed numbers stay on the display (log-rank p, group sizes, observed and
predicted survival), so a report can quote them next to the picture.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np

from ._survival import as_survival_target, kaplan_meier
from ._survival_metrics import survival_function_at

__all__ = ["KaplanMeierDisplay", "SurvivalCalibrationDisplay"]

_NAMED_GROUPS = {"median": 2, "tertiles": 3, "quartiles": 4}


def _risk_group_labels(n: int) -> list[str]:
    if n == 2:
        return ["low risk", "high risk"]
    if n == 3:
        return ["low risk", "intermediate risk", "high risk"]
    return [f"risk group {i + 1}" + (" (lowest)" if i == 0 else "") for i in range(n)]


def _km_with_ci(time: np.ndarray, event: np.ndarray, alpha: float = 0.05):
    """Kaplan-Meier curve with log(-log) Greenwood confidence bands (lifelines' default)."""
    from scipy import stats

    times, surv = kaplan_meier(time, event)
    _, inv = np.unique(time, return_inverse=True)
    d = np.bincount(inv, weights=event.astype(float), minlength=times.size)
    at_risk = np.cumsum(np.bincount(inv, minlength=times.size)[::-1])[::-1].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(at_risk > d, d / (at_risk * (at_risk - d)), 0.0)
        var = np.cumsum(term)  # Greenwood: Var(log S) summand
        z = stats.norm.ppf(1 - alpha / 2)
        log_s = np.log(surv)
        se = np.sqrt(var) / np.abs(log_s)
        lower = np.exp(-np.exp(np.log(-log_s) + z * se))
        upper = np.exp(-np.exp(np.log(-log_s) - z * se))
    ok = (surv > 0) & (surv < 1)
    lower = np.where(ok, lower, surv)
    upper = np.where(ok, upper, surv)
    lower = np.where(surv == 1, 1.0, lower)
    return times, surv, lower, upper


class KaplanMeierDisplay:
    """Kaplan-Meier curves of predicted risk groups, with log-rank p and numbers at risk.

    Build it with :meth:`from_estimator` or :meth:`from_predictions`; the samples are split
    by their predicted risk (higher = shorter survival) at quantiles (``groups="median"``,
    ``"tertiles"``, ``"quartiles"`` or a number of quantile groups) or at your own cut
    points. For an honest plot of held-out patients take the cut points from the *training*
    risks (``cut_points=np.quantile(model.predict(X_train), [1/3, 2/3])``).

    Parameters
    ----------
    time, event : ndarray of shape (n_samples,)
        Observed times and event indicators.
    group : ndarray of int of shape (n_samples,)
        Risk group of each sample (0 = lowest risk).
    group_labels : list of str
    cut_points : ndarray
        Risk thresholds between consecutive groups.
    logrank_p : float
        p-value of the log-rank test of equal survival across the (non-empty) groups.
    logrank_statistic : float
    estimator_name : str, optional
        Shown in the title.

    Attributes
    ----------
    curves : list of tuple of ndarray
        Per group ``(times, survival, lower, upper)``: Kaplan-Meier estimate and 95%
        log(-log) confidence band.
    n_samples, n_events : ndarray of shape (n_groups,)
    ax_ : matplotlib Axes
    figure_ : matplotlib Figure
    at_risk_ax_ : matplotlib Axes or None
        The numbers-at-risk table below the curves.
    lines_ : list of matplotlib Line2D
    """

    def __init__(
        self,
        *,
        time,
        event,
        group,
        group_labels,
        cut_points,
        logrank_p,
        logrank_statistic,
        estimator_name=None,
    ):
        self.time = np.asarray(time, dtype=float)
        self.event = np.asarray(event, dtype=bool)
        self.group = np.asarray(group, dtype=int)
        self.group_labels = list(group_labels)
        self.cut_points = np.asarray(cut_points, dtype=float)
        self.logrank_p = logrank_p
        self.logrank_statistic = logrank_statistic
        self.estimator_name = estimator_name
        n_groups = len(self.group_labels)
        self.n_samples = np.bincount(self.group, minlength=n_groups)
        self.n_events = np.bincount(self.group, weights=self.event, minlength=n_groups).astype(int)
        self.curves = [
            _km_with_ci(self.time[self.group == g], self.event[self.group == g])
            if self.n_samples[g]
            else (np.empty(0),) * 4
            for g in range(n_groups)
        ]

    @classmethod
    def from_estimator(
        cls,
        estimator,
        X,
        y,
        *,
        groups="tertiles",
        cut_points=None,
        group_labels=None,
        name=None,
        ax=None,
        **plot_kwargs,
    ) -> KaplanMeierDisplay:
        """Split ``X`` by ``estimator.predict(X)`` (a risk score) and plot the groups.

        Parameters
        ----------
        estimator : fitted survival estimator
            ``predict`` returns a risk score (higher = shorter survival).
        X : array-like or DataFrame
        y : survival target (see :func:`~skrtl.as_survival_target`)
        groups, cut_points, group_labels, name, ax, **plot_kwargs
            As in :meth:`from_predictions`; ``name`` defaults to the estimator's class.

        Returns
        -------
        KaplanMeierDisplay
        """
        risk = estimator.predict(X)
        if name is None:
            final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
            name = type(final).__name__
        return cls.from_predictions(
            y,
            risk,
            groups=groups,
            cut_points=cut_points,
            group_labels=group_labels,
            name=name,
            ax=ax,
            **plot_kwargs,
        )

    @classmethod
    def from_predictions(
        cls,
        y,
        risk,
        *,
        groups="tertiles",
        cut_points=None,
        group_labels=None,
        name=None,
        ax=None,
        **plot_kwargs,
    ) -> KaplanMeierDisplay:
        """Split samples by predicted risk and plot each group's Kaplan-Meier curve.

        Parameters
        ----------
        y : survival target (see :func:`~skrtl.as_survival_target`)
        risk : array-like of shape (n_samples,)
            Predicted risk (higher = shorter survival).
        groups : {"median", "tertiles", "quartiles"} or int, default="tertiles"
            Quantile groups of ``risk`` (ignored when ``cut_points`` is given).
        cut_points : array-like, optional
            Increasing risk thresholds: group ``i`` holds ``cut_points[i-1] < risk <=
            cut_points[i]``. Take them from training risks for held-out samples.
        group_labels : list of str, optional
            One per group, lowest risk first (default "low risk", "intermediate risk", ...).
        name : str, optional
            Model name for the title.
        ax : matplotlib Axes, optional
        **plot_kwargs
            Passed to :meth:`plot` (``confidence``, ``at_risk``, ``time_scale``,
            ``xlabel``).

        Returns
        -------
        KaplanMeierDisplay
        """
        from lifelines.statistics import multivariate_logrank_test

        y = as_survival_target(y)
        risk = np.asarray(risk, dtype=float).ravel()
        if risk.shape[0] != y.shape[0]:
            raise ValueError(
                f"risk has {risk.shape[0]} values but y has {y.shape[0]} samples; they must "
                "be aligned."
            )
        if not np.isfinite(risk).all():
            raise ValueError("risk contains NaN or infinite values.")
        if cut_points is None:
            n_groups = _NAMED_GROUPS.get(groups, groups)
            if (
                not isinstance(n_groups, Integral)
                or isinstance(n_groups, bool)
                or n_groups < 2
                or n_groups > risk.size
            ):
                raise ValueError(
                    "groups must be 'median', 'tertiles', 'quartiles' or an int in [2, "
                    f"n_samples={risk.size}], got {groups!r}."
                )
            cut_points = np.quantile(risk, np.arange(1, n_groups) / n_groups)
        else:
            cut_points = np.atleast_1d(np.asarray(cut_points, dtype=float))
            if (
                cut_points.ndim != 1
                or not np.isfinite(cut_points).all()
                or (np.diff(cut_points) <= 0).any()
            ):
                raise ValueError(
                    f"cut_points must be finite and strictly increasing, got {cut_points!r}."
                )
        n_groups = cut_points.size + 1
        if group_labels is None:
            group_labels = _risk_group_labels(n_groups)
        elif len(group_labels) != n_groups:
            raise ValueError(
                f"group_labels must have {n_groups} entries (one per risk group), got "
                f"{len(group_labels)}."
            )
        group = np.digitize(risk, cut_points, right=True)
        counts = np.bincount(group, minlength=n_groups)
        if (counts == 0).any():
            empty = [group_labels[g] for g in np.flatnonzero(counts == 0)]
            warnings.warn(
                f"risk groups {empty!r} are empty (tied risks or cut points outside the risk "
                "range); they are left out of the log-rank test.",
                UserWarning,
                stacklevel=2,
            )
        if (counts > 0).sum() >= 2:
            res = multivariate_logrank_test(y["time"], group, y["event"])
            p, stat = float(res.p_value), float(res.test_statistic)
        else:
            p = stat = float("nan")
        disp = cls(
            time=y["time"],
            event=y["event"],
            group=group,
            group_labels=group_labels,
            cut_points=cut_points,
            logrank_p=p,
            logrank_statistic=stat,
            estimator_name=name,
        )
        return disp.plot(ax=ax, **plot_kwargs)

    def n_at_risk(self, times) -> np.ndarray:
        """Number of samples still at risk (``time >= t``) per group at each of ``times``.

        Returns
        -------
        ndarray of shape (n_groups, n_times)
        """
        times = np.atleast_1d(np.asarray(times, dtype=float))
        return np.array(
            [
                [(self.time[self.group == g] >= t).sum() for t in times]
                for g in range(len(self.group_labels))
            ]
        )

    def plot(
        self,
        ax=None,
        *,
        name=None,
        confidence: bool = True,
        at_risk: bool = True,
        time_scale: float = 1.0,
        xlabel: str | None = None,
    ) -> KaplanMeierDisplay:
        """Draw the curves.

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Created (with its figure) when None.
        name : str, optional
            Title prefix; defaults to ``estimator_name``.
        confidence : bool, default=True
            Shade the 95% confidence band of each curve.
        at_risk : bool, default=True
            Add a numbers-at-risk table below the axis, at the x ticks.
        time_scale : float, default=1.0
            Divide times by this for display (e.g. 365.25 to show days as years).
        xlabel : str, optional
            Default "time" (or "years" when ``time_scale`` is 365.25).

        Returns
        -------
        self
        """
        import matplotlib.pyplot as plt
        from matplotlib.transforms import blended_transform_factory

        if not (isinstance(time_scale, Real) and time_scale > 0):
            raise ValueError(f"time_scale must be a positive number, got {time_scale!r}.")
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.4, 4.8 if at_risk else 4.0))
        name = self.estimator_name if name is None else name
        n_groups = len(self.group_labels)
        palette = {2: ["tab:blue", "tab:red"], 3: ["tab:blue", "tab:orange", "tab:red"]}
        colors = palette.get(n_groups) or list(
            plt.get_cmap("plasma")(np.linspace(0.0, 0.85, n_groups))
        )
        self.lines_ = []
        for g, label in enumerate(self.group_labels):
            t, s, lo, hi = self.curves[g]
            if t.size == 0:
                continue
            x = np.r_[0.0, t] / time_scale
            (line,) = ax.step(
                x,
                np.r_[1.0, s],
                where="post",
                color=colors[g],
                label=f"{label} (n={self.n_samples[g]}, {self.n_events[g]} events)",
            )
            self.lines_.append(line)
            if confidence:
                ax.fill_between(
                    x, np.r_[1.0, lo], np.r_[1.0, hi], step="post", color=colors[g], alpha=0.15
                )
            cens = ~self.event[self.group == g]
            ct = self.time[self.group == g][cens]
            if ct.size:
                idx = np.searchsorted(t, ct, side="right") - 1
                ax.plot(ct / time_scale, s[idx], "|", color=colors[g], markersize=6)
        ax.set_ylim(0, 1.02)
        ax.set_xlim(left=0)
        ax.set_ylabel("survival probability")
        ax.set_xlabel(xlabel or ("years" if time_scale == 365.25 else "time"))
        title = f"log-rank p = {self.logrank_p:.2g}"
        ax.set_title(f"{name}: {title}" if name else title)
        ax.legend(loc="best", fontsize="small")
        self.at_risk_ax_ = None
        if at_risk:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            counts = self.n_at_risk(np.asarray(ticks) * time_scale)
            n_rows = len(self.group_labels)
            tax = ax.inset_axes([0.0, -0.2 - 0.075 * n_rows, 1.0, 0.075 * n_rows])
            tax.set_xlim(ax.get_xlim())
            tax.set_ylim(-0.5, n_rows - 0.5)
            tax.axis("off")
            trans = blended_transform_factory(tax.transAxes, tax.transData)
            for row, g in enumerate(range(n_rows)):
                yrow = n_rows - 1 - row
                tax.text(
                    -0.06, yrow, self.group_labels[g], transform=trans, ha="right", va="center",
                    fontsize="small", color=colors[g],
                )  # fmt: skip
                for tick, c in zip(ticks, counts[g]):
                    tax.text(tick, yrow, str(c), ha="center", va="center", fontsize="small")
            tax.set_title("number at risk", fontsize="small", loc="left")
            self.at_risk_ax_ = tax
        self.ax_ = ax
        self.figure_ = ax.figure
        return self


class SurvivalCalibrationDisplay:
    """Calibration at a horizon: predicted vs observed (Kaplan-Meier) survival by risk group.

    The samples are grouped by their predicted survival probability at ``horizon`` (quantile
    groups, e.g. deciles); in each group the mean prediction is set against the Kaplan-Meier
    estimate of survival at ``horizon``, with its 95% confidence interval. A calibrated model
    lies on the diagonal.

    Parameters
    ----------
    predicted : ndarray of shape (n_groups,)
        Mean predicted survival at ``horizon`` per group.
    observed, observed_lower, observed_upper : ndarray of shape (n_groups,)
        Kaplan-Meier survival at ``horizon`` per group and its 95% log(-log) confidence
        interval (NaN where the group's follow-up ends before ``horizon``).
    n_samples : ndarray of shape (n_groups,)
    horizon : float
    estimator_name : str, optional

    Attributes
    ----------
    calibration_error : float
        Mean absolute difference between ``predicted`` and ``observed``, weighted by group
        size (groups without an observed value left out).
    ax_ : matplotlib Axes
    figure_ : matplotlib Figure
    """

    def __init__(
        self,
        *,
        predicted,
        observed,
        observed_lower,
        observed_upper,
        n_samples,
        horizon,
        estimator_name=None,
    ):
        self.predicted = np.asarray(predicted, dtype=float)
        self.observed = np.asarray(observed, dtype=float)
        self.observed_lower = np.asarray(observed_lower, dtype=float)
        self.observed_upper = np.asarray(observed_upper, dtype=float)
        self.n_samples = np.asarray(n_samples, dtype=int)
        self.horizon = float(horizon)
        self.estimator_name = estimator_name
        ok = np.isfinite(self.observed)
        self.calibration_error = (
            float(
                np.average(np.abs(self.predicted - self.observed)[ok], weights=self.n_samples[ok])
            )
            if ok.any()
            else float("nan")
        )

    @classmethod
    def from_estimator(
        cls, estimator, X, y, *, horizon, n_groups=10, name=None, ax=None, **plot_kwargs
    ) -> SurvivalCalibrationDisplay:
        """Predict ``S(horizon | x)`` with the estimator and plot its calibration.

        Parameters
        ----------
        estimator : fitted survival estimator
            With ``predict_survival_function`` (see :func:`~skrtl.survival_function_at`).
        X : array-like or DataFrame
        y : survival target
        horizon : float
            Time at which calibration is assessed (e.g. 730 days).
        n_groups, name, ax, **plot_kwargs
            As in :meth:`from_predictions`.

        Returns
        -------
        SurvivalCalibrationDisplay
        """
        surv = survival_function_at(estimator, X, [horizon])[:, 0]
        if name is None:
            final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
            name = type(final).__name__
        return cls.from_predictions(
            y, surv, horizon=horizon, n_groups=n_groups, name=name, ax=ax, **plot_kwargs
        )

    @classmethod
    def from_predictions(
        cls, y, survival, *, horizon, n_groups=10, name=None, ax=None, **plot_kwargs
    ) -> SurvivalCalibrationDisplay:
        """Plot calibration of predicted survival probabilities at ``horizon``.

        Parameters
        ----------
        y : survival target (see :func:`~skrtl.as_survival_target`)
        survival : array-like of shape (n_samples,)
            Predicted ``S(horizon | x)`` (a probability, not a risk score).
        horizon : float
            Time of the predictions, in the unit of ``y``'s times.
        n_groups : int, default=10
            Number of quantile groups of the predictions (deciles; fewer groups when ties
            merge quantiles). Each group should hold enough samples for a Kaplan-Meier
            estimate (about 20 or more).
        name : str, optional
        ax : matplotlib Axes, optional
        **plot_kwargs
            Passed to :meth:`plot`.

        Returns
        -------
        SurvivalCalibrationDisplay
        """
        y = as_survival_target(y)
        surv = np.asarray(survival, dtype=float).ravel()
        if surv.shape[0] != y.shape[0]:
            raise ValueError(
                f"survival has {surv.shape[0]} values but y has {y.shape[0]} samples."
            )
        if not np.isfinite(surv).all() or (surv < 0).any() or (surv > 1).any():
            raise ValueError(
                "survival must hold probabilities in [0, 1] (predicted S(horizon | x), e.g. "
                "survival_function_at(model, X, [horizon])[:, 0]), not risk scores."
            )
        if not (isinstance(horizon, Real) and horizon > 0):
            raise ValueError(f"horizon must be a positive time, got {horizon!r}.")
        if not isinstance(n_groups, Integral) or n_groups < 1 or n_groups > surv.size:
            raise ValueError(
                f"n_groups must be an int in [1, n_samples={surv.size}], got {n_groups!r}."
            )
        edges = np.unique(np.quantile(surv, np.linspace(0, 1, n_groups + 1)))
        group = np.clip(np.searchsorted(edges, surv, side="right") - 1, 0, max(edges.size - 2, 0))
        pred, obs, lo, hi, n = [], [], [], [], []
        short = []
        for g in np.unique(group):
            sel = group == g
            t, s, lower, upper = _km_with_ci(y["time"][sel], y["event"][sel])
            pred.append(surv[sel].mean())
            n.append(int(sel.sum()))
            if horizon > t[-1] and s[-1] > 0:  # follow-up ends before the horizon
                short.append(int(g))
                obs.append(np.nan), lo.append(np.nan), hi.append(np.nan)
                continue
            i = np.searchsorted(t, horizon, side="right") - 1
            obs.append(1.0 if i < 0 else s[i])
            lo.append(1.0 if i < 0 else lower[i])
            hi.append(1.0 if i < 0 else upper[i])
        if short:
            warnings.warn(
                f"{len(short)} of {len(n)} groups have no follow-up up to horizon={horizon!r}; "
                "their observed survival is NaN. Use an earlier horizon or fewer groups.",
                UserWarning,
                stacklevel=2,
            )
        disp = cls(
            predicted=pred,
            observed=obs,
            observed_lower=lo,
            observed_upper=hi,
            n_samples=n,
            horizon=horizon,
            estimator_name=name,
        )
        return disp.plot(ax=ax, **plot_kwargs)

    def plot(self, ax=None, *, name=None, time_label: str | None = None, ref_line: bool = True):
        """Draw observed vs predicted survival with the diagonal of perfect calibration.

        Parameters
        ----------
        ax : matplotlib Axes, optional
        name : str, optional
            Legend label; defaults to ``estimator_name``.
        time_label : str, optional
            How the horizon is written in the axis labels (default ``t = <horizon>``).
        ref_line : bool, default=True
            Draw the diagonal (once per axis, also when several models share it).

        Returns
        -------
        self
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(4.8, 4.8))
        name = self.estimator_name if name is None else name
        when = time_label or f"t = {self.horizon:g}"
        ref_label = "perfectly calibrated"
        if ref_line and ref_label not in ax.get_legend_handles_labels()[1]:
            ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label=ref_label)
        ok = np.isfinite(self.observed)
        yerr = np.vstack(
            [
                self.observed[ok] - self.observed_lower[ok],
                self.observed_upper[ok] - self.observed[ok],
            ]
        )
        self.line_ = ax.errorbar(
            self.predicted[ok],
            self.observed[ok],
            yerr=np.clip(yerr, 0, None),
            fmt="o-",
            capsize=3,
            label=f"{name or 'model'} (mean |error| {self.calibration_error:.3f})",
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"predicted survival at {when}")
        ax.set_ylabel(f"observed (Kaplan-Meier) survival at {when}")
        ax.legend(loc="upper left", fontsize="small")
        self.ax_ = ax
        self.figure_ = ax.figure
        return self
