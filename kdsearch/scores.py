"""The scores a study is judged by: the hypervolume of its front (one definition for the report, the study
run's metrics and the benchmarks) and the KD gain of its baseline pairs, with standard errors."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd

COMPLETE = optuna.trial.TrialState.COMPLETE


def kd_gains(study: optuna.Study) -> dict[str, dict]:
    """The KD gain of each student family (and, with several KD methods, of each method: "<family> <method>") that
    has a complete baseline pair."""
    baselines = [t.user_attrs for t in study.get_trials(deepcopy=False) if "baseline" in t.user_attrs]
    names = {a.get("baseline_family", "convnet") for a in baselines}
    methods = sorted({a["baseline"] for a in baselines} - {"no-kd"}, key=lambda m: (m != "kd", m))
    gains = {family if methods == ["kd"] else f"{family} {method}": kd_gain(study, family, method)
             for family in sorted(names) for method in methods}
    return {name: gain for name, gain in gains.items() if gain}


def kd_gain(study: optuna.Study, family: str | None = None, method: str = "kd") -> dict | None:
    """Accuracy of the baseline distilled by `method` minus that of its undistilled twin (same student, lr and
    seed), with a standard error: over the pairs' seeds when the study ran several pairs
    (`search.baseline_repeats`), else over the images, pairing the two students' answers image by image. `family`:
    that family's pairs (default: the first family's)."""
    pairs: dict[int, dict] = {}
    for t in study.get_trials(deepcopy=False, states=[COMPLETE]):
        a = t.user_attrs
        if "baseline" in a:
            family = family or a.get("baseline_family", "convnet")
            if a.get("baseline_family", "convnet") == family:
                pairs.setdefault(a.get("baseline_pair", 0), {})[a["baseline"]] = t
    full = [(p["no-kd"], p[method]) for _, p in sorted(pairs.items()) if "no-kd" in p and method in p]
    if not full:
        return None
    out = {"family": family, "method": method,
           "trials": [plain.number for plain, _ in full] + [kd.number for _, kd in full],
           "pairs": len(full), "params": full[0][1].user_attrs["params"],
           "se_over": "seeds" if len(full) > 1 else "images"}
    for split in ("val", "test"):
        acc = [(_acc(plain, split), _acc(kd, split)) for plain, kd in full]
        gains = [k - p for p, k in acc]
        out[f"{split}_acc"] = [float(np.mean([p for p, _ in acc])), float(np.mean([k for _, k in acc]))]
        out[f"{split}_gain"] = float(np.mean(gains))
        out[f"{split}_gain_se"] = (float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(full) > 1
                                   else paired_se(full[0][0].user_attrs.get(f"{split}_correct"),
                                                  full[0][1].user_attrs.get(f"{split}_correct")))
    return out


def _acc(trial: optuna.trial.FrozenTrial, split: str) -> float:
    return trial.values[0] if split == "val" else trial.user_attrs["test_acc"]


def paired_se(plain_bits: str | None, kd_bits: str | None) -> float | None:
    """Standard error of the accuracy difference of two classifiers on the same n images, from the per-image
    differences d = kd_right - plain_right: sd(d) / sqrt(n). The bits are strings recorded by `trial.bits_of`."""
    if not plain_bits or not kd_bits:
        return None
    plain, kd = (np.array([c == "1" for c in bin(int(b, 16))[3:]], dtype=float) for b in (plain_bits, kd_bits))
    if len(plain) != len(kd) or len(plain) < 2:
        return None
    d = kd - plain
    return float(d.std(ddof=1) / np.sqrt(len(d)))


def hypervolume_reference(teacher: dict) -> list[float]:
    """The reference point of every hypervolume kdsearch reports: zero accuracy, and the teacher's parameters and
    latency. A student larger or slower than its teacher adds nothing; studies with the same teacher compare."""
    return [0.0, float(teacher["params"]), float(teacher["latency_ms"])]


def hypervolume(points: list | np.ndarray, teacher: dict) -> float:
    """Hypervolume of (val_acc, params, latency_ms) points in (val_acc, log10 params, latency_ms) between them and
    `hypervolume_reference(teacher)`, as a fraction of the box from (1.0, 1 parameter, 0 ms) to that reference:
    1 would be a perfect student with one parameter and no latency. Log parameters, because students span orders
    of magnitude and the teacher's size would otherwise swamp the axis."""
    from optuna._hypervolume import compute_hypervolume  # what plot_hypervolume_history uses; not yet public

    acc0, params0, latency0 = hypervolume_reference(teacher)
    ref = np.array([-acc0, np.log10(params0), latency0])
    pts = np.array([[-a, np.log10(max(p, 1)), lat] for a, p, lat in points], dtype=float).reshape(-1, 3)
    pts = pts[(pts < ref).all(axis=1)]
    box = 1.0 * np.log10(params0) * latency0
    return float(compute_hypervolume(pts, ref)) / box if len(pts) and box > 0 else 0.0


def study_hypervolume(study: optuna.Study) -> float:
    """The hypervolume of a Pareto-mode study's front (see `hypervolume`)."""
    return hypervolume([t.values for t in study.best_trials], study.user_attrs["teacher"])


def hypervolume_history(study: optuna.Study, teacher: dict | None = None, point=None) -> pd.DataFrame:
    """The front's hypervolume after each complete trial, in the order they finished: against the count of
    complete trials and the seconds since the study's first trial started. `teacher` (default the study's) and
    `point` (a trial's (val_acc, params, latency_ms), default its values) let a benchmark score it on other timings."""
    teacher = teacher or study.user_attrs["teacher"]
    point = point or (lambda t: t.values)
    starts = [t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start]
    done = sorted(study.get_trials(deepcopy=False, states=[COMPLETE]), key=lambda t: t.datetime_complete)
    rows, seen = [], []
    for t in done:
        seen.append(point(t))
        rows.append({"trial": t.number, "trials": len(seen),
                     "seconds": (t.datetime_complete - min(starts)).total_seconds(),
                     "hypervolume": hypervolume(seen, teacher)})
    return pd.DataFrame(rows, columns=["trial", "trials", "seconds", "hypervolume"])
