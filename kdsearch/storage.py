"""Where the Optuna study lives: SQLite for one process, PostgreSQL (or any RDB URL) for many workers on many
machines, or a journal file on a shared file system (`journal:PATH`).

On an RDB server, workers send heartbeats: a trial whose worker died is marked FAIL by the next worker that looks,
its MLflow run is closed as KILLED, and Optuna's `RetryHeartbeatStaleTrialCallback` queues it again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import optuna
from mlflow import MlflowClient

from kdsearch import KdsearchError, first_line, tracking

JOURNAL = "journal:"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def open_storage(url: str, on_stale: Callable | None = None, heartbeat_interval: int = 30,
                 grace_period: int = 90) -> optuna.storages.BaseStorage:
    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend

        path = url[len(JOURNAL):]
        if not path:
            raise KdsearchError("--storage journal: needs a file, e.g. journal:/shared/studies.journal")
        try:
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        except OSError as e:
            raise KdsearchError(f"cannot open journal file {path} ({e}): pass a writable path") from None
    if "://" not in url:
        raise KdsearchError(f"--storage {url!r} is not a storage URL: use sqlite:///optuna.db, "
                            "postgresql+psycopg2://USER@HOST/DB or journal:PATH")
    heartbeat = {} if is_sqlite(url) else {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                                           "heartbeat_stale_trial_callback": on_stale}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.x
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **heartbeat)
    except Exception as e:  # sqlalchemy's many connection and URL errors
        raise KdsearchError(f"cannot open Optuna storage {url!r} ({first_line(e)}): check the --storage URL and "
                            "that the database server is running and reachable") from None


def stale_trial_callback(client: MlflowClient, max_retry: int = 2) -> Callable:
    """Close a dead worker's trial run in MLflow, then queue the trial again with the same parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        tracking.close_lost_trial_runs(client, study.study_name, trial.number, "worker lost: no heartbeat")
        retry(study, trial)
    return callback
