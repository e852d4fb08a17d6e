"""Several workers on one study (PostgreSQL, journal file): no student sampled twice, a killed worker never makes
the others wait, options reach every worker, and a target that cannot be reached ends with a clear message."""

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

from kdsearch.cli import main
from kdsearch.storage import open_storage

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
    """SIGKILL the worker of a trial that has been training for a while (its MLflow run started); return that
    trial's number."""
    storage = open_storage(url)  # one engine for the whole poll: a new one each time leaks connections
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            try:
                study = optuna.load_study(study_name=study_name, storage=storage)
            except KeyError:
                time.sleep(0.5)
                continue
            candidates = []
            for t in study.get_trials(deepcopy=False, states=[State.RUNNING]):
                pid = int(t.user_attrs.get("worker", ":0").split(":")[-1])
                started = t.datetime_start.timestamp() if t.datetime_start else time.time()
                training = "mlflow_run_id" in t.user_attrs
                if pid and pid != parent_pid and training and time.time() - started > 0.5 and t.number > 0:
                    candidates.append((time.time() - started, pid, t.number))
            if candidates:
                _, pid, number = min(candidates)
                if stopped_while_running(study_name, storage, pid, number):
                    os.kill(pid, signal.SIGKILL)
                    return number
            time.sleep(0.2)
    finally:
        if hasattr(storage, "engine"):
            storage.engine.dispose()
    raise AssertionError("no running trial to kill")


def stopped_while_running(study_name: str, storage, pid: int, number: int) -> bool:
    """Stop worker `pid` (SIGSTOP) and read trial `number` again, once a write in flight has had time to land:
    still RUNNING, it can no longer complete, and the worker stays stopped for the kill; otherwise it goes on. The
    list read before may be stale: a trial read as running completed before a kill that followed it at once."""
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.5)
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    if next(t for t in trials if t.number == number).state == State.RUNNING:
        return True
    os.kill(pid, signal.SIGCONT)
    return False


def sampled_students(study: optuna.Study) -> list[tuple]:
    """The parameter sets the sampler proposed: retries of a killed trial re-run its set on purpose, and a trial
    pruned as surplus sampled none."""
    return [tuple(sorted(t.params.items())) for t in study.trials if "failed_trial" not in t.system_attrs
            and t.params]


def run_workers_killing_one(tmp_path, storage: str, workers: int, extra: list[str]):
    cmd = [sys.executable, "-m", "kdsearch", "run-study", "--workers", str(workers), "--n-trials", str(N_TRIALS),
           "--study-name", "shared", "--storage", storage, *extra, *TINY]
    parent = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = kill_a_worker_mid_trial("shared", storage, parent.pid)
    out, _ = parent.communicate(timeout=600)
    assert parent.returncode == 0, out
    study = optuna.load_study(study_name="shared", storage=open_storage(storage))
    students = sampled_students(study)
    assert len(students) == len(set(students)), "two trials trained the same sampled student"
    complete = [t for t in study.trials if t.state == State.COMPLETE]
    assert len(complete) == N_TRIALS
    assert study.trials[killed].state == State.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert [t.state for t in retries] == [State.COMPLETE]
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 2  # the work was shared
    assert f"[{N_TRIALS}/{N_TRIALS} complete]" in out  # progress counts the study's trials, not one worker's
    return study, complete, killed, out


def test_three_workers_on_postgres_one_killed(tmp_path, postgres, tracking_server):
    study, complete, killed, _ = run_workers_killing_one(tmp_path, postgres, 3, ["--tracking-uri", tracking_server])
    assert len({t.user_attrs["worker"] for t in complete}) >= 2
    client = MlflowClient(tracking_server)
    exp = client.get_experiment_by_name("shared")
    runs = client.search_runs([exp.experiment_id], "tags.`kdsearch.role` = 'trial'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.info.run_id for r in finished) == sorted(t.user_attrs["mlflow_run_id"] for t in complete)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    dead = [r for r in runs if r.data.tags["optuna.trial_number"] == str(killed)]
    assert [r.info.status for r in dead] == ["KILLED"]
    died = f"worker {study.trials[killed].user_attrs['worker']} died"  # the parent may notice before the heartbeat
    assert dead[0].data.tags["kdsearch.reason"] in ("worker lost: no heartbeat", died)
    (study_run,) = client.search_runs([exp.experiment_id], "tags.`kdsearch.role` = 'study'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {study_run.info.run_id}
    assert study_run.info.status == "FINISHED"


def test_two_workers_on_a_journal_file_one_killed(tmp_path):
    # a journal file has no heartbeats: only the parent (and the sibling on this host) can tell the worker died
    study, _, killed, out = run_workers_killing_one(tmp_path, f"journal:{tmp_path}/study.journal", 2, [])
    assert study.trials[killed].user_attrs["fail_reason"].endswith("died")
    assert "queued again" in out


def test_workers_stop_with_a_message_when_no_trial_can_complete(tmp_path):
    cmd = [sys.executable, "-m", "kdsearch", "run-study", "--workers", "2", "--n-trials", "2", "--storage",
           f"journal:{tmp_path}/study.journal", *fast(), "--set", "search.baselines=false",
           "--set", "search.max_params=10"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "stopped: only 0 of 2 trials are complete after 10 more were tried" in done.stderr
    assert "above max_params 10" in done.stderr and "loosen search.max_params" in done.stderr


def test_workers_honour_the_timeout(tmp_path):
    cmd = [sys.executable, "-m", "kdsearch", "run-study", "--workers", "2", "--n-trials", "500", "--timeout", "3",
           "--storage", f"journal:{tmp_path}/study.journal", *fast(distill_epochs=3), "--set", "search.baselines=false"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "timeout: " in done.stdout and "of 500 trials are complete" in done.stdout


class Launched:
    """A worker process as `run_workers` starts it, recorded instead of run; it ends at once."""
    returncode = 0

    def __init__(self, argv, env):
        self.argv, self.env = argv, env
        LAUNCHED.append(self)

    def poll(self):
        return 0


LAUNCHED: list[Launched] = []


def test_every_option_reaches_the_workers(tmp_path, monkeypatch):
    """What the `--workers` parent really launches, run through the worker's own command line: the same study
    (every setting but the thread count), stores, device, cache and study name as the parent's session."""
    import dataclasses

    import kdsearch.search
    import kdsearch.session
    import kdsearch.workers

    seen = {}
    real_open_session = kdsearch.session.open_session

    def parent_session(cfg, **kwargs):
        seen["parent"] = (cfg, kwargs)
        return real_open_session(cfg, **kwargs)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(kdsearch.session, "open_session", parent_session)
    real_popen = subprocess.Popen

    def launch(argv, **kwargs):  # the workers are recorded; anything else (an ONNX check, say) runs
        if argv[1:3] == ["-m", "kdsearch"]:
            return Launched(argv, kwargs["env"])
        return real_popen(argv, **kwargs)
    monkeypatch.setattr(kdsearch.workers.subprocess, "Popen", launch)
    LAUNCHED.clear()
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["run-study", "digits", "--workers", "3", "--device", "cpu", "--timeout", "60", "--n-trials", "5",
            "--cache-dir", str(tmp_path / "cache"), "--storage", f"journal:{tmp_path}/j", "--tracking-uri", tracking,
            "--study-name", "s", *fast(distill_epochs=3)]
    assert main(argv) == 2  # the recorded workers ran no trial
    parent_cfg, parent = seen["parent"]
    assert len(LAUNCHED) == 3
    for worker in LAUNCHED:
        assert worker.argv[:3] == [sys.executable, "-m", "kdsearch"]
        assert "--storage" not in worker.argv and "--tracking-uri" not in worker.argv  # they come in its environment
        with monkeypatch.context() as mp:
            mp.setattr(kdsearch.search, "run_study", lambda cfg, **kw: seen.update(worker=(cfg, kw)))
            for name, value in worker.env.items():
                mp.setenv(name, value)
            assert main(worker.argv[3:]) == 0
            worker_cfg, kw = seen["worker"]
            assert kw["storage"] == parent["storage"] and os.environ["MLFLOW_TRACKING_URI"] == tracking
        assert kw["until_complete"] == 7 and kw["device"] == "cpu"  # --n-trials 5 and the baseline pair
        for key in ("study_name", "cache_dir"):
            assert kw[key] == parent[key], key
        assert worker_cfg.engine.threads == 1  # this machine's 2 cores split between 3 workers
        assert dataclasses.replace(worker_cfg, engine=parent_cfg.engine) == parent_cfg


def test_a_trial_asked_for_once_the_target_is_reached_elsewhere_is_pruned_before_it_samples(monkeypatch, capsys):
    """Two workers that saw 2 of 3 complete at the same moment both ask: the later trial (number 3, behind trial
    2 running) is surplus, and its progress line shows no parameters (it sampled none). A trial behind a running
    one that outlived its patience, an enqueued one and a killed trial's retry run."""
    from types import SimpleNamespace

    import kdsearch.scheduling as scheduling

    monkeypatch.setattr(scheduling, "objective", lambda ctx, trial: "trained")
    ctx = SimpleNamespace(cfg=SimpleNamespace(search=SimpleNamespace(grace_period=60.0)))
    study = optuna.create_study()
    for value in (0.5, 0.6):
        study.add_trial(optuna.trial.create_trial(value=value))
    study.ask()  # trial 2: another worker's, running
    late = study.ask()
    with pytest.raises(optuna.TrialPruned, match="surplus: 3 trials before it already complete or run toward the 3"):
        scheduling.surplus_checked(ctx, late, 3)
    assert study.trials[3].user_attrs["prune_reason"].startswith("surplus") and not study.trials[3].params
    study.tell(late, state=State.PRUNED)
    late = study.ask()
    assert scheduling.surplus_checked(ctx, late, 5) == "trained"
    ctx.cfg.search.grace_period = 0.0  # the running trial has outlived 3x the slowest (instant) trial: not waited for
    assert scheduling.surplus_checked(ctx, late, 3) == "trained"
    ctx.cfg.search.grace_period = 60.0
    study.enqueue_trial({"x": 1.0})
    assert scheduling.surplus_checked(ctx, study.ask(), 3) == "trained"
    study.add_trial(optuna.trial.create_trial(state=State.WAITING, system_attrs={"failed_trial": 2}))  # a retry
    assert scheduling.surplus_checked(ctx, study.ask(), 3) == "trained"
    from kdsearch.progress import print_progress

    print_progress(3, time.time(), complete_only=True)(study, study.trials[3])
    line = capsys.readouterr().out
    assert line.startswith("trial   3 [2/3 complete] | PRUNED: surplus: 3 trials before it") and "alpha" not in line
