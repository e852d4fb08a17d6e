"""The refine stage: the search's winners trained again with a longer schedule, picked by validation accuracy,
recorded as nested MLflow runs, resumable, and used by the report and the export."""

import json
import subprocess
import sys

import optuna
import pandas as pd
import pytest
from helpers import export_matches_student, fast
from mlflow import MlflowClient

from kdsearch import execution, refine, tracking, trainer_pool
from kdsearch.cli import main
from kdsearch.config import RefineConfig
from kdsearch.refine import picked
from kdsearch.storage import worker_identity

COMPLETE = optuna.trial.TrialState.COMPLETE


def test_each_budget_picks_its_most_accurate_student_by_validation_not_test():
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for val, test, params in ((0.90, 0.99, 1_000), (0.95, 0.80, 1_500), (0.97, 0.97, 9_000)):
        study.add_trial(optuna.trial.create_trial(values=[val, params, 0.1], user_attrs={
            "params": params, "latency_ms": 0.1, "test_acc": test}))
    chosen = picked(study, RefineConfig(max_params=(2_000, 10_000, 500)))
    assert [(label, t.number) for label, t in chosen] == [("params <= 2,000", 1), ("params <= 10,000", 2)]
    assert [t.number for _, t in picked(study, RefineConfig())] == [0, 1, 2]  # no budget: the whole front
    two = picked(study, RefineConfig(max_params=(2_000,), top=2))
    assert [(label, t.number) for label, t in two] == [("params <= 2,000", 1), ("params <= 2,000", 0)]


def test_refining_the_top_two_trains_both_at_once_and_picks_by_refined_validation(searched, workdir, capsys,
                                                                                   monkeypatch):
    pooled, real = [], trainer_pool.TrainerPool.train
    monkeypatch.setattr(trainer_pool.TrainerPool, "train", lambda self, *a: pooled.append(self.size) or real(self, *a))
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    by_val = sorted(study.get_trials(states=[COMPLETE]), key=lambda t: t.values[0], reverse=True)[:2]
    capsys.readouterr()
    args = ["refine", *fast(), "--set", "refine.max_params=[1000000]", "--set", "refine.top=2",
            "--set", "refine.epochs=10"]
    assert main(args) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    records = {t.number: study.user_attrs[f"refined:{t.number}"]["best"] for t in by_val}
    assert len(records) == 2 and pooled == [2, 2]  # the two students, each in one of two processes
    assert "refining trial" in out and "epoch 1/10" in out  # a long schedule shows where it is
    best = max(by_val, key=lambda t: (records[t.number]["val_acc"], -t.user_attrs["params"]))
    assert (f"params <= 1,000,000: trial {best.number} ({best.user_attrs['params']:,} params), picked by refined "
            f"val_acc {records[best.number]['val_acc']:.4f} among 2; test_acc "
            f"{records[best.number]['test_acc']:.4f}") in out
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id],
                              "tags.`kdsearch.role` = 'refine'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert {r.info.run_id for r in runs} == {rec["run_id"] for rec in records.values()}


def refine_args(*extra: str) -> list[str]:
    return ["refine", *fast(), "--set", "refine.max_params=[1000000, 1]", "--set", "refine.epochs=2",
            "--set", "refine.seeds=2", "--set", "refine.augment='crop'", *extra]


@pytest.fixture
def searched(workdir):
    assert main(["run-study", *fast(), "--n-trials", "3"]) == 0
    return optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")


def test_refine_records_nested_runs_and_the_report_and_export_use_them(searched, workdir, capsys):
    capsys.readouterr()
    assert main(refine_args()) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    best = max(study.get_trials(states=[COMPLETE]), key=lambda t: (t.values[0], -t.user_attrs["params"]))
    assert f"refined trial {best.number} (params <= 1,000,000, {best.user_attrs['params']:,} params; 2 epochs, " \
           "augment crop, 2 seeds)" in out
    assert "refine params <= 1: no complete student fits it" in out
    record = study.user_attrs[f"refined:{best.number}"]
    assert len(record["seeds"]) == 2 and record["best"] == max(record["seeds"], key=lambda s: s["val_acc"])
    assert len({s["seed"] for s in record["seeds"]}) == 2
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    for s in record["seeds"]:
        run = client.get_run(s["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == study.user_attrs["mlflow_run_id"]
        assert run.data.metrics["test_acc"] == s["test_acc"] and run.data.params["augment"] == "crop"
        assert [m.step for m in client.get_metric_history(s["run_id"], "val_acc")][:2] == [1, 2]
    front = pd.read_csv(workdir / "reports" / "digits" / "pareto.csv")
    row = front[front["trial"] == best.number].iloc[0]
    assert row["refined_val_acc"] == pytest.approx(record["best"]["val_acc"]) and row["refined_epochs"] == 2
    assert "refined" in (workdir / "reports" / "digits" / "pareto.html").read_text()
    card = export_matches_student(workdir, "digits", best.number)
    assert card["mlflow_run_id"] == record["best"]["run_id"] and card["val_acc"] == record["best"]["val_acc"]
    assert card["refined"]["search_val_acc"] == best.values[0]


def test_an_interrupted_refine_resumes_with_the_seeds_still_to_train(searched, workdir, monkeypatch):
    trained = []
    real = execution.InProcess.train

    def train(self, model, settings, *args):
        trained.append(settings.seed)
        if len(trained) == 2:
            raise KeyboardInterrupt
        return real(self, model, settings, *args)

    monkeypatch.setattr(execution.InProcess, "train", train)
    assert main(refine_args()) == 130
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    (attr,) = [k for k in study.user_attrs if k.startswith("refined:")]
    assert len(study.user_attrs[attr]["seeds"]) == 1
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id],
                              "tags.`kdsearch.role` = 'refine'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    assert client.get_run(study.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert main(refine_args()) == 0  # the second seed only
    assert trained[2:] == [trained[1]]
    assert main(refine_args()) == 0  # already refined with these settings: nothing trains
    assert len(trained) == 3
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    assert len(study.user_attrs[attr]["seeds"]) == 2
    assert client.get_run(study.user_attrs["mlflow_run_id"]).info.status == "FINISHED"


def test_a_refine_run_whose_process_was_killed_is_closed_by_the_next_refine(searched, workdir, capsys):
    dead = json.loads(subprocess.run([sys.executable, "-c", "import json; from kdsearch.storage import "
                                      "worker_identity; print(json.dumps(worker_identity()))"],
                                     capture_output=True, text=True, check=True).stdout)  # a process that ended
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp_id = client.get_experiment_by_name("digits").experiment_id
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    ids = {}
    for name, who in (("dead", dead), ("alive", worker_identity())):
        tags = {refine.WORKER: who["worker"], refine.WORKER_PROCESS: json.dumps(who["worker_process"])}
        ids[name] = tracking.start_refine_run(client, exp_id, study.user_attrs["mlflow_run_id"], "digits",
                                              study.trials[0], 0, {}, tags)
    capsys.readouterr()
    assert main(refine_args("--set", "refine.seeds=1", "--set", "refine.epochs=1")) == 0
    assert "1 refine run left RUNNING by a process that ended: closed as KILLED" in capsys.readouterr().out
    run = client.get_run(ids["dead"])
    assert run.info.status == "KILLED" and run.data.tags["kdsearch.reason"] == f"its process {dead['worker']} ended"
    assert client.get_run(ids["alive"]).info.status == "RUNNING"  # a live process's run is its own


def test_run_study_refines_after_its_search_when_asked(workdir, capsys):
    args = ["run-study", *fast(), "--n-trials", "2", "--set", "refine.after_search=true", "--set", "refine.epochs=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "refined trial" in out and out.index("refined trial") < out.index("Pareto front of")
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    front = study.best_trials  # no budget: every student of the front
    assert all(f"refined:{t.number}" in study.user_attrs for t in front)
    assert json.loads(json.dumps(study.user_attrs["config"])).get("refine") is None  # not part of what resumes


def test_refine_of_a_study_that_does_not_exist_creates_nothing(workdir, capsys):
    assert main(["refine", *fast(), "--study-name", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "no study 'nosuch'" in err and "\n" not in err.strip()
    assert not (workdir / "mlflow.db").exists() and not (workdir / ".kdsearch-cache").exists()
