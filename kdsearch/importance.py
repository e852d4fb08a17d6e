"""What drives each objective: fANOVA parameter importances over a study's complete trials, per objective and,
where student families mix, per family; and the line the terminal prints of them.

Numbers and text only: the bar chart is `charts.importance_figure`, importance.json and the MLflow metrics are
written by `report`.
"""

from __future__ import annotations

import numpy as np
import optuna

from kdsearch.students import is_distillation_param

COMPLETE = optuna.trial.TrialState.COMPLETE


def param_importances(study: optuna.Study) -> dict[str, dict[str, float]]:
    """For each objective separately, how much each sampled knob explains of it over the complete trials
    (Optuna's fANOVA evaluator, seeded): {objective: {knob: share}}, shares summing to 1. The size and latency
    objectives are weighed over the architecture's knobs only: T, alpha and lr cannot change them, and with a few
    trials fANOVA credited them by chance.

    Where families mix, fANOVA over all trials could weigh only the knobs every trial has. So `arch` is the share of
    the objective's variance that lies between the families, and each family's trials get their own fANOVA shares
    of the rest (summing to 1 per family), its knobs named `family.knob`. A family (or study) with fewer than
    three complete trials is left out."""
    by_family = _complete_by_family(study)
    if by_family is None:
        return _importances(study, study.get_trials(deepcopy=False, states=[COMPLETE]))
    out: dict[str, dict[str, float]] = {}
    for i, objective in enumerate(_objective_names(study)):
        if len(by_family) > 1:
            out[objective] = {"arch": _between_share([[t.values[i] for t in ts] for ts in by_family.values()])}
    for family, trials in sorted(by_family.items()):
        for objective, shares in _importances(study, trials).items():
            out.setdefault(objective, {}).update(
                {k if k.startswith(f"{family}.") else f"{family}.{k}": v for k, v in shares.items()})
    return out


def _complete_by_family(study: optuna.Study) -> dict[str, list] | None:
    """The complete trials by family where the study samples the family (`arch`), else None."""
    complete = study.get_trials(deepcopy=False, states=[COMPLETE])
    if not any("arch" in t.params for t in complete):
        return None
    by_family: dict[str, list] = {}
    for t in complete:
        by_family.setdefault(t.params.get("arch", t.user_attrs.get("family")), []).append(t)
    return by_family


def _between_share(groups: list[list[float]]) -> float:
    """The share of the values' variance that lies between the groups' means (one-way ANOVA's eta squared)."""
    values = np.concatenate([np.asarray(g, dtype=float) for g in groups])
    total = float(((values - values.mean()) ** 2).sum())
    between = sum(len(g) * (float(np.mean(g)) - values.mean()) ** 2 for g in groups)
    return float(between / total) if total > 0 else 0.0


def _objective_names(study: optuna.Study) -> list[str]:
    return study.metric_names or [f"objective {i}" for i in range(len(study.directions))]


def _importances(study: optuna.Study, trials: list) -> dict[str, dict[str, float]]:
    """fANOVA shares per objective over `trials` (of `study`), for the knobs that vary among them."""
    if len(trials) < 3:
        return {}
    knobs = sorted(k for k in trials[0].params if len({repr(t.params.get(k)) for t in trials}) > 1
                   and all(k in t.params for t in trials))
    if not knobs:
        return {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the in-memory study's "created" line
    try:
        subset = optuna.create_study(directions=study.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    subset.add_trials(_within_one_space(trials))
    out = {}
    for i, name in enumerate(_objective_names(study)):
        weighed = [k for k in knobs if not is_distillation_param(k)] if name in ("params", "latency_ms") else knobs
        if not weighed:
            continue
        try:
            shares = optuna.importance.get_param_importances(
                subset, params=weighed, target=lambda t, i=i: t.values[i],
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError):  # e.g. an objective that does not vary
            continue
        out[name] = {k: float(v) for k, v in shares.items()}
    return out


def _within_one_space(trials: list) -> list:
    """Copies of `trials` sharing one distribution per knob, widened to hold every trial's range and value: a no-KD
    baseline trains at alpha 0 where the range may start above 0, and Optuna refuses a trial outside its
    distribution. A trial outside a range that cannot simply widen (a stepped one) is left out."""
    space: dict = {}
    for t in trials:
        for name, value in t.params.items():
            space[name] = _widened(space.get(name, t.distributions[name]), t.distributions[name], value)
    return [optuna.trial.create_trial(params=t.params, distributions={k: space[k] for k in t.params},
                                      values=t.values) for t in trials
            if all(_holds(space[k], v) for k, v in t.params.items())]


def _holds(d, value) -> bool:
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return value in d.choices
    return d.low <= value <= d.high


def _widened(d, other, value):
    """`d` widened to `other`'s range and to `value`, where the two are of one kind without steps."""
    dist = optuna.distributions
    if isinstance(d, dist.CategoricalDistribution) and isinstance(other, dist.CategoricalDistribution):
        return dist.CategoricalDistribution(list(dict.fromkeys([*d.choices, *other.choices, value])))
    unstepped = {dist.FloatDistribution: None, dist.IntDistribution: 1}.get(type(d), "none")
    if type(d) is not type(other) or d.step != unstepped or other.step != unstepped:
        return d
    low, high = min(d.low, other.low, value), max(d.high, other.high, value)
    return type(d)(low, high, log=d.log and low > 0)


def importance_line(importance: dict, study: optuna.Study) -> str:
    """Each objective's three largest shares; where families mix, `arch` and then each family's own, with how many
    trials it was weighed over (a family with fewer than three complete trials is named as left out)."""
    def top(shares: dict) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])[:3])

    by_family = _complete_by_family(study)
    parts = []
    for objective, shares in importance.items():
        if by_family is None:
            parts.append(f"{objective}: {top(shares)}")
            continue
        text = [f"arch {shares['arch']:.2f}"] if "arch" in shares else []
        for family, n in sorted((f, len(ts)) for f, ts in by_family.items()):
            own = {k[len(family) + 1:]: v for k, v in shares.items() if k.startswith(f"{family}.")}  # may hold dots
            text.append(f"{family} ({n} trials) {top(own)}" if own else f"{family} ({n} trials) left out")
        parts.append(f"{objective}: " + "; ".join(text))
    return " | ".join(parts)
