"""Tests of skrtl._search.TransferSearchCV (Optuna search inside cross-validation).

Most tests use ``TinyTransferNet``, a small skorch MLP defined here with the same transfer
parameters as FineTuneClassifier (``freeze_depth``, ``gamma``, ``lr``, ``max_epochs``,
``callbacks``), so that they do not depend on the real image estimator and stay fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score, cross_validate
from torch import nn

from skrtl._search import CVMedianPruner, TransferSearchCV, transfer_search_space

REPO = Path(__file__).resolve().parents[1]


class TinyTransferNet(ClassifierMixin, BaseEstimator):
    """Three-layer skorch MLP with freeze depth and layer-wise learning-rate decay."""

    def __init__(
        self, *, freeze_depth=0, gamma=1.0, lr=0.3, max_epochs=4, callbacks=None, random_state=0
    ):
        self.freeze_depth = freeze_depth
        self.gamma = gamma
        self.lr = lr
        self.max_epochs = max_epochs
        self.callbacks = callbacks
        self.random_state = random_state

    def fit(self, X, y):
        from skorch import NeuralNetClassifier
        from skorch.callbacks import EpochScoring
        from skorch.dataset import ValidSplit

        X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        self.n_features_in_ = X.shape[1]
        n_layers = 3
        with torch.random.fork_rng():
            torch.manual_seed(self.random_state)
            module = nn.Sequential(
                nn.Linear(X.shape[1], 16),
                nn.ReLU(),
                nn.Linear(16, 16),
                nn.ReLU(),
                nn.Linear(16, 2),
            )
            linear = [m for m in module if isinstance(m, nn.Linear)]
            for layer in linear[: self.freeze_depth]:
                layer.requires_grad_(False)
            groups = [
                (f"{2 * i}.*", {"lr": self.lr * self.gamma ** (n_layers - 1 - i)})
                for i in range(n_layers)
            ]
            callbacks = [
                ("valid_auc", EpochScoring("roc_auc", lower_is_better=False, name="valid_auc"))
            ]
            callbacks += list(self.callbacks or [])
            self.net_ = NeuralNetClassifier(
                module,
                criterion=nn.CrossEntropyLoss,
                optimizer=torch.optim.SGD,
                optimizer__param_groups=groups,
                lr=self.lr,
                max_epochs=self.max_epochs,
                batch_size=16,
                train_split=ValidSplit(0.25, stratified=True, random_state=0),
                iterator_train__shuffle=True,
                callbacks=callbacks,
                verbose=0,
            )
            self.net_.fit(X, y_enc.astype(np.int64))
        self.n_layers_ = n_layers
        self.n_samples_fit_ = len(X)
        return self

    def predict_proba(self, X):
        X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
        return self.net_.predict_proba(X)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


@pytest.fixture(scope="module")
def data():
    X, y = make_classification(
        n_samples=96, n_features=6, n_informative=4, class_sep=2.0, random_state=0
    )
    return X.astype(np.float32), y


KG_SPACE = {
    "freeze_depth": IntDistribution(0, 2),
    "gamma": FloatDistribution(0.1, 1.0, log=True),
}


def _params(search, name):
    return [t.params[name] for t in search.study_.trials if name in t.params]


def test_search_varies_freeze_depth_and_gamma(data):
    X, y = data
    search = TransferSearchCV(
        TinyTransferNet(max_epochs=2),
        param_distributions=KG_SPACE,
        n_trials=5,
        cv=2,
        scoring="roc_auc",
        pruner=None,
        random_state=0,
    ).fit(X, y)
    assert len(set(_params(search, "freeze_depth"))) > 1
    assert len(set(_params(search, "gamma"))) > 1
    assert set(search.best_params_) == {"freeze_depth", "gamma"}
    assert (
        search.best_estimator_.get_params()["freeze_depth"] == search.best_params_["freeze_depth"]
    )
    res = search.cv_results_
    assert len(res["mean_test_score"]) == 5
    assert {"split0_test_score", "split1_test_score", "param_gamma", "rank_test_score"} <= set(res)
    assert res["rank_test_score"][search.best_index_] == 1
    assert search.best_score_ == pytest.approx(np.nanmax(res["mean_test_score"]))
    # every epoch ran without a pruner
    assert search.epochs_run_ == 5 * 2 * 2
    assert search.pruned_epoch_fraction_ == 0.0
    df = search.trials_dataframe()
    assert len(df) == 5 and "params_gamma" in df


def test_pruning_stops_clearly_worse_trials(data):
    X, y = data
    # lr=1e-6 does not learn: its validation loss stays at chance level
    search = TransferSearchCV(
        TinyTransferNet(max_epochs=5),
        param_distributions={"lr": CategoricalDistribution([1e-6, 0.5])},
        n_trials=10,
        cv=2,
        scoring="roc_auc",
        pruner=CVMedianPruner(n_startup_trials=2, n_warmup_epochs=1),
        pruning_metric="valid_loss",
        sampler=optuna.samplers.RandomSampler(seed=1),
    ).fit(X, y)
    pruned = [t for t in search.study_.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, search.n_trials_
    assert all(t.params["lr"] == 1e-6 for t in pruned)
    for t in pruned:
        assert t.user_attrs["epochs_run"] < t.user_attrs["epochs_unpruned"] == 2 * 5
    assert 0 < search.pruned_epoch_fraction_ < 1
    assert search.best_params_["lr"] == 0.5
    # reports are laid out fold by fold: step = fold * max_epochs + epoch
    done = [t for t in search.study_.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(done[0].intermediate_values) == list(range(10))
    assert search.epochs_per_fold_ == 5


def test_hyperband_and_median_strings_run(data):
    X, y = data
    for pruner in ("median", "hyperband"):
        search = TransferSearchCV(
            TinyTransferNet(max_epochs=3),
            param_distributions={"lr": [1e-6, 0.5]},
            n_trials=4,
            cv=2,
            pruner=pruner,
            random_state=0,
        ).fit(X, y)
        assert len(search.study_.trials) == 4
    assert isinstance(search.study_.pruner, optuna.pruners.HyperbandPruner)


def test_refit_on_all_data_and_delegation(data):
    X, y = data
    search = TransferSearchCV(
        TinyTransferNet(max_epochs=2),
        param_distributions={"gamma": FloatDistribution(0.2, 1.0)},
        n_trials=2,
        cv=3,
        random_state=0,
    ).fit(X, y)
    assert search.best_estimator_.n_samples_fit_ == len(X)
    assert search.best_estimator_.net_.callbacks is not None
    names = [n for n, _ in search.best_estimator_.net_.callbacks_]
    assert "skrtl_pruning" not in names  # the refit runs without the pruning hook
    proba = search.predict_proba(X)
    assert proba.shape == (len(X), 2)
    np.testing.assert_array_equal(search.predict(X), search.best_estimator_.predict(X))
    assert 0.5 < search.score(X, y) <= 1.0
    np.testing.assert_array_equal(search.classes_, [0, 1])
    assert search.n_features_in_ == X.shape[1]

    no_refit = clone(search).set_params(refit=False).fit(X, y)
    assert not hasattr(no_refit, "best_estimator_")
    assert set(no_refit.best_params_) == {"gamma"}
    with pytest.raises(AttributeError, match="refit=False"):
        no_refit.predict(X)


def test_fresh_study_per_fit(data):
    X, y = data
    search = TransferSearchCV(
        LogisticRegression(), param_distributions={"C": [0.1, 1.0, 10.0]}, n_trials=3, cv=2
    )
    search.fit(X, y)
    first = search.study_
    search.fit(X, y)
    assert search.study_ is not first
    assert search.study_.study_name != first.study_name
    assert len(first.trials) == len(search.study_.trials) == 3


def test_nested_cross_validation_is_leak_free(data):
    X, y = data
    inner = TransferSearchCV(
        LogisticRegression(),
        param_distributions={"C": FloatDistribution(1e-2, 1e2, log=True)},
        n_trials=3,
        cv=2,
        scoring="roc_auc",
        random_state=0,
    )
    scores = cross_val_score(inner, X, y, cv=3, scoring="roc_auc")
    assert scores.shape == (3,) and np.all(scores > 0.7)
    out = cross_validate(inner, X, y, cv=3, return_estimator=True)
    studies = [est.study_ for est in out["estimator"]]
    assert len({id(s) for s in studies}) == 3
    assert all(len(s.trials) == 3 for s in studies)


def test_seeded_sampler_is_deterministic(data):
    X, y = data

    def run(seed):
        search = TransferSearchCV(
            TinyTransferNet(max_epochs=1),
            param_distributions=KG_SPACE,
            n_trials=4,
            cv=2,
            pruner=None,
            random_state=seed,
        ).fit(X, y)
        return [t.params for t in search.study_.trials], search.cv_results_["mean_test_score"]

    params_a, scores_a = run(3)
    params_b, scores_b = run(3)
    params_c, _ = run(4)
    assert params_a == params_b
    np.testing.assert_allclose(scores_a, scores_b)
    assert params_a != params_c


def test_clone_and_get_params():
    search = TransferSearchCV(
        TinyTransferNet(),
        param_distributions=KG_SPACE,
        n_trials=3,
        pruner=CVMedianPruner(n_startup_trials=1),
        random_state=0,
        storage="sqlite:///unused.db",
        study_name="s",
    )
    cloned = clone(search)
    assert cloned.get_params()["n_trials"] == 3
    assert cloned.get_params()["estimator__gamma"] == 1.0
    assert cloned.param_distributions == KG_SPACE
    assert cloned.pruner is not search.pruner
    assert cloned.pruner.n_startup_trials == 1
    assert not Path("unused.db").exists()


def test_callable_space_and_best_params_are_estimator_params(data):
    X, y = data

    def space(trial):
        # sampled name differs from the estimator parameter: best_params_ is the latter
        return {"lr": 10 ** trial.suggest_float("log10_lr", -2, 0)}

    search = TransferSearchCV(
        TinyTransferNet(max_epochs=1), param_distributions=space, n_trials=2, cv=2
    ).fit(X, y)
    assert set(search.best_params_) == {"lr"}
    assert search.best_params_["lr"] == pytest.approx(10 ** search.best_trial_.params["log10_lr"])
    assert search.best_estimator_.lr == search.best_params_["lr"]


def test_transfer_search_space_is_conditional():
    space = transfer_search_space(10, strategies=("finetune", "linear_probe", "scratch"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(12):
        trial = study.ask()
        params = space(trial)
        seen.append(params)
        study.tell(trial, 0.0)
    for params in seen:
        if params["strategy"] == "finetune":
            assert 0 <= params["freeze_depth"] <= 9 and 0.1 <= params["gamma"] <= 1.0
        else:
            assert "freeze_depth" not in params and "gamma" not in params
        assert 1e-4 <= params["lr"] <= 1e-2
    assert {p["strategy"] for p in seen} == {"finetune", "linear_probe", "scratch"}
    with pytest.raises(ValueError, match="n_layers"):
        transfer_search_space(0)


def test_invalid_spaces_and_settings(data):
    X, y = data
    with pytest.raises(ValueError, match="param_distributions"):
        TransferSearchCV(TinyTransferNet(), n_trials=1, cv=2).fit(X, y)  # no backbone
    with pytest.raises(ValueError, match="not a parameter"):
        TransferSearchCV(
            TinyTransferNet(), param_distributions={"depth": [1, 2]}, n_trials=1, cv=2
        ).fit(X, y)
    with pytest.raises(TypeError, match="optuna distribution"):
        TransferSearchCV(
            TinyTransferNet(), param_distributions={"gamma": 0.5}, n_trials=1, cv=2
        ).fit(X, y)
    with pytest.raises(ValueError, match="timeout"):
        TransferSearchCV(TinyTransferNet(), param_distributions=KG_SPACE, n_trials=None, cv=2).fit(
            X, y
        )


def test_error_score(data):
    X, y = data
    space = {"freeze_depth": [0, 7]}  # 7 > L: the stand-in fails (index error in groups)

    class Failing(TinyTransferNet):
        def fit(self, X, y):
            if self.freeze_depth > 3:
                raise RuntimeError("boom")
            return super().fit(X, y)

    search = TransferSearchCV(
        Failing(max_epochs=1), param_distributions=space, n_trials=4, cv=2, random_state=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(X, y)
    assert search.best_params_ == {"freeze_depth": 0}
    states = {t.params["freeze_depth"]: t.state.name for t in search.study_.trials}
    assert states.get(7, "FAIL") == "FAIL"
    with pytest.raises(RuntimeError, match="boom"):
        TransferSearchCV(
            Failing(max_epochs=1),
            param_distributions={"freeze_depth": [7]},
            n_trials=1,
            cv=2,
            error_score="raise",
        ).fit(X, y)


def test_plots_written(data, tmp_path):
    X, y = data
    search = TransferSearchCV(
        TinyTransferNet(max_epochs=1),
        param_distributions=KG_SPACE,
        n_trials=4,
        cv=2,
        pruner=None,
        random_state=0,
        plots_dir=tmp_path / "plots",
    ).fit(X, y)
    assert set(search.plot_paths_) == {
        "optimization_history",
        "param_importances",
        "contour_freeze_depth_gamma",
    }
    for path in search.plot_paths_.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = clone(search).set_params(n_trials=1, plots_dir=None).fit(X, y)
    with pytest.warns(UserWarning, match="importance"):
        paths = one.save_plots(tmp_path / "one")
    assert "param_importances" not in paths and "optimization_history" in paths


def test_sqlite_storage_resume(data, tmp_path):
    X, y = data
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    kwargs = dict(
        param_distributions={"C": FloatDistribution(1e-2, 1e2, log=True)},
        n_trials=2,
        cv=2,
        storage=url,
        study_name="resume",
    )
    TransferSearchCV(LogisticRegression(), **kwargs).fit(X, y)
    with pytest.raises(ValueError, match="load_if_exists=True"):
        TransferSearchCV(LogisticRegression(), **kwargs).fit(X, y)
    search = TransferSearchCV(LogisticRegression(), load_if_exists=True, **kwargs).fit(X, y)
    assert len(search.study_.trials) == 4
    assert len(search.cv_results_["mean_test_score"]) == 4


WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from optuna.distributions import FloatDistribution
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from skrtl._search import TransferSearchCV

    X, y = make_classification(n_samples=80, n_features=6, random_state=0)
    search = TransferSearchCV(
        LogisticRegression(),
        param_distributions={"C": FloatDistribution(1e-2, 1e2, log=True)},
        n_trials=2, cv=2, storage=sys.argv[1], study_name="shared", load_if_exists=True,
    ).fit(X, y)
    print(json.dumps({"n_trials": len(search.study_.trials)}))
    """
)


def test_two_processes_share_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["n_trials"] >= 2
    study = optuna.load_study(study_name="shared", storage=url)
    assert len(study.trials) == 4
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2


def test_real_finetune_classifier_default_space(tmp_path):
    finetune = pytest.importorskip("skrtl._finetune")
    rng = np.random.default_rng(0)
    n = 24
    y = np.repeat([0, 1], n // 2)
    X = rng.normal(0.4, 0.1, (n, 32, 32)).astype(np.float32)
    X[y == 1, 8:24, 8:24] += 0.4  # a bright square marks class 1
    est = finetune.FineTuneClassifier(
        input_size=32,
        n_estimators=1,
        max_epochs=2,
        batch_size=8,
        augment=False,
        early_stopping=False,
        validation_fraction=0.25,
        device="cpu",
        random_state=0,
    )
    search = TransferSearchCV(
        est, n_trials=2, cv=2, scoring="roc_auc", random_state=0, plots_dir=tmp_path
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(X, y)
    assert len(search.study_.trials) == 2
    assert "strategy" in search.best_params_ and "lr" in search.best_params_
    assert search.best_estimator_.n_layers_ == 10
    assert search.predict_proba(X).shape == (n, 2)
    # each trial reported per-epoch validation metrics (2 folds x 2 epochs)
    for t in search.study_.trials:
        assert sorted(t.intermediate_values) == [0, 1, 2, 3]
    assert "optimization_history" in search.plot_paths_


def test_cv_median_pruner_compares_within_the_fold():
    study = optuna.create_study(direction="maximize")
    curve = {0: 0.6, 1: 0.8, 2: 0.6, 3: 0.8}  # fold 0: steps 0-1, fold 1: steps 2-3
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(value=0.8, intermediate_values=curve))

    def running(values):
        return optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING, intermediate_values=values
        )

    # strong in fold 0, clearly worse in fold 1
    bad_fold1 = running({0: 0.6, 1: 0.9, 2: 0.3, 3: 0.4})
    pruner = CVMedianPruner(n_startup_trials=1, n_warmup_epochs=1, epochs_per_fold=2)
    assert pruner.prune(study, bad_fold1)
    # Optuna's MedianPruner compares the best value over all steps (0.9, from fold 0)
    assert not optuna.pruners.MedianPruner(n_startup_trials=1).prune(study, bad_fold1)
    # first epoch of a fold is warm-up
    assert not pruner.prune(study, running({0: 0.6, 1: 0.9, 2: 0.1}))
    # good in the current fold: kept
    assert not pruner.prune(study, running({0: 0.5, 1: 0.7, 2: 0.7, 3: 0.85}))
    with pytest.raises(ValueError, match="n_startup_trials"):
        CVMedianPruner(n_startup_trials=-1)


def test_threads_timeout_and_progress_bar(data, capsys):
    X, y = data
    space = {"C": FloatDistribution(1e-2, 1e2, log=True)}
    search = TransferSearchCV(
        LogisticRegression(), param_distributions=space, n_trials=4, cv=2, n_jobs=2, verbose=1
    ).fit(X, y)
    assert len(search.study_.trials) == 4
    assert "TransferSearchCV" in capsys.readouterr().err
    timed = TransferSearchCV(
        LogisticRegression(), param_distributions=space, n_trials=None, timeout=0.5, cv=2
    ).fit(X, y)
    assert len(timed.study_.trials) >= 1
