"""Dominated-cost pruning for several objectives: the same Pareto study with and without it, 3 seeds.

    python benchmarks/bench_pruning.py [--n-trials 20] [--seeds 0 1 2]

Prints, per seed and on average, the study's wall time and the hypervolume of its final front (the report's one
definition, `kdsearch.report.hypervolume`), and the time saved. Same sampler seed in both arms, so the two studies
sample the same first trials and differ only once pruning changes what the sampler has seen.
"""

from __future__ import annotations

import argparse
import statistics

from common import study_config, timed_study

from kdsearch.report import study_hypervolume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="digits")
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--margin", type=float, default=None, help="search.prune_margin (default: the study's)")
    args = parser.parse_args()
    margin = [] if args.margin is None else [f"search.prune_margin={args.margin}"]
    rows = {"none": [], "dominated": []}
    print(f"{'seed':>4} {'pruner':>9} {'seconds':>8} {'pruned':>6} {'hypervolume':>11}")
    for seed in args.seeds:
        for pruner in rows:
            cfg = study_config(args.study, [f"seed={seed}", f"search.n_trials={args.n_trials}",
                                            f"search.pruner='{pruner}'", *margin])
            study, seconds = timed_study(cfg)
            pruned = sum(t.state.name == "PRUNED" for t in study.trials)
            hv = study_hypervolume(study)
            rows[pruner].append((seconds, hv))
            print(f"{seed:>4} {pruner:>9} {seconds:8.1f} {pruned:>6} {hv:11.4f}", flush=True)
    for pruner, values in rows.items():
        times, hvs = zip(*values)
        spread = statistics.stdev(hvs) if len(hvs) > 1 else 0.0
        print(f"mean {pruner:>9} {statistics.mean(times):8.1f} s  hypervolume {statistics.mean(hvs):.4f} "
              f"(sd {spread:.4f})")
    saved = 1 - statistics.mean(t for t, _ in rows["dominated"]) / statistics.mean(t for t, _ in rows["none"])
    print(f"time saved by pruning: {100 * saved:.1f}%")


if __name__ == "__main__":
    main()
