"""Budget mode hands each epoch's val_acc to the study's own Optuna pruner: the median pruner and Hyperband as
kdsearch configures them, on hand-built trials (no training)."""

import optuna
import pytest

from kdsearch.config import SearchConfig
from kdsearch.pruning import OptunaPruner, Pruned, epoch_pruner, study_pruner

EPOCHS = 9


def budget_study(pruner: str, name: str = "budget") -> optuna.Study:
    search = SearchConfig(mode="budget", pruner=pruner)
    assert isinstance(epoch_pruner(search, EPOCHS), OptunaPruner)
    return optuna.create_study(direction="maximize", pruner=study_pruner(search, EPOCHS), study_name=name,
                               sampler=optuna.samplers.RandomSampler(0))


def run(study: optuna.Study, curve: list[float]) -> str:
    """One trial reporting `curve` epoch by epoch: 'complete', or the reason it was stopped."""
    trial = study.ask()
    try:
        for epoch, acc in enumerate(curve, 1):
            OptunaPruner().after_epoch(trial, epoch, acc)
    except Pruned as stopped:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return str(stopped)
    study.tell(trial, curve[-1])
    return "complete"


def test_the_median_pruner_waits_for_five_trials_then_stops_a_trial_below_the_median():
    study = budget_study("median")
    good = [0.5 + 0.05 * e for e in range(1, EPOCHS + 1)]
    assert all(run(study, good) == "complete" for _ in range(4))
    assert run(study, [0.1] * EPOCHS) == "complete"  # 4 trials done: still starting up (n_startup_trials=5)
    assert run(study, [0.55, *good[1:]]) == "complete"  # at the median of epoch 1 (0.55): goes on
    assert run(study, [0.2] * EPOCHS) == "MedianPruner: val_acc 0.2000 after epoch 1"  # below it: stopped
    # Optuna judges a trial by its best value so far: 0.9 after epoch 1 stays above the median (0.6) at epoch 2
    assert run(study, [0.9, 0.2, 0.2]) == "complete"


def test_hyperband_stops_the_worst_trial_at_a_rung():
    study = budget_study("hyperband", "hb")
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    # twelve improving trials, each better than the last: none is stopped
    improving = [[0.5 + 0.04 * i + 0.01 * e for e in range(1, EPOCHS + 1)] for i in range(12)]
    assert [run(study, curve) for curve in improving] == ["complete"] * 12
    # the worst student of all is stopped at its bracket's rung (epochs 1, 3, 9 for min_resource 1, eta 3): epoch 3
    assert run(study, [0.0] * EPOCHS) == "HyperbandPruner: val_acc 0.0000 after epoch 3"


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_epoch_k_is_reported_as_step_k(pruner):
    study = budget_study(pruner)
    run(study, [0.9] * EPOCHS)
    (trial,) = study.trials
    assert trial.intermediate_values == {e: 0.9 for e in range(1, EPOCHS + 1)}
