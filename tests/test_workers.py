"""Several workers on one study through PostgreSQL; one killed mid-trial; nothing lost, nothing doubled."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from helpers import fast
from mlflow import MlflowClient
from services import start_mlflow_server, start_postgres

TINY = [*fast(distill_epochs=12), "--set", "search.baselines=false", "--set", "search.heartbeat_interval=1",
        "--set", "search.grace_period=3"]
N_TRIALS = 8
State = optuna.trial.TrialState


@pytest.fixture(scope="module")
def postgres():
    url = os.environ.get("KDSEARCH_TEST_POSTGRES")
    if url:
        yield url
        return
    started = start_postgres()
    if started is None:
        pytest.skip("no PostgreSQL here: install Debian's postgresql package or set KDSEARCH_TEST_POSTGRES")
    url, stop = started
    yield url
    stop()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    url, stop = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield url
    stop()


def kill_a_worker_mid_trial(study_name: str, url: str, parent_pid: int, timeout: float = 120) -> int:
    """SIGKILL the worker of a trial that has been running for a while; return that trial's number."""
    storage = optuna.storages.RDBStorage(url)  # one engine for the whole poll: a new one each time leaks connections
    try:
        return _kill_when_running(study_name, storage, parent_pid, time.time() + timeout)
    finally:
        storage.engine.dispose()


def _kill_when_running(study_name: str, storage: optuna.storages.RDBStorage, parent_pid: int,
                       deadline: float) -> int:
    while time.time() < deadline:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            time.sleep(0.5)
            continue
        for t in study.get_trials(deepcopy=False, states=[State.RUNNING]):
            pid = int(t.user_attrs.get("worker", ":0").split(":")[-1])
            started = t.datetime_start.timestamp() if t.datetime_start else time.time()
            if pid and pid != parent_pid and time.time() - started > 0.5 and t.number > 0:
                os.kill(pid, signal.SIGKILL)
                return t.number
        time.sleep(0.2)
    raise AssertionError("no running trial to kill")


def test_three_workers_one_killed(tmp_path, postgres, tracking_server):
    cmd = [sys.executable, "-m", "kdsearch", "run-study", "--workers", "3", "--n-trials", str(N_TRIALS),
           "--study-name", "shared", "--storage", postgres, "--tracking-uri", tracking_server, *TINY]
    parent = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = kill_a_worker_mid_trial("shared", postgres, parent.pid)
    out, _ = parent.communicate(timeout=600)
    assert parent.returncode == 0, out

    study = optuna.load_study(study_name="shared", storage=postgres)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    complete = [t for t in study.trials if t.state == State.COMPLETE]
    assert len(complete) == N_TRIALS
    assert study.trials[killed].state == State.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert [t.state for t in retries] == [State.COMPLETE]
    assert len({t.user_attrs["worker"] for t in complete}) >= 2  # the work was shared

    client = MlflowClient(tracking_server)
    exp = client.get_experiment_by_name("shared")
    runs = client.search_runs([exp.experiment_id], "tags.`kdsearch.role` = 'trial'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.info.run_id for r in finished) == sorted(t.user_attrs["mlflow_run_id"] for t in complete)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    dead = [r for r in runs if r.data.tags["optuna.trial_number"] == str(killed)]
    assert [(r.info.status, r.data.tags["kdsearch.reason"]) for r in dead] == [("KILLED", "worker lost: no heartbeat")]
    (study_run,) = client.search_runs([exp.experiment_id], "tags.`kdsearch.role` = 'study'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {study_run.info.run_id}
    assert study_run.info.status == "FINISHED"
