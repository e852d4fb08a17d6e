"""A failed or interrupted trial leaves the study and the MLflow runs consistent and resumable."""

import json

import optuna
import torch
from helpers import fast
from mlflow import MlflowClient

import kdsearch.execution
from kdsearch.cli import main

FAST = fast()
IN_PROCESS = [*FAST, "--set", "engine.parallel_trials=1"]  # for the tests that patch `train` in this process
State = optuna.trial.TrialState


def failing_train(fail_on: set[int], exc: BaseException):
    real = kdsearch.execution.fit
    calls = {"n": 0}

    def train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in fail_on:
            raise exc
        return real(*args, **kwargs)
    return train


def trial_runs(folder):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    exp = client.get_experiment_by_name("digits")
    return {r.data.tags["optuna.trial_number"]: r for r in
            client.search_runs([exp.experiment_id], "tags.`kdsearch.role` = 'trial'")}


def load(folder):
    return optuna.load_study(study_name="digits", storage=f"sqlite:///{folder}/optuna.db")


def test_a_failing_trial_is_recorded_on_both_sides_and_the_study_goes_on(workdir, monkeypatch):
    monkeypatch.setattr(kdsearch.execution, "fit", failing_train({2}, RuntimeError("boom")))
    assert main(["run-study", "--n-trials", "1", *IN_PROCESS]) == 0  # the two baselines, then one trial
    study = load(workdir)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.FAIL, State.COMPLETE]
    assert study.trials[1].user_attrs["fail_reason"] == "RuntimeError: boom"
    runs = trial_runs(workdir)
    assert runs["1"].info.status == "FAILED" and runs["1"].data.tags["optuna.trial_state"] == "FAIL"
    assert runs["1"].data.tags["kdsearch.reason"] == "RuntimeError: boom"
    assert runs["0"].info.status == runs["2"].info.status == "FINISHED"


def test_the_same_failure_every_time_stops_the_study(workdir, monkeypatch, capsys):
    monkeypatch.setattr(kdsearch.execution, "fit", failing_train(set(range(1, 10)), ValueError("bad lr")))
    assert main(["run-study", "--n-trials", "6", *IN_PROCESS]) == 2
    err = capsys.readouterr().err
    assert "the last trials all failed with 'ValueError: bad lr'" in err
    assert [t.state for t in load(workdir).trials] == [State.FAIL] * 3


def test_ctrl_c_keeps_finished_trials_and_resumes(workdir, monkeypatch, capsys):
    real_train = kdsearch.execution.fit
    monkeypatch.setattr(kdsearch.execution, "fit", failing_train({2}, KeyboardInterrupt()))
    assert main(["run-study", "--n-trials", "3", *IN_PROCESS]) == 130
    assert "Run the same command again to resume" in capsys.readouterr().err
    assert [t.state for t in load(workdir).trials] == [State.COMPLETE, State.FAIL]
    runs = trial_runs(workdir)
    assert runs["1"].info.status == "KILLED" and runs["0"].info.status == "FINISHED"
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    study_run_id = load(workdir).user_attrs["mlflow_run_id"]
    assert client.get_run(study_run_id).info.status == "KILLED"

    monkeypatch.setattr(kdsearch.execution, "fit", real_train)
    assert main(["run-study", "--n-trials", "2", *IN_PROCESS]) == 0
    out = capsys.readouterr().out
    assert "baseline trial 1 (kd) was interrupted: queued again" in out and "running 2 more after its 1 baseline" in out
    study = load(workdir)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.FAIL] + [State.COMPLETE] * 3
    again = study.trials[2]  # the interrupted baseline, as it was queued: the KD gain has its pair
    assert again.params == study.trials[1].params and again.user_attrs["baseline"] == "kd"
    assert again.user_attrs["seed"] == study.trials[0].user_attrs["seed"]
    assert json.loads((workdir / "reports" / "digits" / "kd_gain.json").read_text())
    assert client.get_run(study_run_id).info.status == "FINISHED"
    assert len(trial_runs(workdir)) == 5
    assert main(["run-study", "--n-trials", "1", *IN_PROCESS]) == 0  # replaced once: not queued again
    assert "queued again" not in capsys.readouterr().out and len(load(workdir).trials) == 6


def test_a_diverging_loss_stops_the_trial_with_the_reason(workdir):
    args = ["run-study", "--n-trials", "1", *FAST, "--set", "distill.lr=[1e6, 1e6]", "--set", "search.baselines=false"]
    assert main(args) == 0
    trial = load(workdir).trials[0]
    assert trial.state == State.FAIL and "training loss became nan" in trial.user_attrs["fail_reason"]


def test_out_of_memory_fails_only_its_trial(workdir, monkeypatch):
    oom = torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(kdsearch.execution, "fit", failing_train({1}, oom))
    assert main(["run-study", "--n-trials", "1", *IN_PROCESS]) == 0  # the two baselines, then one trial
    study = load(workdir)
    assert [t.state for t in study.trials] == [State.FAIL, State.COMPLETE, State.COMPLETE]
    assert study.trials[0].user_attrs["fail_reason"] == "OutOfMemoryError: CUDA out of memory"


def test_journal_file_storage_runs_and_resumes(workdir, capsys):
    journal = f"journal:{workdir / 'studies.journal'}"
    assert main(["run-study", "--n-trials", "1", "--storage", journal, *FAST]) == 0  # two baselines on top
    assert "running 1 more after its 2 baselines" in capsys.readouterr().out
    assert main(["run-study", "--n-trials", "1", "--storage", journal, *FAST]) == 0
    assert "trial   3 [1/1, 4 in the study]" in capsys.readouterr().out  # this run's count and the study's
    from kdsearch.storage import open_storage

    study = optuna.load_study(study_name="digits", storage=open_storage(journal))
    assert [t.state for t in study.trials] == [State.COMPLETE] * 4
    assert main(["report", "--storage", journal]) == 0


def test_a_process_killed_on_sqlite_leaves_nothing_running_once_resumed(workdir):
    """kill -9 (or a power cut) mid-trial: the next session on this host fails that trial, closes its MLflow run
    and runs it again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    slow = fast(distill_epochs=30)
    cmd = [sys.executable, "-m", "kdsearch", "run-study", "--n-trials", "3", *slow]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            running = load(workdir).get_trials(states=[State.RUNNING])
        except Exception:  # the study is not made yet
            continue
        if running and all("mlflow_run_id" in t.user_attrs for t in running):  # each past its latency timing
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = load(workdir).get_trials(states=[State.RUNNING])  # one per training process
    # a trial the kill caught in its latency timing (the other thread may have started one) has no run yet
    tracked = [t for t in killed if "mlflow_run_id" in t.user_attrs]
    assert tracked and all(trial_runs(workdir)[str(t.number)].info.status == "RUNNING" for t in tracked)

    assert main(["run-study", "--n-trials", "2", *slow]) == 0  # the retries (and the other baseline, if not run)
    study = load(workdir)
    for lost in killed:
        assert study.trials[lost.number].state == State.FAIL
        assert study.trials[lost.number].user_attrs["fail_reason"] == f"worker {lost.user_attrs['worker']} died"
        if lost in tracked:
            run = trial_runs(workdir)[str(lost.number)]
            assert run.info.status == "KILLED" and run.data.tags["kdsearch.reason"].endswith("died")
        retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == lost.number]
        assert [t.state for t in retry] == [State.COMPLETE] and retry[0].params == lost.params
        assert "fail_reason" not in retry[0].user_attrs
        kept = ("baseline", "baseline_family")  # a retried baseline counts in its own family's KD gain
        assert [retry[0].user_attrs.get(k) for k in kept] == [lost.user_attrs.get(k) for k in kept]
    assert not study.get_trials(states=[State.RUNNING])


def test_a_reader_that_goes_away_stops_the_study_quietly_and_closes_its_runs(workdir):
    """`run-study | head -3`: once the pipe closes, the study stops without a traceback, its finished trials are
    kept, no trial or MLflow run is left RUNNING, and the same command resumes it."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "kdsearch", "run-study", "--n-trials", "8", *FAST]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the teacher's and the study's lines, then the first trial's
        if line.startswith("trial "):
            break
    proc.stdout.close()  # as `head` does
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err, err

    study = load(workdir)
    assert not study.get_trials(states=[State.RUNNING]) and study.get_trials(states=[State.COMPLETE])
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("digits")
    assert all(r.info.status != "RUNNING" for r in client.search_runs([exp.experiment_id]))
    assert main(["run-study", "--n-trials", "1", *FAST]) == 0
