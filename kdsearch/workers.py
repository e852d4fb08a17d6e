"""`run-study --workers K`: K local worker processes on one study.

The parent builds the teacher (and its logit cache) and opens the study and its MLflow run once, so the workers
share them instead of racing; then each worker takes trials until the study holds the requested number of
complete trials. Each worker gets the parent's options. With `--device auto` or `cuda` and several GPUs visible,
worker i trains on cuda:(i % count); a named device (cpu, cuda:N) is used by every worker; on a CPU the cores are
split between the workers. The parent watches its workers: the trial of one that dies is failed and queued again
at once (on every storage, heartbeats or not), so the others never wait for it.
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

from kdsearch import KdsearchError, tracking
from kdsearch.config import StudyConfig
from kdsearch.credentials import worker_environment
from kdsearch.storage import fail_dead_local_trials, is_sqlite
from kdsearch.study import waiting_enqueued


def run_workers(cfg: StudyConfig, workers: int, worker_args: list[str], *, study_name: str | None, storage: str,
                tracking_uri: str | None, device: str | None, cache_dir: str, reports_dir: str,
                warm_start_from: str | None = None) -> optuna.Study:
    """Start `workers` processes of `python -m kdsearch run-study WORKER_ARGS` and wait for them."""
    from kdsearch.report import report_study
    from kdsearch.session import open_session

    if is_sqlite(storage):
        raise KdsearchError("--workers needs a storage that several processes can share: pass --storage "
                            "postgresql+psycopg2://USER@HOST/DB or journal:FILE")
    session = open_session(cfg, study_name=study_name, storage=storage, tracking_uri=tracking_uri, device=device,
                           cache_dir=cache_dir, warm_start_from=warm_start_from)
    study = session.study
    done = len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))
    target = done + cfg.search.n_trials + sum(waiting_enqueued(study).values())
    print(f"starting {workers} workers until study '{study.study_name}' holds {target} complete trials", flush=True)
    started = time.time()
    procs = []
    for i in range(workers):
        procs.append(subprocess.Popen([sys.executable, "-m", "kdsearch", "run-study", *worker_args,
                                       "--until-complete", str(target), *_worker_settings(workers, i, device)],
                                      env={**os.environ, **worker_environment(storage, tracking_uri),
                                           "KDSEARCH_WORKER": str(i)}))
    try:
        codes = watch(procs, study, session.ctx.client)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        session.ctx.client.set_terminated(session.ctx.study_run_id, "KILLED")
        raise
    complete = len(study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]))
    lost = [i for i, code in enumerate(codes) if code != 0]
    timed_out = not lost and cfg.search.timeout and time.time() - started >= cfg.search.timeout
    session.ctx.client.set_terminated(session.ctx.study_run_id,
                                      "FINISHED" if complete >= target or timed_out else "FAILED")
    if lost:
        print(f"workers {lost} ended with an error or were killed", flush=True)
    report_study(study, Path(reports_dir), session.ctx.client)
    print(f"MLflow runs: {tracking.runs_page(session.ctx.client, session.ctx.experiment_id)}", flush=True)
    if complete >= target:
        return study
    if timed_out:
        print(f"timeout: {complete} of {target} trials are complete; run the same command again to add more",
              flush=True)
        return study
    raise KdsearchError(f"only {complete} of {target} trials are complete: see the workers' messages above, "
                        "then run the same command again to resume")


def watch(procs: list[subprocess.Popen], study: optuna.Study, client, poll_s: float = 0.5) -> list[int]:
    """Wait for the workers; whenever one ends, fail and re-queue the trial it left RUNNING."""
    running = list(procs)
    while running:
        time.sleep(poll_s)
        ended = [p for p in running if p.poll() is not None]
        if ended:
            running = [p for p in running if p not in ended]
            lost = fail_dead_local_trials(study, client)
            if lost:
                print(f"a worker ended in the middle of trials {lost}: marked FAIL and queued again", flush=True)
    return [p.returncode for p in procs]


def _worker_settings(workers: int, index: int, device: str | None) -> list[str]:
    """Worker `index`'s device and thread count."""
    gpus = torch.cuda.device_count()
    if device in (None, "auto", "cuda") and gpus:
        return ["--device", f"cuda:{index % gpus}"]
    out = ["--device", device or "auto"]
    if (device or "auto") in ("auto", "cpu"):
        out += ["--set", f"engine.threads={max(1, len(os.sched_getaffinity(0)) // workers)}"]
    return out
