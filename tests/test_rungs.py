"""Multi-fidelity pruning for several objectives: rung decisions on hand-built trials, running ones included;
baselines never stopped; the reason recorded in Optuna and MLflow."""

import math

import numpy as np
import optuna
import pytest
from helpers import fast
from mlflow import MlflowClient

from kdsearch.cli import main
from kdsearch.pruning import Pruned, RungPruner, crowding_distance, rung_order

State = optuna.trial.TrialState


def test_rung_order_by_hand():
    # A (0.90, 1000, 0.2) and B (0.80, 100, 0.1) make the front; C (0.70, 1000, 0.2) and D (0.85, 1000, 0.3) are
    # dominated (by A; C by B too) but not by each other: rank 1. Two-member fronts: crowding infinite, so
    # val_acc decides: A before B, D before C.
    points = [(0, 0.90, 1000, 0.2), (1, 0.80, 100, 0.1), (2, 0.70, 1000, 0.2), (3, 0.85, 1000, 0.3)]
    order, ranks = rung_order(points)
    assert ranks == {0: 0, 1: 0, 2: 1, 3: 1} and order == [0, 1, 3, 2]


def test_crowding_distance_by_hand():
    # one objective, points 0, 1, 3, 4: extremes infinite; 1 gets (3 - 0) / 4, 3 gets (4 - 1) / 4
    d = crowding_distance(np.array([[0.0], [1.0], [3.0], [4.0]]))
    assert math.isinf(d[0]) and math.isinf(d[3]) and d[1] == pytest.approx(0.75) and d[2] == pytest.approx(0.75)


class FakeTrial:
    def __init__(self, study, number):
        self.study, self.number, self.user_attrs = study, number, {}

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value


def study_with(rung_values, states):
    """Trials that reached the rung at epoch 1: (val_acc, params, latency_ms), in the given states."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for (acc, params, latency), state in zip(rung_values, states):
        attrs = {"rung_1": acc, "params": params, "latency_ms": latency}
        values = [acc, params, latency] if state == State.COMPLETE else None
        study.add_trial(optuna.trial.create_trial(state=state, values=values, user_attrs=attrs))
    return study


def test_a_trial_outside_the_best_third_is_stopped_with_its_rung_rank_and_rivals():
    # three running and two complete trials at the rung, all with the newcomer's cost or less
    study = study_with([(0.9, 500, 0.1), (0.8, 500, 0.1), (0.7, 500, 0.1), (0.95, 400, 0.1), (0.6, 500, 0.1)],
                       [State.COMPLETE, State.RUNNING, State.RUNNING, State.COMPLETE, State.RUNNING])
    pruner = RungPruner(epochs=9, eta=3)
    assert pruner.rungs == [1, 3]
    trial = FakeTrial(study, 5)
    pruner.before_training(trial, {"params": 500, "latency_ms": 0.1})
    with pytest.raises(Pruned, match=r"rung at epoch 1: val_acc 0.8500 placed 3 of 6 .* only the best 2 go on"):
        pruner.after_epoch(trial, 1, 0.85)
    assert trial.user_attrs["rung_1"] == 0.85  # recorded first, for the workers that come next
    assert trial.user_attrs["prune_rung"] == {"epoch": 1, "rank": 2, "place": 3, "trials": 6, "kept": [3, 0]}


def test_a_trial_non_dominated_at_the_rung_goes_on_even_outside_the_best_third():
    study = study_with([(0.9, 500, 0.1), (0.8, 500, 0.1), (0.7, 500, 0.1), (0.95, 400, 0.1), (0.6, 500, 0.1)],
                       [State.COMPLETE] * 5)
    pruner = RungPruner(epochs=9, eta=3)
    trial = FakeTrial(study, 5)
    pruner.before_training(trial, {"params": 50, "latency_ms": 0.1})  # least accurate, but 8x smaller: an extreme
    pruner.after_epoch(trial, 1, 0.5)
    # three non-dominated at the rung (each smallest for its accuracy), only 2 = ceil(6 / 3) places: all go on
    study = study_with([(0.9, 500, 0.1), (0.8, 500, 0.1), (0.7, 500, 0.1), (0.95, 400, 0.1), (0.6, 300, 0.1)],
                       [State.COMPLETE] * 5)
    trial = FakeTrial(study, 5)
    pruner.before_training(trial, {"params": 50, "latency_ms": 0.1})
    pruner.after_epoch(trial, 1, 0.1)
    assert rung_order([(n, *v) for n, v in enumerate([(0.95, 400, 0.1), (0.6, 300, 0.1), (0.1, 50, 0.1)])])[1] == {
        0: 0, 1: 0, 2: 0}


def test_no_judgement_with_too_few_trials_at_the_rung_nor_between_rungs():
    study = study_with([(0.9, 500, 0.1)], [State.COMPLETE])
    pruner = RungPruner(epochs=9, eta=3)
    trial = FakeTrial(study, 1)
    pruner.before_training(trial, {"params": 900, "latency_ms": 0.2})
    pruner.after_epoch(trial, 1, 0.1)  # two at the rung, fewer than eta
    pruner.after_epoch(trial, 2, 0.1)  # not a rung
    assert "rung_2" not in trial.user_attrs


def test_rungs_pruning_in_a_study_never_stops_a_baseline_and_says_why(workdir):
    # one architecture for every trial (one params, one latency): only accuracy tells them apart at a rung, so
    # the rung keeps its best half and stops the rest, whatever the timing noise
    args = ["run-study", "--n-trials", "8", *fast(distill_epochs=4, pruner="rungs"), "--set", "search.rung_eta=2",
            "--set", "student.width=[1.0, 1.0]", "--set", "student.depth=[2, 2]"]
    assert main(args) == 0
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    baselines = [t for t in study.trials if "baseline" in t.user_attrs]
    assert len(baselines) == 2 and all(t.state == State.COMPLETE for t in baselines)
    pruned = [t for t in study.trials if t.state == State.PRUNED]
    assert pruned, "rungs at epochs 1 and 2 with eta 2 stopped nothing in 8 trials of one architecture"
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    for t in pruned:
        rung = t.user_attrs["prune_rung"]
        assert rung["epoch"] in (1, 2) and rung["place"] > len(rung["kept"]) and t.number not in rung["kept"]
        tags = client.get_run(t.user_attrs["mlflow_run_id"]).data.tags
        assert tags["optuna.trial_state"] == "PRUNED" and tags["kdsearch.reason"].startswith("rung at epoch")
