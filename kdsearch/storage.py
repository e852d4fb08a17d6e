"""Where the Optuna study lives: SQLite for one process, PostgreSQL (or any RDB URL) for many workers on many
machines, or a journal file on a shared file system (`journal:PATH`).

On an RDB server, workers send heartbeats: a trial whose worker died is marked FAIL by the next worker that looks,
its MLflow run is closed as KILLED, and Optuna's `RetryHeartbeatStaleTrialCallback` queues it again. On every
storage (SQLite and journal files have no heartbeats), a trial whose worker was a process on this host that no
longer exists is handled the same way when a session opens the study, and while workers wait for each other.
"""

from __future__ import annotations

import copy
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy
from mlflow import MlflowClient

from kdsearch import KdsearchError, first_line, tracking
from kdsearch.credentials import masked

JOURNAL = "journal:"
# user attributes a re-queued trial inherits
RETRY_KEEPS = ("baseline", "baseline_pair", "baseline_family", "seed", "warm_start")


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
        raise KdsearchError(f"--storage {masked(url)!r} is not a storage URL: use sqlite:///optuna.db, "
                            "postgresql+psycopg2://USER@HOST/DB or journal:PATH")
    heartbeat = {} if is_sqlite(url) else {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                                           "heartbeat_stale_trial_callback": on_stale}
    try:
        for attempt in range(3):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since 2.x
                    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **heartbeat)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # hosts that open a new database at the same moment race to create Optuna's tables (PostgreSQL:
                # duplicate key in pg_type); the loser finds them made when it opens again
                if attempt == 2:
                    raise
                time.sleep(1 + attempt)
    except Exception as e:  # sqlalchemy's many connection and URL errors
        raise KdsearchError(f"cannot open Optuna storage {masked(url)!r} ({masked(first_line(e))}): check the "
                            "--storage URL and that the database server is running and reachable") from None


def peek_study_attrs(url: str, study_name: str) -> dict:
    """The user attributes of an existing study, or {} when there is none (a SQLite or journal file that does not
    exist yet is not created)."""
    path = url[len("sqlite:///"):] if is_sqlite(url) else url[len(JOURNAL):] if url.startswith(JOURNAL) else None
    if path is not None and not (path and Path(path).is_file()):
        return {}
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(url)).user_attrs
    except KeyError:
        return {}


def stale_trial_callback(client: MlflowClient, reason: str = "worker lost: no heartbeat",
                         max_retry: int = 2) -> Callable:
    """Close a dead worker's trial run in MLflow, then queue the trial again with the same parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        tracking.close_lost_trial_runs(client, study.study_name, trial.number, reason)
        again = copy.deepcopy(trial)  # the retry keeps what defines the trial, not what the lost run recorded
        again.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in RETRY_KEEPS}
        retry(study, again)
    return callback


def worker_identity() -> dict:
    """This process as trials record it (two attribute writes): `worker` is host:pid; in `worker_process`, `start`
    tells a reused pid apart and `space` names the boot and the pid namespace, so machines or containers that share
    a host name do not judge each other's pids."""
    return {"worker": f"{socket.gethostname()}:{os.getpid()}",
            "worker_process": {"start": _start_time(os.getpid()) or "", "space": _pid_space()}}


def _pid_space() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str) -> bool:
    if Path("/proc/self/stat").exists():
        return _start_time(pid) is not None and (not start or _start_time(pid) == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def local_process_ended(worker: str, process: dict) -> bool:
    """Whether `worker` (host:pid, as `worker_identity` names it) was a process on this host that has ended. A
    process of another machine or container is never judged here: heartbeats, not pids, tell about it."""
    where, _, pid = worker.rpartition(":")
    if where != socket.gethostname() or not pid.isdigit() or process.get("space", _pid_space()) != _pid_space():
        return False
    return not _alive(int(pid), process.get("start", ""))


def fail_dead_local_trials(study: optuna.Study, client: MlflowClient) -> list[int]:
    """Fail the RUNNING trials whose worker was a process on this host that has ended (killed, crashed, a power
    cut), close their MLflow runs and queue them again; return their numbers."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        worker = t.user_attrs.get("worker", "")
        if not local_process_ended(worker, t.user_attrs.get("worker_process", {})):
            continue
        storage = study._storage  # Optuna's own fail_stale_trials does the same through the storage
        reason = f"worker {worker} died"
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process failed it first
        stale_trial_callback(client, reason)(study, storage.get_trial(t._trial_id))
        failed.append(t.number)
    return failed
