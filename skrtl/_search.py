"""Optuna search over transfer hyper-parameters inside scikit-learn cross-validation.

:class:`TransferSearchCV` tunes the freeze depth ``k``, the layer-wise learning-rate decay
``gamma``, the peak learning rate and the transfer strategy of a torch image estimator (by
default :class:`skrtl.FineTuneClassifier`) with Optuna:

* a cross-validated objective (:class:`~skrtl._search_objective.CVObjective`) with any
  scikit-learn scorer, folds computed once per ``fit`` so that every trial sees exactly the
  same splits;
* a **fresh study per fit** when no storage is given (nested cross-validation does not leak
  trials from one outer fold into the next; optuna-integration's ``OptunaSearchCV`` reuses
  its study across fits);
* pruning from per-epoch validation reports of the skorch training loop, with a step scheme
  that stays comparable across folds (:class:`~skrtl.CVMedianPruner`);
* an optional RDB storage (SQLite file or any SQLAlchemy URL) so that several processes or
  machines add trials to one resumable study;
* ``best_params_``, ``best_estimator_`` (refit on all data), ``study_``, ``cv_results_``
  (:mod:`skrtl._search_results`) and plots (:class:`~skrtl.TransferSearchDisplay`);
* metadata routing of fit parameters, ``groups`` and scorer parameters.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage
from sklearn.base import BaseEstimator, MetaEstimatorMixin, _fit_context, clone
from sklearn.metrics import check_scoring, get_scorer_names
from sklearn.model_selection import check_cv
from sklearn.utils import get_tags
from sklearn.utils._metadata_requests import (
    MetadataRouter,
    MethodMapping,
    _routing_enabled,
    process_routing,
)
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, indexable

from ._pruning import CVMedianPruner
from ._search_display import TransferSearchDisplay
from ._search_objective import CVObjective
from ._search_results import build_cv_results
from ._search_space import (
    check_distributions,
    n_layers_of,
    suggest_from_distributions,
    transfer_search_space,
)
from .utils import root_seed

__all__ = ["TransferSearchCV"]


@contextmanager
def _optuna_verbosity(verbose: int):
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose >= 2 else optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)


def _estimator_has(attr: str):
    def check(self):
        if hasattr(self, "best_estimator_"):
            getattr(self.best_estimator_, attr)
            return True
        getattr(self.estimator, attr)
        return True

    return check


class TransferSearchCV(MetaEstimatorMixin, BaseEstimator):
    """Optuna search of transfer hyper-parameters with cross-validation and pruning.

    Every trial clones ``estimator``, sets the sampled parameters and fits it on each
    training fold in turn, scoring the matching test fold with ``scoring``; the trial's value
    is the mean test score (greater is better, like scikit-learn). The best parameters are
    then refit on all the data.

    **Pruning under cross-validation.** When the estimator has a ``callbacks`` parameter
    (skorch-based estimators, :class:`~skrtl._finetune.FineTuneClassifier`) a skorch
    callback is appended for every fold. After each epoch it reports the epoch's validation
    metric (the first of ``valid_auc``, ``valid_acc``, ``valid_cindex``, ``-valid_loss``
    present in the skorch history, or ``pruning_metric``) to the trial at step

        ``step = fold_index * epochs_per_fold + epoch``  (epoch 0-based),

    where ``epochs_per_fold`` is the estimator's ``max_epochs`` (the upper bound of a
    searched ``max_epochs`` distribution). Why this scheme: Optuna pruners compare the
    values of different trials *at the same step*, and an Optuna step can be reported only
    once, so the folds cannot share steps. Since the folds are computed once per ``fit`` and
    run in the same order in every trial, a step denotes the same training data and the
    same number of epochs in every trial, so each comparison is like for like (reporting a
    running mean over folds instead would compare fold 0 of one trial with a mix of folds of
    another when training stops early). ``"hyperband"`` compares values at the rung step,
    which fits this scheme directly; ``"median"`` uses :class:`CVMedianPruner`, which
    restricts Optuna's median rule to the current fold (Optuna's ``MedianPruner`` compares a
    trial's best value over *all* earlier steps, which would mix folds). The pruned trial's
    remaining epochs and folds are skipped. Estimators without ``callbacks`` (or whose
    history has none of the metrics) report each fold's test score instead, at the last step
    of the fold, so pruning then works between folds.

    **Studies.** With ``storage=None`` each call to ``fit`` creates a new in-memory study
    (``study_``), never reusing one from an earlier fit: nested cross-validation (for
    example ``cross_val_score(TransferSearchCV(...), X, y)``) is leak-free. With a storage
    URL (``"sqlite:///search.db"`` or any SQLAlchemy RDB URL such as
    ``"postgresql://user:pw@host/db"``) the study lives in the database: with a
    ``study_name`` and ``load_if_exists=True`` a later ``fit`` (or another process or
    machine running the same code on the same data) continues the same study, every
    process runs ``n_trials`` *new* trials, and ``best_params_`` / ``cv_results_`` cover all
    trials of the study, whoever ran them. Use a fixed ``study_name`` only for one
    data set: never inside nested cross-validation.

    Parameters
    ----------
    estimator : estimator object
        Estimator to tune, typically :class:`~skrtl._finetune.FineTuneClassifier`.
    param_distributions : dict, callable or None, default=None
        Search space. A dict maps parameter names to
        :class:`optuna.distributions.IntDistribution`, ``FloatDistribution``,
        ``CategoricalDistribution`` or a list of choices. A callable ``space(trial) -> dict``
        may use ``trial.suggest_*`` freely (conditional spaces). ``None`` uses
        :func:`transfer_search_space` for the estimator's backbone: ``strategy`` in
        ``("finetune", "linear_probe")``, log-uniform ``lr`` in [1e-4, 1e-2] and, when fine
        tuning, ``freeze_depth`` in ``0..L-1`` and log-uniform ``gamma`` in [0.1, 1].
    n_trials : int or None, default=20
        Trials run by this ``fit`` (per process; with a shared storage the study grows by
        ``n_trials`` per worker). ``None`` runs until ``timeout``.
    timeout : float or None, default=None
        Stop starting new trials after this many seconds.
    cv : int, cross-validation generator or iterable, default=None
        As in scikit-learn (``None`` = 5-fold, stratified for classifiers). The splits are
        materialised once per fit and shared by all trials.
    scoring : str, callable or None, default=None
        Scorer of the objective (``None`` = the estimator's ``score``).
    refit : bool, default=True
        Refit the best parameters on all data as ``best_estimator_``.
    pruner : {"median", "hyperband"}, optuna pruner or None, default="median"
        ``"median"``: :class:`CVMedianPruner` (5 startup trials, 1 warm-up epoch per fold);
        ``"hyperband"``: ``optuna.pruners.HyperbandPruner(min_resource=1,
        max_resource=n_folds * epochs_per_fold)``; ``None``: no pruning. A pruner instance is
        copied at every fit (a :class:`CVMedianPruner` without ``epochs_per_fold`` gets it).
    sampler : optuna sampler or None, default=None
        ``None`` uses ``optuna.samplers.TPESampler(seed=random_state)``. An instance is
        deep-copied at every fit, so repeated fits start from the same sampler state.
    random_state : int, RandomState instance or None, default=None
        Seed of the default sampler (a RandomState draws one integer seed). It does not seed
        the estimator: set the estimator's own ``random_state`` for reproducible training.
    storage : str, optuna storage or None, default=None
        ``None``: in-memory study, new at every fit. An RDB URL (``"sqlite:///path.db"``,
        ``"postgresql://user:pw@host:5432/db"``, any SQLAlchemy URL): persistent, shareable
        between processes and machines (SQLite URLs get a 60 s lock timeout; use a server
        database such as PostgreSQL for many workers). ``"journal:///path/search.log"`` (or a
        path ending in ``.log``): Optuna's file-based ``JournalStorage``, shareable between the
        processes of one machine or a shared file system without a database server. Prefer
        URLs to storage objects: the estimator stays clonable.
    study_name : str or None, default=None
        Name of the study in ``storage`` (``None``: a new unique name per fit).
    load_if_exists : bool, default=False
        With ``storage``, continue the study ``study_name`` if it exists (resume /
        multi-process work) instead of raising an error.
    n_jobs : int or None, default=None
        Trials run in parallel threads of this process (Optuna's ``n_jobs``; ``-1`` = CPU
        count). With ``n_jobs > 1`` the sampled sequence is no longer deterministic. For
        several processes or machines use a shared ``storage``.
    plots_dir : str, path or None, default=None
        When given, :meth:`save_plots` writes the PNG plots there after fitting.
    pruning_metric : str or None, default=None
        History key reported for pruning (prefix ``-`` or a name ending in ``loss`` means
        lower is better). ``None`` tries ``valid_auc``, ``valid_acc``, ``valid_cindex``
        (:class:`~skrtl.FineTuneSurvival`), ``valid_loss``.
    error_score : "raise" or float, default=np.nan
        Value of a fold whose fit or scoring raised (with a warning). A NaN trial value is
        recorded by Optuna as a failed trial and the search goes on; ``"raise"`` stops it.
    callbacks : list of callables or None, default=None
        Optuna study callbacks ``callback(study, frozen_trial)``, called after every trial of
        this fit (e.g. ``optuna_integration.MLflowCallback`` to log trials to MLflow).
    verbose : int, default=0
        0: silent; 1: progress bar; 2: also Optuna's per-trial log lines.

    Attributes
    ----------
    study_ : optuna.Study
        The study of this fit (all its trials when a shared storage is used).
    best_params_ : dict
        Estimator parameters of the best completed trial.
    best_score_ : float
        Its mean cross-validated score.
    best_index_ : int
        Its row in ``cv_results_``.
    best_trial_ : optuna.trial.FrozenTrial
        The best trial.
    best_estimator_ : estimator
        Clone of ``estimator`` with ``best_params_`` fitted on all data (``refit=True``).
    cv_results_ : dict of numpy arrays
        One entry per trial of the study (``number``, ``state``, ``param_<name>``,
        ``split<i>_test_score``, ``mean_test_score``, ``std_test_score``,
        ``rank_test_score``, ``mean_fit_time``, ``epochs_run``, ``epochs_unpruned``,
        ``params``), loadable with ``pandas.DataFrame(cv_results_)``.
    epochs_run_ : int
        Epochs trained by the trials of this study (NaN-free counts; trials of other
        processes included).
    epochs_unpruned_ : int
        Epochs the same trials would have trained without pruning (pruned folds and the
        skipped folds counted at ``max_epochs``; an upper bound if the estimator stops
        early by itself).
    pruned_epoch_fraction_ : float
        ``1 - epochs_run_ / epochs_unpruned_``: the fraction of training saved by pruning.
    n_trials_ : dict
        Number of ``complete``, ``pruned`` and ``fail`` trials in the study.
    n_splits_ : int
        Number of folds.
    epochs_per_fold_ : int
        Step stride of the pruning reports.
    scorer_ : callable
        The scorer used.
    refit_time_ : float
        Seconds spent refitting the best estimator.
    plot_paths_ : dict
        Written PNG files (when ``plots_dir`` is given).

    See Also
    --------
    sklearn.model_selection.RandomizedSearchCV : exhaustive-free search without pruning.

    Examples
    --------
    >>> import optuna
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.linear_model import LogisticRegression
    >>> X, y = load_breast_cancer(return_X_y=True)
    >>> search = TransferSearchCV(
    ...     LogisticRegression(max_iter=2000),
    ...     param_distributions={"C": optuna.distributions.FloatDistribution(1e-3, 1e2, log=True)},
    ...     n_trials=5, cv=3, scoring="roc_auc", random_state=0,
    ... ).fit(X, y)
    >>> sorted(search.best_params_)
    ['C']
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit"])],
        "param_distributions": [dict, callable, None],
        "n_trials": [Interval(Integral, 1, None, closed="left"), None],
        "timeout": [Interval(Real, 0, None, closed="neither"), None],
        "cv": ["cv_object"],
        "scoring": [StrOptions(set(get_scorer_names())), callable, None],
        "refit": ["boolean"],
        "pruner": [StrOptions({"median", "hyperband"}), BasePruner, None],
        "sampler": [BaseSampler, None],
        "random_state": ["random_state"],
        "storage": [str, BaseStorage, None],
        "study_name": [str, None],
        "load_if_exists": ["boolean"],
        "n_jobs": [Integral, None],
        "plots_dir": [str, os.PathLike, None],
        "pruning_metric": [str, None],
        "error_score": [StrOptions({"raise"}), Real],
        "callbacks": [list, tuple, None],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        estimator,
        *,
        param_distributions=None,
        n_trials=20,
        timeout=None,
        cv=None,
        scoring=None,
        refit=True,
        pruner="median",
        sampler=None,
        random_state=None,
        storage=None,
        study_name=None,
        load_if_exists=False,
        n_jobs=None,
        plots_dir=None,
        pruning_metric=None,
        error_score=np.nan,
        callbacks=None,
        verbose=0,
    ):
        self.estimator = estimator
        self.param_distributions = param_distributions
        self.n_trials = n_trials
        self.timeout = timeout
        self.cv = cv
        self.scoring = scoring
        self.refit = refit
        self.pruner = pruner
        self.sampler = sampler
        self.random_state = random_state
        self.storage = storage
        self.study_name = study_name
        self.load_if_exists = load_if_exists
        self.n_jobs = n_jobs
        self.plots_dir = plots_dir
        self.pruning_metric = pruning_metric
        self.error_score = error_score
        self.callbacks = callbacks
        self.verbose = verbose

    # ---------------------------------------------------------------- sklearn plumbing
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        sub = get_tags(self.estimator)
        tags.estimator_type = sub.estimator_type
        tags.classifier_tags = copy.deepcopy(sub.classifier_tags)
        tags.regressor_tags = copy.deepcopy(sub.regressor_tags)
        tags.input_tags.pairwise = sub.input_tags.pairwise
        tags.input_tags.sparse = sub.input_tags.sparse
        tags.input_tags.allow_nan = sub.input_tags.allow_nan
        tags.non_deterministic = sub.non_deterministic
        return tags

    @property
    def classes_(self):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.classes_

    @property
    def n_features_in_(self):
        if not hasattr(self, "best_estimator_"):
            raise AttributeError(
                f"{type(self).__name__} has no attribute 'n_features_in_' before fit with "
                "refit=True."
            )
        return self.best_estimator_.n_features_in_

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "study_")

    # ---------------------------------------------------------------- fit
    def _space(self):
        space = self.param_distributions
        if space is None:
            return transfer_search_space(n_layers_of(self.estimator))
        if callable(space):
            return space
        check_distributions(space, self.estimator)
        return lambda trial: suggest_from_distributions(trial, space)

    def _epochs_per_fold(self) -> int | None:
        params = self.estimator.get_params(deep=False)
        max_epochs = params.get("max_epochs")
        if isinstance(self.param_distributions, Mapping):
            dist = self.param_distributions.get("max_epochs")
            if isinstance(dist, IntDistribution):
                max_epochs = dist.high
            elif isinstance(dist, CategoricalDistribution | list | tuple):
                choices = dist.choices if isinstance(dist, CategoricalDistribution) else dist
                max_epochs = max(choices)
        if isinstance(max_epochs, Integral) and max_epochs > 0:
            return int(max_epochs)
        return None

    def _make_pruner(self, n_splits: int, stride: int) -> BasePruner:
        if self.pruner is None:
            return optuna.pruners.NopPruner()
        if self.pruner == "median":
            return CVMedianPruner(epochs_per_fold=stride)
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=1, max_resource=max(n_splits * stride, 1), reduction_factor=3
            )
        pruner = copy.deepcopy(self.pruner)
        if isinstance(pruner, CVMedianPruner) and pruner.epochs_per_fold is None:
            pruner.epochs_per_fold = stride
        return pruner

    def _make_sampler(self) -> BaseSampler:
        if self.sampler is not None:
            return copy.deepcopy(self.sampler)
        seed = self.random_state
        if seed is not None:
            seed = root_seed(seed)
        return optuna.samplers.TPESampler(seed=seed)

    def _make_storage(self):
        storage = self.storage
        if not isinstance(storage, str):
            return storage
        if storage.startswith("journal:") or storage.endswith(".log"):
            from optuna.storages.journal import JournalFileBackend

            path = storage.split("journal:", 1)[1] if storage.startswith("journal:") else storage
            path = path[2:] if path.startswith("//") else path  # journal:///abs or journal:rel
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        if storage.startswith("sqlite"):
            return optuna.storages.RDBStorage(
                storage, engine_kwargs={"connect_args": {"timeout": 60}}
            )
        return storage

    def _create_study(self, pruner, sampler) -> optuna.Study:
        if self.storage is None and (self.study_name is not None or self.load_if_exists):
            warnings.warn(
                "study_name / load_if_exists have no effect with storage=None: every fit "
                "creates a new in-memory study. Pass storage='sqlite:///search.db' (or an RDB "
                "URL) to resume or share a study.",
                UserWarning,
                stacklevel=3,
            )
        storage = None
        for attempt in range(5):
            try:
                # workers starting together may race to create the tables: retry
                storage = self._make_storage()
                study = optuna.create_study(
                    storage=storage,
                    sampler=sampler,
                    pruner=pruner,
                    study_name=self.study_name if storage is not None else None,
                    direction="maximize",
                    load_if_exists=bool(self.load_if_exists) and storage is not None,
                )
                break
            except optuna.exceptions.DuplicatedStudyError as exc:
                raise ValueError(
                    f"storage already holds a study named study_name={self.study_name!r}. "
                    "Pass load_if_exists=True to continue it (resume / several workers), or "
                    "choose another study_name."
                ) from exc
            except Exception as exc:
                if attempt == 4 or "sqlalchemy" not in type(exc).__module__:
                    raise
                time.sleep(0.2 + 0.5 * attempt + 0.3 * np.random.default_rng().random())
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ValueError(
                f"The existing study {study.study_name!r} minimises; TransferSearchCV needs a "
                "maximised study (scikit-learn scores are greater-is-better)."
            )
        return study

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None, *, groups=None, **fit_params):
        """Run the search, then refit the best parameters on all data.

        Parameters
        ----------
        X : array-like or image frame
            Training data (``(n, H, W)`` / ``(n, H, W, C)`` arrays, an image frame from
            :func:`skrtl.make_image_frame`, or any data ``estimator`` accepts).
        y : array-like of shape (n_samples,), default=None
            Targets.
        groups : array-like of shape (n_samples,), default=None
            Group labels for group-aware ``cv`` splitters.
        **fit_params : dict
            Passed to ``estimator.fit`` (sample-aligned values are split with the folds).

        Returns
        -------
        self : TransferSearchCV
            Fitted search.
        """
        if self.n_trials is None and self.timeout is None:
            raise ValueError(
                "n_trials=None and timeout=None would search forever. Set n_trials (e.g. 20) "
                "or timeout (seconds)."
            )
        for attr in ("best_estimator_", "plot_paths_"):
            if hasattr(self, attr):
                delattr(self, attr)
        X, y, groups = indexable(X, y, groups)
        space = self._space()
        self.scorer_ = check_scoring(self.estimator, scoring=self.scoring)
        is_clf = get_tags(self.estimator).estimator_type == "classifier"
        cv = check_cv(self.cv, y, classifier=is_clf)
        if _routing_enabled():
            extra = {} if groups is None else {"groups": groups}
            routed = process_routing(self, "fit", **extra, **fit_params)
            split_params = routed.splitter.split
            fit_params = routed.estimator.fit
            score_params = routed.scorer.score
        else:
            split_params, score_params = {"groups": groups}, {}
        splits = [(np.asarray(tr), np.asarray(te)) for tr, te in cv.split(X, y, **split_params)]
        self.n_splits_ = len(splits)
        has_callbacks = "callbacks" in self.estimator.get_params(deep=False)
        stride = self._epochs_per_fold() if has_callbacks else None
        self.epochs_per_fold_ = stride if stride is not None else 1
        stride = self.epochs_per_fold_
        pruner = self._make_pruner(self.n_splits_, stride)
        objective = CVObjective(
            self.estimator,
            X,
            y,
            space=space,
            splits=splits,
            fit_params=fit_params,
            score_params=score_params,
            scorer=self.scorer_,
            has_callbacks=has_callbacks,
            stride=stride,
            monitor=self.pruning_metric,
            error_score=self.error_score,
        )
        from tqdm.auto import tqdm

        with _optuna_verbosity(int(self.verbose)):
            study = self._create_study(pruner, self._make_sampler())
        study.set_user_attr("n_splits", self.n_splits_)
        self.study_ = study
        with (
            _optuna_verbosity(int(self.verbose)),
            tqdm(total=self.n_trials, desc="TransferSearchCV", disable=not self.verbose) as bar,
        ):

            def progress(study_, frozen):
                bar.update(1)
                try:
                    bar.set_postfix(best=f"{study_.best_value:.4f}", refresh=False)
                except ValueError:
                    pass

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                study.optimize(
                    objective,
                    n_trials=self.n_trials,
                    timeout=self.timeout,
                    n_jobs=1 if self.n_jobs is None else int(self.n_jobs),
                    callbacks=[progress, *(self.callbacks or [])],
                    catch=(),
                )

        self._collect_results(study, space, objective.errors)
        if self.refit:
            params = self.best_params_
            est = clone(self.estimator).set_params(**params)
            t0 = time.perf_counter()
            est.fit(X, y, **fit_params)
            self.refit_time_ = time.perf_counter() - t0
            self.best_estimator_ = est
        if self.plots_dir is not None:
            self.plot_paths_ = self.save_plots(self.plots_dir)
        return self

    def _collect_results(self, study: optuna.Study, space, errors: list) -> None:
        res = build_cv_results(study, self.n_splits_)
        self.cv_results_ = res.cv_results
        self.epochs_run_ = res.epochs_run
        self.epochs_unpruned_ = res.epochs_unpruned
        self.pruned_epoch_fraction_ = res.pruned_epoch_fraction
        self.n_trials_ = res.n_trials
        n_all = len(res.cv_results["number"])
        if res.best_trial is None and errors:
            # every trial failed: re-raise the first underlying error (type and message kept)
            first = errors[0]
            if hasattr(first, "add_note"):
                first.add_note(
                    f"TransferSearchCV: all {n_all} trials failed ({len(errors)} fold fits or "
                    "scores raised); this is the first error."
                )
            raise first
        if res.best_trial is None:
            raise ValueError(
                f"No trial of study {study.study_name!r} completed ({self.n_trials_}). Check "
                "the warnings of failed folds, relax the pruner (pruner=None) or raise "
                "n_trials / timeout."
            )
        self.best_trial_ = res.best_trial
        self.best_index_ = res.best_index
        self.best_score_ = float(res.best_trial.value)
        self.best_params_ = dict(space(optuna.trial.FixedTrial(res.best_trial.params)))

    # ---------------------------------------------------------------- results
    def trials_dataframe(self, **kwargs):
        """All trials of ``study_`` as a pandas DataFrame (``Study.trials_dataframe``).

        Parameters
        ----------
        **kwargs : dict
            Passed to :meth:`optuna.study.Study.trials_dataframe` (``attrs``, ``multi_index``).

        Returns
        -------
        pandas.DataFrame
        """
        check_is_fitted(self, "study_")
        return self.study_.trials_dataframe(**kwargs)

    def save_plots(self, plots_dir, *, dpi: int = 100) -> dict[str, Path]:
        """Write the optimisation plots of ``study_`` as PNG files.

        Writes ``optimization_history.png``, ``param_importances.png`` (skipped, with a
        warning, with fewer than two completed trials or nothing to rank) and
        ``contour_freeze_depth_gamma.png`` (skipped when these two parameters were not both
        searched); see :class:`~skrtl.TransferSearchDisplay`.

        Parameters
        ----------
        plots_dir : str or path
            Folder, created if needed.
        dpi : int, default=100
            Resolution of the PNG files.

        Returns
        -------
        dict of str to pathlib.Path
            Plot name -> written file.
        """
        return TransferSearchDisplay.from_estimator(self).save(plots_dir, dpi=dpi)

    def get_metadata_routing(self):
        """Metadata routing: fit parameters to the estimator, ``groups`` to the splitter and
        scorer parameters to the scorer.

        Returns
        -------
        sklearn.utils.metadata_routing.MetadataRouter
        """
        is_clf = get_tags(self.estimator).estimator_type == "classifier"
        return (
            MetadataRouter(owner=type(self).__name__)
            .add(
                estimator=self.estimator,
                method_mapping=MethodMapping().add(caller="fit", callee="fit"),
            )
            .add(
                scorer=check_scoring(self.estimator, scoring=self.scoring),
                method_mapping=MethodMapping()
                .add(caller="fit", callee="score")
                .add(caller="score", callee="score"),
            )
            .add(
                splitter=check_cv(self.cv, classifier=is_clf),
                method_mapping=MethodMapping().add(caller="fit", callee="split"),
            )
        )

    # ---------------------------------------------------------------- delegation
    def _check_refit(self, method: str):
        check_is_fitted(self, "study_")
        if not hasattr(self, "best_estimator_"):
            raise AttributeError(
                f"{method} needs the refitted best estimator, but refit=False. Fit with "
                "refit=True, or build the model yourself from best_params_."
            )

    @available_if(_estimator_has("predict"))
    def predict(self, X):
        """Predict with ``best_estimator_``."""
        self._check_refit("predict")
        return self.best_estimator_.predict(X)

    @available_if(_estimator_has("predict_proba"))
    def predict_proba(self, X):
        """Class probabilities from ``best_estimator_``."""
        self._check_refit("predict_proba")
        return self.best_estimator_.predict_proba(X)

    @available_if(_estimator_has("predict_log_proba"))
    def predict_log_proba(self, X):
        """Log class probabilities from ``best_estimator_``."""
        self._check_refit("predict_log_proba")
        return self.best_estimator_.predict_log_proba(X)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X):
        """Decision function of ``best_estimator_``."""
        self._check_refit("decision_function")
        return self.best_estimator_.decision_function(X)

    @available_if(_estimator_has("transform"))
    def transform(self, X):
        """Transform with ``best_estimator_``."""
        self._check_refit("transform")
        return self.best_estimator_.transform(X)

    @available_if(_estimator_has("score"))
    def score(self, X, y=None, **params):
        """Score ``best_estimator_`` on ``X, y`` with the search's scorer.

        Parameters
        ----------
        X : array-like or image frame
        y : array-like, default=None
        **params
            Passed to the scorer (with metadata routing: as the scorer requests them).

        Returns
        -------
        float
        """
        self._check_refit("score")
        if _routing_enabled():
            params = process_routing(self, "score", **params).scorer.score
        return float(self.scorer_(self.best_estimator_, X, y, **params))
