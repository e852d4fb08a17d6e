"""A 3-trial study on the digits, checked through Optuna's and MLflow's own APIs, then resumed."""

import json

import optuna
import pandas as pd
import pytest
from helpers import fast, study_in_new_folder
from mlflow import MlflowClient

import kdsearch.teacher
from kdsearch.cli import main

FAST = fast(distill_epochs=2, teacher_epochs=2)
TRIAL_METRICS = {"val_acc", "test_acc", "params", "flops", "latency_ms", "train_loss"}


def dominated(row, others) -> bool:
    return any(o.val_acc >= row.val_acc and o.params <= row.params and o.latency_ms <= row.latency_ms
               and (o.val_acc, o.params, o.latency_ms) != (row.val_acc, row.params, row.latency_ms)
               for o in others.itertuples())


@pytest.fixture(scope="module")
def first_study(tmp_path_factory):
    with study_in_new_folder(tmp_path_factory, "e2e", ["--n-trials", "3", *FAST]) as folder:
        yield folder


def runs(folder, role: str):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    exp = client.get_experiment_by_name("digits")
    return client, client.search_runs([exp.experiment_id], f"tags.`kdsearch.role` = '{role}'")


def test_three_complete_trials_in_optuna(first_study):
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{first_study}/optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert all(0 <= t.values[0] <= 1 and t.values[1] >= 1 and t.values[2] > 0 for t in study.trials)
    assert all("test_acc" in t.user_attrs and "mlflow_run_id" in t.user_attrs for t in study.trials)


def test_mlflow_has_study_run_nested_trials_and_teacher(first_study):
    client, (study_run,) = runs(first_study, "study")
    _, trial_runs = runs(first_study, "trial")
    _, (teacher_run,) = runs(first_study, "teacher")
    assert study_run.info.status == "FINISHED"
    assert len(trial_runs) == 3
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{first_study}/optuna.db")
    by_id = {t.user_attrs["mlflow_run_id"]: t for t in study.trials}
    for run in trial_runs:
        trial = by_id[run.info.run_id]
        assert run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.tags["optuna.trial_state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert TRIAL_METRICS <= set(run.data.metrics)
        assert run.data.metrics["val_acc"] == pytest.approx(trial.values[0])
        assert run.data.metrics["params"] == trial.values[1]
        assert {"width", "depth", "temperature", "alpha", "lr"} <= set(run.data.params)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["student.pt"]
    assert {"val_acc", "test_acc", "params", "latency_ms"} <= set(teacher_run.data.metrics)
    config = client.download_artifacts(study_run.info.run_id, "config.json", str(first_study / "dl"))
    logged = json.loads(open(config).read())
    assert logged["distill"]["epochs"] == 2 and logged["kdsearch_version"] and "git_commit" in logged
    report = {a.path for a in client.list_artifacts(study_run.info.run_id, "report")}
    assert report == {f"report/{name}" for name in
                      ("pareto.csv", "pareto.html", "pareto.png", "search.html", "kd_gain.json")}


def test_report_shows_the_kd_gain_of_the_baselines(first_study):
    gain = json.loads((first_study / "reports" / "digits" / "kd_gain.json").read_text())
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{first_study}/optuna.db")
    plain, kd = study.trials[0], study.trials[1]
    assert gain["trials"] == [0, 1] and gain["val_gain"] == pytest.approx(kd.values[0] - plain.values[0])
    assert plain.params["width"] == kd.params["width"] and plain.params["depth"] == kd.params["depth"]
    assert plain.values[1:] == kd.values[1:]  # one architecture, measured once: same params, same latency
    page = (first_study / "reports" / "digits" / "search.html").read_text()
    assert "Hypervolume" in page and "parcoords" in page


def test_report_csv_holds_exactly_the_non_dominated_trials(first_study):
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{first_study}/optuna.db")
    everything = pd.DataFrame([{"trial": t.number, "val_acc": t.values[0], "params": t.values[1],
                                "latency_ms": t.values[2]} for t in study.trials])
    expected = {r.trial for r in everything.itertuples() if not dominated(r, everything)}
    csv = pd.read_csv(first_study / "reports" / "digits" / "pareto.csv")
    assert set(csv["trial"]) == expected and len(csv) == len(expected)


def test_resume_adds_trials_without_retraining_or_duplicating(first_study, monkeypatch):
    monkeypatch.chdir(first_study)
    monkeypatch.setattr(kdsearch.teacher, "train", lambda *a, **k: pytest.fail("teacher retrained"))
    # how long a latency is timed may change on resume (what is measured may not: see the next test)
    assert main(["run-study", "--n-trials", "2", *FAST, "--set", "latency.min_run_time=0.03"]) == 0
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{first_study}/optuna.db")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({tuple(t.params.values()) for t in study.trials}) == 5  # resumed sampler does not repeat
    _, study_runs = runs(first_study, "study")
    _, trial_runs = runs(first_study, "trial")
    _, teacher_runs = runs(first_study, "teacher")
    assert (len(study_runs), len(trial_runs), len(teacher_runs)) == (1, 5, 1)
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {study_runs[0].info.run_id}


def test_resume_with_another_study_file_is_refused(first_study, monkeypatch, capsys):
    monkeypatch.chdir(first_study)
    assert main(["run-study", "--n-trials", "1", *FAST, "--set", "distill.alpha=[0.0, 0.5]"]) == 2
    assert "exists with a different study file" in capsys.readouterr().err
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{first_study}/optuna.db")
    assert len(study.trials) == 5
