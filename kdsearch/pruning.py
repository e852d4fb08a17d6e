"""Stopping trials that cannot pay: hard limits before training, and per-epoch pruning during it.

Pareto mode has several objectives, where Optuna refuses `trial.report`. A student's parameters and latency are
known before it trains, so a trial whose cost is no better than that of a trial already on the front can only earn
its place with higher accuracy; `DominatedPruner` stops it when its accuracy after epoch k trails that trial's
accuracy after epoch k by more than a margin. Budget mode has one objective and uses Optuna's own pruners.
"""

from __future__ import annotations

import optuna

from kdsearch.config import SearchConfig


def limit_violations(cost: dict, search: SearchConfig) -> dict[str, float]:
    """Optuna constraint values (<= 0 is feasible), one per limit set in the study file."""
    values = {}
    if search.max_params:
        values["params_over_limit"] = cost["params"] - search.max_params
    if search.max_latency_ms:
        values["latency_ms_over_limit"] = cost["latency_ms"] - search.max_latency_ms
    return values


def limit_reason(cost: dict, search: SearchConfig) -> str | None:
    if search.max_params and cost["params"] > search.max_params:
        return f"rejected before training: {cost['params']:,} parameters above max_params {search.max_params:,}"
    if search.max_latency_ms and cost["latency_ms"] > search.max_latency_ms:
        return (f"rejected before training: latency {cost['latency_ms']:.3f} ms above max_latency_ms "
                f"{search.max_latency_ms}")
    return None


class Pruned(optuna.TrialPruned):
    """A pruned trial, with the reason (and the dominating trial, when there is one) for both records."""

    def __init__(self, reason: str, by_trial: int | None = None):
        super().__init__(reason)
        self.reason, self.by_trial = reason, by_trial


class NoPruner:
    def before_training(self, trial: optuna.Trial, cost: dict) -> None:
        pass

    def after_epoch(self, trial: optuna.Trial, epoch: int, val_acc: float) -> None:
        pass


class OptunaPruner(NoPruner):
    """Budget mode: report each epoch's val_acc to the study's own pruner (median, hyperband)."""

    def after_epoch(self, trial: optuna.Trial, epoch: int, val_acc: float) -> None:
        trial.report(val_acc, epoch)
        if trial.should_prune():
            raise Pruned(f"{type(trial.study.pruner).__name__}: val_acc {val_acc:.4f} after epoch {epoch}")


class DominatedPruner(NoPruner):
    """Pareto mode: stop a trial whose cost is dominated by a front trial's and whose accuracy trails it. Costs are
    compared exactly, as the front compares them: a trial smaller or faster than every rival is never stopped (one
    architecture has one latency per study, so a student is never a rival to itself through timing noise)."""

    def __init__(self, margin: float):
        self.margin = margin
        self.rivals: list[optuna.trial.FrozenTrial] = []

    def before_training(self, trial: optuna.Trial, cost: dict) -> None:
        self.rivals = [t for t in trial.study.best_trials if "val_acc_history" in t.user_attrs
                       and t.values[1] <= cost["params"] and t.values[2] <= cost["latency_ms"]]

    def after_epoch(self, trial: optuna.Trial, epoch: int, val_acc: float) -> None:
        for rival in self.rivals:
            history = rival.user_attrs["val_acc_history"]
            if len(history) >= epoch and history[epoch - 1] - val_acc > self.margin:
                raise Pruned(f"val_acc {val_acc:.4f} after epoch {epoch} trails trial {rival.number} "
                             f"({history[epoch - 1]:.4f}) by more than {self.margin}, which is no larger and no "
                             "slower", by_trial=rival.number)


def epoch_pruner(search: SearchConfig) -> NoPruner:
    kind = resolved_pruner(search)
    if kind == "dominated":
        return DominatedPruner(search.prune_margin)
    return OptunaPruner() if kind in ("median", "hyperband") else NoPruner()


def resolved_pruner(search: SearchConfig) -> str:
    if search.pruner != "auto":
        return search.pruner
    return "dominated" if search.mode == "pareto" else "median"


def study_pruner(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner stored with the study (budget mode); Pareto mode prunes in `DominatedPruner` instead."""
    kind = resolved_pruner(search)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()
