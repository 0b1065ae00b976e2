"""Shared studies across processes: JournalStorage files, a real PostgreSQL server, callbacks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from skrtl import TransferSearchCV
from skrtl.utils import find_postgres_bin, throwaway_postgres

_WORKER = textwrap.dedent(
    """
    import sys
    from optuna.distributions import FloatDistribution
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from skrtl import TransferSearchCV
    X, y = make_classification(80, 5, random_state=0)
    TransferSearchCV(
        LogisticRegression(max_iter=500),
        param_distributions={"C": FloatDistribution(1e-3, 1e2, log=True)},
        n_trials=int(sys.argv[3]), cv=2, scoring="roc_auc", random_state=int(sys.argv[4]),
        storage=sys.argv[1], study_name=sys.argv[2], load_if_exists=True, pruner=None,
    ).fit(X, y)
    """
)


def _run_workers(storage: str, name: str, n_workers: int = 2, n_trials: int = 3):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, storage, name, str(n_trials), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(n_workers)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]


def _check_shared_study(storage_obj, name, n_workers, n_trials):
    study = optuna.load_study(study_name=name, storage=storage_obj)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == n_workers * n_trials
    assert len({t.user_attrs["worker"] for t in trials}) == n_workers  # distinct processes
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_journal_file_storage_shares_one_study_between_processes(tmp_path):
    path = tmp_path / "search.log"
    _run_workers(f"journal:///{path}", "journal-study")
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    _check_shared_study(storage, "journal-study", 2, 3)
    # a later fit of the same study sees every trial in cv_results_
    X, y = make_classification(80, 5, random_state=0)
    search = TransferSearchCV(
        LogisticRegression(max_iter=500),
        param_distributions={"C": FloatDistribution(1e-3, 1e2, log=True)},
        n_trials=1,
        cv=2,
        storage=str(path),  # a path ending in .log means a journal file
        study_name="journal-study",
        load_if_exists=True,
        pruner=None,
    ).fit(X, y)
    assert len(search.cv_results_["number"]) == 7


@pytest.mark.skipif(find_postgres_bin() is None, reason="PostgreSQL server binaries absent")
@pytest.mark.skipif(importlib.util.find_spec("psycopg2") is None, reason="psycopg2 absent")
def test_postgresql_server_shares_one_study_between_worker_processes():
    with throwaway_postgres() as url:
        _run_workers(url, "pg-study", n_workers=3, n_trials=2)
        _check_shared_study(url, "pg-study", 3, 2)


def test_optuna_callbacks_are_called_after_every_trial():
    seen = []
    X, y = make_classification(60, 4, random_state=0)
    TransferSearchCV(
        LogisticRegression(),
        param_distributions={"C": FloatDistribution(0.1, 10.0, log=True)},
        n_trials=3,
        cv=2,
        random_state=0,
        callbacks=[lambda study, trial: seen.append(trial.number)],
    ).fit(X, y)
    assert seen == [0, 1, 2]


@pytest.mark.skipif(
    importlib.util.find_spec("optuna_integration") is None
    or importlib.util.find_spec("mlflow") is None,
    reason="optuna-integration / mlflow absent",
)
def test_mlflow_callback_logs_every_trial(tmp_path, monkeypatch):
    from optuna_integration.mlflow import MLflowCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    X, y = make_classification(60, 4, random_state=0)
    TransferSearchCV(
        LogisticRegression(),
        param_distributions={"C": FloatDistribution(0.1, 10.0, log=True)},
        n_trials=2,
        cv=2,
        random_state=0,
        callbacks=[MLflowCallback(tracking_uri=uri, metric_name="cv_auc")],
    ).fit(X, y)
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 2 and all("cv_auc" in r.data.metrics for r in runs)
    assert np.isfinite([r.data.metrics["cv_auc"] for r in runs]).all()
