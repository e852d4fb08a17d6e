"""A 3-trial study on the digits, checked through Optuna's and MLflow's own APIs, then resumed."""

import json

import optuna
import pandas as pd
import pytest
from helpers import fast, study_in_new_folder
from mlflow import MlflowClient

import kdsearch.cli
import kdsearch.costs
import kdsearch.teacher
import kdsearch.trial
from kdsearch.cli import main
from kdsearch.config import StudyConfig
from kdsearch.scores import study_hypervolume

FAST = fast(distill_epochs=2, teacher_epochs=2)
TRIAL_METRICS = {"val_acc", "test_acc", "params", "flops", "latency_ms", "train_loss"}


def dominated(row, others) -> bool:
    return any(o.val_acc >= row.val_acc and o.params <= row.params and o.latency_ms <= row.latency_ms
               and (o.val_acc, o.params, o.latency_ms) != (row.val_acc, row.params, row.latency_ms)
               for o in others.itertuples())


@pytest.fixture(scope="module")
def first_study(tmp_path_factory):
    with study_in_new_folder(tmp_path_factory, "e2e", ["--n-trials", "1", *FAST]) as folder:
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
    assert client.get_experiment_by_name("digits").tags["mlflow.experimentKind"] == "custom_model_development"
    seconds = (teacher_run.info.end_time - teacher_run.info.start_time) / 1000
    assert seconds >= teacher_run.data.metrics["seconds"]  # it spans the training
    assert [m.step for m in client.get_metric_history(teacher_run.info.run_id, "train_loss")] == [1, 2]
    shared = {a.path for a in client.list_artifacts(teacher_run.info.run_id, "teacher")}
    assert shared == {"teacher/teacher.pt", "teacher/train_logits.pt", "teacher/meta.json"}  # for other hosts
    assert teacher_run.data.tags["kdsearch.teacher_state"] == "ready" and teacher_run.info.status == "FINISHED"
    summary = study_run.data.metrics
    assert (summary["complete_trials"], summary["pruned_trials"], summary["failed_trials"]) == (3, 0, 0)
    assert summary["front_size"] == len(study.best_trials) and summary["best_val_acc"] == max(
        t.values[0] for t in study.trials)
    # the front's (the figures are checked by hand in test_report_figures); not asserted > 0: on a busy host a
    # trial can time slower than this tiny teacher, and no student then beats it on both costs
    assert summary["hypervolume"] == pytest.approx(study_hypervolume(study)) and 0 <= summary["hypervolume"] < 1
    assert study.metric_names == ["val_acc", "params", "latency_ms"]  # optuna-dashboard's axis names
    report = {a.path for a in client.list_artifacts(study_run.info.run_id, "report")}
    assert report == {f"report/{name}" for name in
                      ("pareto.csv", "pareto.html", "pareto.png", "search.html", "search.png", "kd_gain.json",
                       "importance.json")}


def test_report_shows_the_kd_gain_of_the_baselines(first_study):
    gain = json.loads((first_study / "reports" / "digits" / "kd_gain.json").read_text())["convnet"]
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{first_study}/optuna.db")
    plain, kd = study.trials[0], study.trials[1]
    assert gain["trials"] == [0, 1] and gain["val_gain"] == pytest.approx(kd.values[0] - plain.values[0])
    assert {k: v for k, v in plain.params.items() if k != "alpha"} == {k: v for k, v in kd.params.items()
                                                                       if k != "alpha"}
    assert plain.user_attrs["seed"] == kd.user_attrs["seed"]  # the twins differ in alpha only
    client, trial_runs = runs(first_study, "trial")
    seeds = {r.data.params["alpha"]: r.data.params["seed"] for r in trial_runs if r.info.run_id in
             (plain.user_attrs["mlflow_run_id"], kd.user_attrs["mlflow_run_id"])}
    assert len(seeds) == 2 and len(set(seeds.values())) == 1
    assert plain.values[1:] == kd.values[1:]  # one architecture, measured once: same params, same latency
    assert gain["se_over"] == "images" and 0 < gain["val_gain_se"] < 0.1 and gain["test_gain_se"] > 0
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
    monkeypatch.setattr(kdsearch.teacher, "train_teacher", lambda *a, **k: pytest.fail("teacher retrained"))
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


def test_one_latency_per_architecture_whoever_measures_it(first_study):
    """Every trial of one architecture has the study's one latency, the resumed session's included."""
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{first_study}/optuna.db")
    from kdsearch.costs import cost_key
    from kdsearch.models import StudentSpec, build_student

    stored = {k: v for k, v in study.user_attrs.items() if k.startswith("cost:")}
    for t in study.trials:
        knobs = {"base_width": 8, "width": t.params["width"], "depth": t.params["depth"], "convs_per_stage": 1,
                 "channel_multiple": StudyConfig().student.channel_multiple}
        spec = StudentSpec("convnet", (1, 8, 8), 10, knobs)
        key = cost_key(spec, build_student(spec))
        assert t.values[2] == stored[key]["latency_ms"] and t.values[1] == stored[key]["params"]


def test_a_stored_latency_is_used_not_measured_again(tmp_path_factory):
    """What another worker or an earlier session stored for an architecture is what a trial of it reports."""
    from kdsearch.costs import cost_key
    from kdsearch.storage import open_storage

    folder = tmp_path_factory.mktemp("stored")
    args = ["--n-trials", "1", *FAST]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        measured, measure = [], kdsearch.costs.measure_cost  # the sampled trial's own architecture is measured
        mp.setattr(kdsearch.costs, "measure_cost", lambda model, *a: measured.append(repr(model)) or measure(model, *a))
        settled_keys = []
        settled = kdsearch.trial.settled_latency
        mp.setattr(kdsearch.trial, "settled_latency", lambda study, key, ms: settled_keys.append(key) or
                   settled(study, key, ms))
        from kdsearch.models import StudentSpec, build_student
        from kdsearch.study import open_study
        from kdsearch.study_file import load_study

        cfg = load_study(kdsearch.cli.find_study_file("digits"), [a for a in FAST if a != "--set"])
        study = open_study(cfg, "digits", open_storage(f"sqlite:///{folder}/optuna.db"))
        knobs = {"base_width": 8, "width": 1.0, "depth": 2, "convs_per_stage": 1,
                 "channel_multiple": StudyConfig().student.channel_multiple}
        baseline = StudentSpec("convnet", (1, 8, 8), 10, knobs)  # width 1.0 x base 8, depth (1 + 3) / 2
        stored = {"params": 1234, "flops": 1, "size_bytes": 1, "latency_ms": 0.5, "latency_iqr_ms": 0.0,
                  "latency": {"device": "cpu"}}
        study.set_user_attr(cost_key(baseline, build_student(baseline)), stored)
        assert main(["run-study", *args]) == 0
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{folder}/optuna.db")
    assert repr(build_student(baseline)) not in measured
    assert [t.values[1:] for t in study.trials[:2]] == [[1234, 0.5]] * 2  # the two baselines of that architecture
    assert settled_keys and all(key in study.user_attrs for key in settled_keys)  # read back at the end


def test_resume_with_another_study_file_is_refused(first_study, monkeypatch, capsys):
    monkeypatch.chdir(first_study)
    assert main(["run-study", "--n-trials", "1", *FAST, "--set", "distill.alpha=[0.0, 0.5]"]) == 2
    assert "exists with a different study file" in capsys.readouterr().err
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{first_study}/optuna.db")
    assert len(study.trials) == 5
