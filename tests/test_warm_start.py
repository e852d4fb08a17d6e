"""A new study may start from an earlier study's front; parameter importance per objective in the report."""

import json
import math

import optuna
from helpers import fast
from mlflow import MlflowClient

from kdsearch.cli import main

FAST = fast(distill_epochs=2)


def load(folder, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/optuna.db")


def test_warm_start_enqueues_exactly_the_earlier_front(workdir, capsys):
    """The earlier front comes on top of --n-trials, like the baselines: counted in, a front of 2 or more left
    the baselines waiting (and the report without its KD gain)."""
    assert main(["run-study", "--n-trials", "6", "--study-name", "first", *FAST]) == 0
    front = [t for t in load(workdir, "first").best_trials if "baseline" not in t.user_attrs]  # own baselines come
    assert len(front) >= 2
    assert main(["run-study", "--n-trials", "1", "--study-name", "second", "--warm-start-from", "first",
                 *FAST, "--set", "distill.epochs=3"]) == 0
    second = load(workdir, "second")
    started = second.trials[:len(front)]
    assert [t.params for t in started] == [t.params for t in front]
    assert [t.user_attrs["warm_start"] for t in started] == [f"first#{t.number}" for t in front]
    kinds = [t.user_attrs.get("baseline", "warm" if "warm_start" in t.user_attrs else "sampled") for t in second.trials]
    assert sorted(kinds) == sorted(["warm"] * len(front) + ["no-kd", "kd", "sampled"])
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in second.trials)  # none left waiting
    said = capsys.readouterr().out
    assert f"warm start from 'first': enqueued its front's trials {[t.number for t in front]}" in said
    assert f"running 1 more after its 2 baselines and {len(front)} warm starts" in said
    assert "KD gain of the convnet" in said


def test_warm_start_from_a_missing_study_is_a_one_line_error(workdir, capsys):
    assert main(["run-study", "--n-trials", "1", "--warm-start-from", "nosuch", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "--warm-start-from nosuch: no study of that name" in err and "\n" not in err
    assert optuna.get_all_study_names(f"sqlite:///{workdir}/optuna.db") == []  # no study made


def test_importance_per_objective_in_the_report_and_the_study_run(workdir):
    assert main(["run-study", "--n-trials", "6", *FAST]) == 0
    importance = json.loads((workdir / "reports" / "digits" / "importance.json").read_text())
    assert set(importance) == {"val_acc", "params", "latency_ms"}
    for objective, shares in importance.items():
        knobs = {"width", "depth"} | ({"temperature", "alpha", "lr"} if objective == "val_acc" else set())
        assert set(shares) <= knobs and abs(sum(shares.values()) - 1) < 1e-6  # T cannot change a student's size
    page = (workdir / "reports" / "digits" / "pareto.html").read_text()
    assert "What drives each objective" in page
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    run = client.get_run(load(workdir, "digits").user_attrs["mlflow_run_id"])
    assert run.data.metrics["importance.params.width"] == importance["params"]["width"]
    client.log_metric(run.info.run_id, "importance.params.lr", 0.4)  # as reports before T was left out of size
    assert main(["report"]) == 0
    assert math.isnan(client.get_run(run.info.run_id).data.metrics["importance.params.lr"])  # not left standing
    assert (workdir / "reports" / "digits" / "search.png").is_file()
