"""`run-study --workers K`: K local worker processes on one study.

The parent builds the teacher (and its logit cache) and opens the study and its MLflow run once, so the workers
share them instead of racing; then each worker takes trials until the study holds the requested number of
complete trials. With several GPUs visible, worker i sees only GPU i % count (CUDA_VISIBLE_DEVICES); on a CPU the
cores are split between the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch

from kdsearch import KdsearchError
from kdsearch.config import StudyConfig
from kdsearch.storage import is_sqlite


def run_workers(cfg: StudyConfig, workers: int, worker_args: list[str], *, study_name: str | None, storage: str,
                tracking_uri: str | None, device: str | None, cache_dir: str, reports_dir: str) -> optuna.Study:
    """Start `workers` processes of `python -m kdsearch run-study WORKER_ARGS` and wait for them."""
    from kdsearch.report import report_study
    from kdsearch.search import open_session

    if is_sqlite(storage):
        raise KdsearchError("--workers needs a storage that several processes can share: pass --storage "
                            "postgresql+psycopg2://USER@HOST/DB or journal:FILE")
    session = open_session(cfg, study_name=study_name, storage=storage, tracking_uri=tracking_uri, device=device,
                           cache_dir=cache_dir)
    study = session.study
    done = len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))
    target = done + cfg.search.n_trials
    print(f"starting {workers} workers until study '{study.study_name}' holds {target} complete trials", flush=True)
    procs = []
    for i in range(workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "kdsearch", "run-study", *worker_args,
                                       "--until-complete", str(target), *_worker_settings(workers)],
                                      env=_worker_env(i)))
        time.sleep(0.3)  # stagger the starts: fewer workers race for the same next trial
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        session.ctx.client.set_terminated(session.ctx.study_run_id, "KILLED")
        raise
    complete = len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))
    session.ctx.client.set_terminated(session.ctx.study_run_id, "FINISHED" if complete >= target else "FAILED")
    lost = [i for i, code in enumerate(codes) if code != 0]
    if lost:
        print(f"workers {lost} ended with an error or were killed; the others finished the study", flush=True)
    report_study(study, Path(reports_dir), session.ctx.client)
    if complete < target:
        raise KdsearchError(f"only {complete} of {target} trials are complete: run the same command again to resume")
    return study


def _worker_settings(workers: int) -> list[str]:
    if torch.cuda.device_count() > 0:
        return ["--device", "cuda"]
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    return ["--set", f"engine.threads={threads}"]


def _worker_env(index: int) -> dict[str, str]:
    env = dict(os.environ)
    count = torch.cuda.device_count()
    if count > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(index % count)
    env["KDSEARCH_WORKER"] = str(index)
    return env
