"""Run a search: open a session on the study (`session.py`), run its trials (`scheduling.py`, each one
`trial.objective`), then write the report of its Pareto front and log it to the study's MLflow run (`report.py`).

Pareto mode maximises val_acc and minimises params and latency_ms; budget mode maximises val_acc under the study
file's limits, which reach the sampler as constraints each trial sets.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna

from kdsearch import KdsearchError, tracking
from kdsearch.config import StudyConfig
from kdsearch.engine import release_memory_after_failure
from kdsearch.execution import parallel_execution, processes_for
from kdsearch.progress import TrialStatus, print_progress
from kdsearch.scheduling import long_lived_objects_frozen, run_trials, run_until_complete, stop_on_repeated_failure
from kdsearch.session import open_session
from kdsearch.study import waiting_enqueued


def run_study(cfg: StudyConfig, *, study_name: str | None = None, storage: str = "sqlite:///optuna.db",
              tracking_uri: str | None = None, device: str | None = None, cache_dir: str | Path = ".kdsearch-cache",
              reports_dir: str | Path = "reports", until_complete: int | None = None,
              report: bool = True, warm_start_from: str | None = None) -> optuna.Study:
    """Run (or resume) a study: `cfg.search.n_trials` more trials, after the baselines and warm-start trials a new
    study enqueued (or, as one of several workers, trials until the study holds `until_complete` complete ones),
    then write and log the report."""
    from kdsearch.report import report_study  # pandas and plotly: imported once there is a front to draw

    session = open_session(cfg, study_name=study_name, storage=storage, tracking_uri=tracking_uri, device=device,
                           cache_dir=cache_dir, warm_start_from=warm_start_from)
    study, client, run_id = session.study, session.ctx.client, session.ctx.study_run_id
    failures = stop_on_repeated_failure()
    finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    session.ctx.status = TrialStatus()
    enqueued = {} if until_complete else waiting_enqueued(study)
    n_trials = cfg.search.n_trials + sum(enqueued.values())
    progress = print_progress(until_complete or n_trials, time.time(), bool(until_complete), session.ctx.status)
    callbacks = [progress, release_memory_after_failure, failures]
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our progress line replaces Optuna's
    queued = [f"{n} {kind if n > 1 else kind[:-1]}" for kind, n in enqueued.items() if n]
    after = f" after its {' and '.join(queued)}" if queued else ""
    print(f"study '{study.study_name}': {finished} trials so far, running "
          f"{f'until {until_complete} are complete' if until_complete else f'{cfg.search.n_trials} more'}"
          f"{after} on {session.device}", flush=True)
    try:
        processes = processes_for(cfg, session.device, 1 if until_complete else n_trials)
        with long_lived_objects_frozen(), parallel_execution(session.ctx, processes) as at_once:
            if until_complete:
                run_until_complete(session, until_complete, callbacks, failures)
            else:
                run_trials(session, at_once, callbacks, failures, n_trials)
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except Exception:  # e.g. the progress lines' reader went away (`| head`): the study's run must not stay RUNNING
        client.set_terminated(run_id, "FAILED")
        raise
    if failures.reason:
        client.set_terminated(run_id, "FAILED")
        raise KdsearchError(f"stopped: the last trials all failed with '{failures.reason}': fix the cause and "
                            f"run the same command again to resume")
    if report:
        if cfg.refine.after_search:
            _refined(session)
        client.set_terminated(run_id, "FINISHED")
        report_study(study, Path(reports_dir), client)
        print(f"MLflow runs: {tracking.runs_page(client, session.ctx.experiment_id)}", flush=True)
    return study


def refine(cfg: StudyConfig, *, study_name: str | None = None, storage: str = "sqlite:///optuna.db",
           tracking_uri: str | None = None, device: str | None = None, cache_dir: str | Path = ".kdsearch-cache",
           reports_dir: str | Path = "reports") -> optuna.Study:
    """The `refine` command: refine a study's winners as its `[refine]` section says (see `refine.py`), then
    write and log the report."""
    from kdsearch.report import load_existing_study, report_study

    name = study_name or cfg.name
    if not load_existing_study(name, storage).get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
        raise KdsearchError(f"study '{name}' has no complete trial to refine: run-study first")
    session = open_session(cfg, study_name=study_name, storage=storage, tracking_uri=tracking_uri, device=device,
                           cache_dir=cache_dir)
    _refined(session)
    session.ctx.client.set_terminated(session.ctx.study_run_id, "FINISHED")
    report_study(session.study, Path(reports_dir), session.ctx.client)
    return session.study


def _refined(session) -> None:
    """Refine the session's study; its MLflow run ends KILLED or FAILED if refining does not finish."""
    from kdsearch.refine import refine_study

    try:
        refine_study(session.ctx, session.study)
    except BaseException as e:
        session.ctx.client.set_terminated(session.ctx.study_run_id,
                                          "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
