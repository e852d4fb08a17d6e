"""Pruning with several objectives: the same Pareto study with no pruning, dominated-cost pruning and rung
(multi-fidelity) pruning, several seeds, one study at a time.

    python benchmarks/bench_pruning.py [--study digits] [--n-trials 20] [--seeds 0 1 2] [--pruners none dominated rungs]
                                       [--pruned-trials 40]
    python benchmarks/bench_pruning.py --study mnist --set data.data_dir='../shared/data' --set distill.epochs=8

Prints, per seed and pruner, the study's wall time (teacher cached beforehand), its pruned trials, the hypervolume of
its final front (the report's one definition, `kdsearch.figures.hypervolume`) and the seconds from its first trial
until it reached the final hypervolume of the unpruned study of the same seed ("-" if it never did); then the
means, and each pruner's time against the unpruned study's. Same sampler seed in every arm, so the studies sample
the same first trials and differ only once pruning changes what the sampler has seen.
"""

from __future__ import annotations

import argparse
import statistics

from common import study_config, timed_study

from kdsearch.figures import hypervolume_history, study_hypervolume


def seconds_to_reach(study, target: float) -> float | None:
    history = hypervolume_history(study)
    reached = history[history["hypervolume"] >= target - 1e-12]
    return float(reached["seconds"].iloc[0]) if len(reached) else None


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
    print(f"{'seed':>4} {'pruner':>9} {'seconds':>8} {'pruned':>6} {'hypervolume':>11} {'s to unpruned hv':>16}")
    for seed in args.seeds:
        target = None
        for pruner in args.pruners:
            n = args.n_trials if pruner == "none" else (args.pruned_trials or args.n_trials)
            cfg = study_config(args.study, [f"seed={seed}", f"search.n_trials={n}",
                                            f"search.pruner='{pruner}'", *args.set])
            study, seconds = timed_study(cfg)
            pruned = sum(t.state.name == "PRUNED" for t in study.trials)
            hv = study_hypervolume(study)
            target = hv if pruner == "none" else target
            reach = seconds_to_reach(study, target) if target is not None else None
            rows[pruner].append((seconds, hv, reach))
            shown = f"{reach:.1f}" if reach is not None else "-"
            print(f"{seed:>4} {pruner:>9} {seconds:8.1f} {pruned:>6} {hv:11.4f} {shown:>16}", flush=True)
    base = statistics.mean(r[0] for r in rows["none"]) if rows.get("none") else None
    base_reach = statistics.mean(r[2] for r in rows["none"]) if rows.get("none") else None
    for pruner, values in rows.items():
        times, hvs, reaches = zip(*values)
        spread = statistics.stdev(hvs) if len(hvs) > 1 else 0.0
        line = (f"mean {pruner:>9} {statistics.mean(times):8.1f} s  hypervolume {statistics.mean(hvs):.4f} "
                f"(sd {spread:.4f})")
        if base:
            line += f"  wall time {statistics.mean(times) / base:.2f}x the unpruned study's"
        if pruner != "none" and None not in reaches and base_reach:  # both timed from their first trial
            line += f"; reached its final hypervolume in {statistics.mean(reaches) / base_reach:.2f}x the time"
        print(line, flush=True)


if __name__ == "__main__":
    main()
