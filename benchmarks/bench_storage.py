"""What the study's storage costs per trial: SQLite against PostgreSQL, same trials, in one run.

    python benchmarks/bench_storage.py [--trials 100] [--postgres URL]

Each trial does what a kdsearch trial asks of its storage (sample 5 params, write 14 user attributes, finish with
3 objectives) and no training, with the random sampler, so the time is the storage's alone. Without --postgres
it starts a throwaway PostgreSQL server (Debian's package, as root). The last line is `postgres/sqlite: N.Nx`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from services import start_postgres  # noqa: E402


def fake_trial(trial: optuna.Trial) -> tuple[float, float, float]:
    width = trial.suggest_float("width", 0.25, 2.0, log=True)
    trial.suggest_int("depth", 1, 3)
    trial.suggest_float("temperature", 1, 20, log=True)
    trial.suggest_float("alpha", 0, 1)
    trial.suggest_float("lr", 0.01, 0.3, log=True)
    for i in range(14):
        trial.set_user_attr(f"attr{i}", i * width)
    return width / 2, width * 1000, width / 10


def seconds_per_trial(storage: str, trials: int) -> float:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    start = time.perf_counter()
    study.optimize(fake_trial, n_trials=trials)
    return (time.perf_counter() - start) / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--postgres")
    args = parser.parse_args()
    stop = None
    if not args.postgres:
        started = start_postgres()
        if started is None:
            sys.exit("no PostgreSQL here: pass --postgres URL")
        args.postgres, stop = started
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = seconds_per_trial(f"sqlite:///{tmp}/optuna.db", args.trials)
        postgres = seconds_per_trial(args.postgres, args.trials)
    finally:
        if stop:
            stop()
    print(f"sqlite:   {1000 * sqlite:6.1f} ms per trial ({args.trials} trials)")
    print(f"postgres: {1000 * postgres:6.1f} ms per trial")
    print(f"postgres/sqlite: {postgres / sqlite:.1f}x")


if __name__ == "__main__":
    main()
