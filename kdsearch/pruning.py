"""Stopping trials that cannot pay: hard limits before training, and per-epoch pruning during it.

Pareto mode has several objectives, where Optuna refuses `trial.report`. A student's parameters and latency are
known before it trains, so a trial whose cost is no better than that of a trial already on the front can only earn
its place with higher accuracy; `DominatedPruner` stops it when its accuracy after epoch k trails that trial's
accuracy after epoch k by more than a margin. `RungPruner` is multi-fidelity instead: trials are compared at the
same epochs (rungs) by non-dominated rank and only the promising fraction goes on. Budget mode has one objective
and uses Optuna's own pruners.
"""

from __future__ import annotations

import math

import numpy as np
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


class RungPruner(NoPruner):
    """Pareto mode, multi-fidelity: asynchronous successive halving with several objectives (MO-ASHA, Schmucker et
    al. 2021). Rungs sit at epochs min_epochs * eta**k before the last epoch. A trial that reaches a rung records
    its val_acc there (a user attribute, so every worker sees it) and is ranked against every trial of the study
    that reached the same rung, finished or still running, on (val_acc at that epoch, params, latency_ms): by
    non-dominated sorting, ties within a front broken by NSGA-II's crowding distance (log10 params). It goes on if
    it is among the best ceil(n / eta), or non-dominated at the rung (stopping those made fronts worse on every
    seed measured: see BENCHMARKS); with fewer than eta trials at the rung there is nothing to judge."""

    def __init__(self, epochs: int, eta: int = 3, min_epochs: int = 1):
        self.eta, self.cost = eta, {}
        self.rungs = [min_epochs * eta**k for k in range(64) if min_epochs * eta**k < epochs]

    def before_training(self, trial: optuna.Trial, cost: dict) -> None:
        self.cost = cost

    def after_epoch(self, trial: optuna.Trial, epoch: int, val_acc: float) -> None:
        if epoch not in self.rungs:
            return
        key = f"rung_{epoch}"
        trial.set_user_attr(key, val_acc)
        peers = [(t.number, t.user_attrs[key], t.user_attrs["params"], t.user_attrs["latency_ms"])
                 for t in trial.study.get_trials(deepcopy=False) if key in t.user_attrs and t.number != trial.number]
        points = [*peers, (trial.number, val_acc, self.cost["params"], self.cost["latency_ms"])]
        if len(points) < self.eta:
            return
        order, ranks = rung_order(points)
        keep = max(math.ceil(len(points) / self.eta), sum(r == 0 for r in ranks.values()))
        place = order.index(trial.number)
        if place >= keep:
            kept = order[:keep]
            trial.set_user_attr("prune_rung", {"epoch": epoch, "rank": ranks[trial.number], "place": place + 1,
                                               "trials": len(points), "kept": kept})
            raise Pruned(f"rung at epoch {epoch}: val_acc {val_acc:.4f} placed {place + 1} of {len(points)} "
                         f"(non-dominated rank {ranks[trial.number]}); only the best {keep} go on: trials {kept}",
                         by_trial=kept[0])


def rung_order(points: list[tuple[int, float, int, float]]) -> tuple[list[int], dict[int, int]]:
    """Trial numbers best first, and each one's non-dominated rank (0: the front), for (number, val_acc, params,
    latency_ms) points: by rank, then by crowding distance within a rank (largest first), then by val_acc."""
    from optuna.study._multi_objective import _fast_non_domination_rank  # what NSGA-II sorts with; not public

    numbers = [p[0] for p in points]
    loss = np.array([[-p[1], math.log10(max(p[2], 1)), p[3]] for p in points], dtype=float)
    ranks = _fast_non_domination_rank(loss)
    crowding = np.zeros(len(points))
    for r in set(ranks.tolist()):
        members = np.flatnonzero(ranks == r)
        crowding[members] = crowding_distance(loss[members])
    order = sorted(range(len(points)), key=lambda i: (ranks[i], -crowding[i], loss[i][0]))
    return [numbers[i] for i in order], {numbers[i]: int(ranks[i]) for i in range(len(points))}


def crowding_distance(loss: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each point of one front: per objective, the gap between its neighbours over
    the objective's range, summed; the extremes of each objective get infinity."""
    n, distance = len(loss), np.zeros(len(loss))
    if n <= 2:
        return np.full(n, np.inf)
    for m in range(loss.shape[1]):
        order = np.argsort(loss[:, m], kind="stable")
        span = loss[order[-1], m] - loss[order[0], m]
        distance[order[[0, -1]]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (loss[order[2:], m] - loss[order[:-2], m]) / span
    return distance


def epoch_pruner(search: SearchConfig, epochs: int) -> NoPruner:
    kind = resolved_pruner(search)
    if kind == "dominated":
        return DominatedPruner(search.prune_margin)
    if kind == "rungs":
        return RungPruner(epochs, search.rung_eta, search.rung_min_epochs)
    return OptunaPruner() if kind in ("median", "hyperband") else NoPruner()


def resolved_pruner(search: SearchConfig) -> str:
    """`auto`: none in Pareto mode (on the default study the dominated-cost pruner saved about 5% of the time and
    cost front in every comparison: it stops trials after epoch 1, where a trial with another learning rate often
    trails and then overtakes; BENCHMARKS.md, issue 19), Optuna's median pruner in budget mode."""
    if search.pruner != "auto":
        return search.pruner
    return "none" if search.mode == "pareto" else "median"


def study_pruner(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner stored with the study (budget mode); Pareto mode prunes in `DominatedPruner` instead."""
    kind = resolved_pruner(search)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()
