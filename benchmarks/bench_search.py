"""Search quality: hypervolume after N trials for each sampler on the same study, 3 seeds each, in one run.

    python benchmarks/bench_search.py [--n-trials 20] [--samplers tpe nsga2 random] [--seeds 0 1 2]

Pruning is off so that only the sampler differs. The last line names the sampler with the best mean hypervolume.
"""

from __future__ import annotations

import argparse
import statistics

from common import study_config, timed_study

from kdsearch.scores import study_hypervolume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="digits")
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "random"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    for sampler in args.samplers:
        for seed in args.seeds:
            cfg = study_config(args.study, [f"seed={seed}", f"search.n_trials={args.n_trials}",
                                            f"search.sampler='{sampler}'", "search.pruner='none'"])
            study, seconds = timed_study(cfg)
            results.setdefault(sampler, []).append(study_hypervolume(study))
            print(f"{sampler:>7} seed {seed}: hypervolume {results[sampler][-1]:.4f} ({seconds:.0f} s)", flush=True)
    for sampler, hvs in results.items():
        print(f"{sampler:>7}: mean {statistics.mean(hvs):.4f} sd {statistics.stdev(hvs) if len(hvs) > 1 else 0:.4f}"
              f"  ({', '.join(f'{v:.4f}' for v in hvs)})")
    best = max(results, key=lambda s: statistics.mean(results[s]))
    print(f"best: {best}")


if __name__ == "__main__":
    main()
