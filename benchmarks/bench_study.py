"""Where a trial's time goes: run N trials of a study and split each trial's wall time into phases.

    python benchmarks/bench_study.py --data-dir ../shared/data --n-trials 5

Phases: teacher (its one-off training and logit cache, amortised over the study's trials), train (the distillation
epochs), evaluate (validation per epoch and the final test pass), measure (parameters, FLOPs, latency), tracking
(MLflow calls), and other (Optuna's sampler and storage: the trial's wall time minus the phases above). The last
line is `outside training: N.N%` of a trial; the teacher, paid once per study, is shown but not counted. Runs in a
temporary folder; the teacher cache is shared with run-study's (`--cache-dir`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import optuna

from kdsearch.search import run_study
from kdsearch.study_file import load_study

PHASES = ["train", "evaluate", "measure", "tracking"]


def phase_table(study: optuna.Study, teacher_seconds: float) -> dict[str, float]:
    """Mean seconds per complete trial, by phase, with the teacher amortised over all the study's trials."""
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    mean = {p: sum(t.user_attrs["seconds"].get(p, 0.0) for t in trials) / len(trials) for p in PHASES}
    wall = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials) / len(trials)
    mean["other"] = max(0.0, wall - sum(mean.values()))
    mean["teacher"] = teacher_seconds / len(trials)
    return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", nargs="?", default=str(Path(__file__).resolve().parent.parent / "studies/mnist.toml"))
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--n-trials", type=int, default=5)
    parser.add_argument("--cache-dir", default=str(Path(".kdsearch-cache").resolve()))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    cfg = load_study(args.study, [f"data.data_dir={data_dir!r}", f"search.n_trials={args.n_trials}", *args.set])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        study = run_study(cfg, cache_dir=args.cache_dir)
        teacher_seconds = study.user_attrs["teacher"].get("seconds", 0.0)
        table = phase_table(study, teacher_seconds)
    total = sum(table.values())
    print(f"\nmean of {args.n_trials} trials ({cfg.name}, {cfg.distill.epochs} epochs):")
    for phase, seconds in table.items():
        print(f"  {phase:9s} {seconds:8.3f} s  {100 * seconds / total:5.1f}%")
    print(f"  {'total':9s} {total:8.3f} s")
    trial = total - table["teacher"]  # the teacher's training is paid once per study, not per trial
    print(f"outside training: {100 * (trial - table['train']) / trial:.1f}% of a trial "
          f"(evaluate, measure, tracking, other; the amortised teacher excluded)")


if __name__ == "__main__":
    main()
