"""Pruning with several objectives: the same Pareto study with no pruning, dominated-cost pruning and rung
(multi-fidelity) pruning, several seeds, one study at a time.

    python benchmarks/bench_pruning.py [--study digits] [--n-trials 20] [--seeds 0 1 2] [--pruners none dominated rungs]
                                       [--pruned-trials 40]
    python benchmarks/bench_pruning.py --study mnist --set data.data_dir='../shared/data' --set distill.epochs=8

Prints, per seed and pruner, the study's wall time (teacher cached beforehand), its pruned trials, the hypervolume of
its final front (the report's one definition, `kdsearch.scores.hypervolume`) and the seconds from its first trial
until its front reached the final hypervolume of the unpruned study of the same seed ("-" if it never did), and its
final front's hypervolume, both on the unpruned study's timings (its teacher's and each architecture's latency,
where the unpruned study timed it); then the
means, and each pruner's time against the unpruned study's. Same sampler seed in every arm, so the studies sample
the same first trials and differ only once pruning changes what the sampler has seen.
"""

from __future__ import annotations

import argparse
import statistics

from common import study_config, timed_study
from optuna.trial import TrialState

from kdsearch.scores import hypervolume, hypervolume_history, study_hypervolume

COMPLETE = TrialState.COMPLETE


def seconds_to_reach(study, target: float, timings: dict) -> float | None:
    """Seconds from the study's first trial until its front, on `timings`, first held `target`'s hypervolume."""
    history = hypervolume_history(study, timings["teacher"], lambda t: on_timings(t, timings))
    reached = history[history["hypervolume"] >= target - 1e-12]
    return float(reached["seconds"].iloc[0]) if len(reached) else None


def timings_of(study) -> dict:
    """The study's teacher and each architecture's latency, keyed by (params, FLOPs)."""
    complete = study.get_trials(deepcopy=False, states=[COMPLETE])
    return {"teacher": study.user_attrs["teacher"],
            "latency": {(t.user_attrs["params"], t.user_attrs["flops"]): t.values[2] for t in complete}}


def on_timings(trial, timings: dict) -> tuple:
    """The trial's (val_acc, params, latency_ms) with its architecture's latency as `timings` hold it (the unpruned
    study's): each study times its teacher and architectures afresh, and their noise moves a hypervolume as much as
    the search does; on one set of timings two arms differ only by what they trained."""
    latency = timings["latency"].get((trial.user_attrs["params"], trial.user_attrs["flops"]), trial.values[2])
    return trial.values[0], trial.values[1], latency


def mean_sd(values) -> str:
    return f"{statistics.mean(values):.4f} (sd {statistics.stdev(values) if len(values) > 1 else 0.0:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="digits")
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pruners", nargs="+", default=["none", "dominated", "rungs"])
    parser.add_argument("--pruned-trials", type=int, help="trials of the pruned arms (default: --n-trials), so that "
                                                          "they may spend the time they save on more students")
    parser.add_argument("--set", action="append", default=[], help="study-file overrides, as for run-study")
    args = parser.parse_args()
    rows: dict[str, list] = {p: [] for p in args.pruners}
    print(f"{'seed':>4} {'pruner':>9} {'seconds':>8} {'pruned':>6} {'hypervolume':>11} {'s to unpruned hv':>16} "
          f"{'hv, unpruned timings':>20}")
    for seed in args.seeds:
        target = timings = None
        for pruner in args.pruners:
            n = args.n_trials if pruner == "none" else (args.pruned_trials or args.n_trials)
            cfg = study_config(args.study, [f"seed={seed}", f"search.n_trials={n}",
                                            f"search.pruner='{pruner}'", *args.set])
            study, seconds = timed_study(cfg)
            pruned = sum(t.state.name == "PRUNED" for t in study.trials)
            hv = study_hypervolume(study)
            if pruner == "none" or timings is None:  # the unpruned study's (without one: each arm's own)
                timings = timings_of(study)
            common = hypervolume([on_timings(t, timings) for t in study.get_trials(deepcopy=False, states=[COMPLETE])],
                                 timings["teacher"])
            target = common if pruner == "none" else target
            reach = seconds_to_reach(study, target, timings) if target is not None else None
            rows[pruner].append((seconds, hv, reach, common))
            shown = f"{reach:.1f}" if reach is not None else f"- ({target - common:.4f} short)"
            print(f"{seed:>4} {pruner:>9} {seconds:8.1f} {pruned:>6} {hv:11.4f} {shown:>16} {common:20.4f}",
                  flush=True)
    base = statistics.mean(r[0] for r in rows["none"]) if rows.get("none") else None
    base_reach = statistics.mean(r[2] for r in rows["none"]) if rows.get("none") else None
    for pruner, values in rows.items():
        times, hvs, reaches, commons = zip(*values)
        line = (f"mean {pruner:>9} {statistics.mean(times):8.1f} s  hypervolume {mean_sd(hvs)}, on the unpruned "
                f"timings {mean_sd(commons)}")
        if base:
            line += f"  wall time {statistics.mean(times) / base:.2f}x the unpruned study's"
        if pruner != "none" and None not in reaches and base_reach:  # both timed from their first trial
            line += (f"; reached its final hypervolume in {statistics.mean(reaches) / base_reach:.2f}x the time "
                     f"({statistics.mean(reaches) / base:.2f}x the unpruned study's wall time)")
        elif pruner != "none" and base:
            reached = [r for r in reaches if r is not None]
            line += f"; reached its final hypervolume on {len(reached)} of {len(reaches)} seeds"
        print(line, flush=True)


if __name__ == "__main__":
    main()
