"""Plots of a transfer search, as a Display object (the pattern of sklearn's
``CalibrationDisplay``)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

__all__ = ["TransferSearchDisplay"]


class TransferSearchDisplay:
    """Optimisation history, parameter importances and the ``freeze_depth`` x ``gamma`` contour.

    Build it with :meth:`from_estimator` (a fitted :class:`~skrtl.TransferSearchCV`) or
    :meth:`from_study`, then :meth:`plot` (matplotlib figures in ``figures_``) or
    :meth:`save` (PNG files).

    Parameters
    ----------
    study : optuna.Study

    Attributes
    ----------
    figures_ : dict of str to matplotlib.figure.Figure
        Set by :meth:`plot`: ``"optimization_history"``, ``"param_importances"`` (with at least
        two completed trials) and ``"contour_freeze_depth_gamma"`` (when both were searched).
    """

    def __init__(self, study: optuna.Study):
        self.study = study

    @classmethod
    def from_estimator(cls, search) -> TransferSearchDisplay:
        """Display of a fitted :class:`~skrtl.TransferSearchCV`."""
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(search, "study_")
        return cls(search.study_)

    @classmethod
    def from_study(cls, study: optuna.Study) -> TransferSearchDisplay:
        """Display of an Optuna study (e.g. loaded from a shared storage)."""
        return cls(study)

    def _jobs(self) -> list[tuple[str, Callable]]:
        from optuna.visualization import matplotlib as ovm

        study = self.study
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        names = set().union(*(t.params for t in completed)) if completed else set()
        jobs: list[tuple[str, Callable]] = [
            ("optimization_history", lambda: ovm.plot_optimization_history(study))
        ]
        if len(completed) >= 2:
            jobs.append(("param_importances", lambda: ovm.plot_param_importances(study)))
        else:
            warnings.warn(
                f"Skipping the parameter-importance plot: {len(completed)} completed trial(s), "
                "at least 2 are needed.",
                UserWarning,
                stacklevel=3,
            )
        if {"freeze_depth", "gamma"} <= names:
            jobs.append(
                (
                    "contour_freeze_depth_gamma",
                    lambda: ovm.plot_contour(study, params=["freeze_depth", "gamma"]),
                )
            )
        return jobs

    def plot(self) -> TransferSearchDisplay:
        """Draw the plots (each in its own figure); plots that cannot be drawn are skipped.

        Returns
        -------
        self
        """
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")
        self.figures_ = {}
        for name, make in self._jobs():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                try:
                    ax = make()
                except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                    warnings.warn(
                        f"Skipping the {name} plot ({type(exc).__name__}: {exc}).",
                        UserWarning,
                        stacklevel=2,
                    )
                    continue
            self.figures_[name] = (
                np.ravel(ax)[0].figure if isinstance(ax, np.ndarray) else ax.figure
            )
        return self

    def save(self, plots_dir, *, dpi: int = 100) -> dict[str, Path]:
        """Draw the plots and write them as ``<name>.png`` files into ``plots_dir``.

        Parameters
        ----------
        plots_dir : str or path
            Folder, created if needed.
        dpi : int, default=100

        Returns
        -------
        dict of str to pathlib.Path
            Plot name -> written file.
        """
        import matplotlib.pyplot as plt

        out = Path(plots_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.plot()
        paths: dict[str, Path] = {}
        for name, fig in self.figures_.items():
            path = out / f"{name}.png"
            fig.savefig(path, dpi=dpi, bbox_inches="tight")
            plt.close(fig)
            paths[name] = path
        return paths
