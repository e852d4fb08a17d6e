"""MLflow side of a study: one experiment per study, a run for the study with one nested run per trial,
and a run for the teacher. Everything goes through `MlflowClient`, so no global active run is involved."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from kdsearch import KdsearchError, first_line
from kdsearch.credentials import masked

ROLE = "kdsearch.role"
# MLflow 3's UI opens an experiment by its kind: without this tag it may guess "GenAI" and show traces, not runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def client_for(tracking_uri: str | None) -> MlflowClient:
    """A client on `tracking_uri`, or on MLflow's own default (sqlite:///mlflow.db here, artifacts in mlruns/).
    MLflow's global tracking URI is left alone, so one call never redirects another."""
    return MlflowClient(tracking_uri)


def runs_page(client: MlflowClient, exp_id: str) -> str:
    """Where the study's runs table is: MLflow 3's UI may open an experiment on its GenAI overview instead."""
    uri = client.tracking_uri
    page = f"#/experiments/{exp_id}/runs"
    if uri.startswith(("http://", "https://")):
        return f"{masked(uri.rstrip('/'))}/{page}"
    here = uri in ("sqlite:///mlflow.db", f"sqlite:///{Path.cwd() / 'mlflow.db'}")  # MLflow's own default here
    serve = "mlflow ui" if here else f"mlflow ui --backend-store-uri {masked(uri)}"
    return f"`{serve}` here, then http://127.0.0.1:5000/{page}"


def open_client(tracking_uri: str | None, study_name: str) -> MlflowClient:
    """A client on a store that answers and takes writes (the study's experiment is made here), or a one-line
    error before any study exists."""
    try:
        client = client_for(tracking_uri)
        experiment_id(client, study_name)
        return client
    except Exception as e:  # MLflow wraps store, network and file errors differently per backend
        where = masked(tracking_uri or mlflow.get_tracking_uri())
        raise KdsearchError(f"cannot write to the MLflow tracking store {where} ({masked(first_line(e))[:300]}): "
                            "pass a writable --tracking-uri, or start the tracking server") from None


def experiment_id(client: MlflowClient, study_name: str) -> str:
    exp = client.get_experiment_by_name(study_name)
    if exp is None:
        try:
            return client.create_experiment(study_name, tags=EXPERIMENT_KIND)
        except MlflowException as e:  # another host made it a moment ago
            exp = client.get_experiment_by_name(study_name)
            if exp is None:
                raise e from None
    for key, value in EXPERIMENT_KIND.items():
        if key not in exp.tags:  # made by an earlier kdsearch
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_values(client: MlflowClient, run_id: str, params: dict | None = None, metrics: dict | None = None,
               tags: dict | None = None, step: int = 0) -> None:
    now = _now_ms()
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


class MetricBuffer:
    """A run's per-epoch metrics, written at most once every `every_s` seconds and on `flush`: a digits epoch takes
    about 30 ms and each write to MLflow's SQLite store about 10 ms. Each value keeps its own step and time."""

    def __init__(self, client: MlflowClient, run_id: str, every_s: float = 1.0):
        self.client, self.run_id, self.every_s = client, run_id, every_s
        self.pending: list[Metric] = []
        self.written = 0.0  # the first epoch is written at once

    def add(self, metrics: dict, step: int) -> None:
        now = _now_ms()
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.time() - self.written >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []
        self.written = time.time()


def log_json(client: MlflowClient, run_id: str, name: str, value: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(value, indent=1, default=str))
        client.log_artifact(run_id, str(path))


def teacher_run(client: MlflowClient, exp_id: str, key: str, params: dict, metrics: dict,
                finished_at: float | None = None, run_id: str | None = None, step: int = 0) -> str:
    """The teacher's run in this experiment: `run_id` (the study's shared teacher run, see `shared_teacher`), given
    its figures once; else one logged once per teacher key, spanning the time the teacher took
    (`metrics['seconds']`) and ending when it was cached (`finished_at`, epoch seconds)."""
    if run_id is not None:
        if not client.get_run(run_id).data.params:
            log_values(client, run_id, params=params, metrics=metrics, step=step)
        return run_id
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{ROLE}` = 'teacher' and tags.`kdsearch.teacher_key` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    end_ms = int((finished_at or time.time()) * 1000)
    start_ms = end_ms - int(metrics.get("seconds", 0) * 1000)
    run = client.create_run(exp_id, start_time=start_ms, run_name=f"teacher {key}",
                            tags={ROLE: "teacher", "kdsearch.teacher_key": key})
    log_values(client, run.info.run_id, params=params, metrics=metrics)
    client.set_terminated(run.info.run_id, "FINISHED", end_time=end_ms)
    return run.info.run_id


def open_study_run(client: MlflowClient, exp_id: str, study_name: str, run_id: str | None, uid: str | None = None
                   ) -> str:
    """Reopen the study's run when it exists (a resumed study), else create it: once, when several hosts open a new
    study at the same moment (each creates one; the oldest of those tagged with the study's `uid` stays)."""
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            return run_id
        except mlflow.exceptions.MlflowException:
            pass  # the tracking store was wiped; start a new study run
    same_study = f"tags.`{ROLE}` = 'study' and tags.`kdsearch.study_uid` = '{uid}'"
    if uid and (found := oldest(client, exp_id, same_study)) is not None:
        client.update_run(found, status="RUNNING")
        return found
    tags = {ROLE: "study", "optuna.study_name": study_name, **({"kdsearch.study_uid": uid} if uid else {})}
    mine = client.create_run(exp_id, run_name=f"study {study_name}", tags=tags).info.run_id
    first = oldest(client, exp_id, same_study) if uid else mine
    if first != mine:
        client.delete_run(mine)
    return first


def oldest(client: MlflowClient, exp_id: str, filter_string: str) -> str | None:
    """The oldest run that matches (ties broken by id, so every host picks the same)."""
    runs = client.search_runs([exp_id], filter_string)
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if runs else None


def start_trial_run(client: MlflowClient, exp_id: str, study_run_id: str, study_name: str, number: int,
                    params: dict) -> str:
    run = client.create_run(exp_id, run_name=f"trial {number}", tags={
        "mlflow.parentRunId": study_run_id, ROLE: "trial", "optuna.study_name": study_name,
        "optuna.trial_number": str(number), "optuna.trial_state": "RUNNING"})
    log_values(client, run.info.run_id, params=params)
    return run.info.run_id


def start_refine_run(client: MlflowClient, exp_id: str, study_run_id: str, study_name: str, trial, seed_number: int,
                     params: dict, worker_tags: dict) -> str:
    """A refine training of `trial`'s student (see `refine.py`), nested under the study's run beside the trials;
    `worker_tags` name the process that trains it."""
    run = client.create_run(exp_id, run_name=f"refine trial {trial.number} seed {seed_number}", tags={
        "mlflow.parentRunId": study_run_id, ROLE: "refine", "optuna.study_name": study_name,
        "optuna.trial_number": str(trial.number), "kdsearch.refined_from": trial.user_attrs.get("mlflow_run_id", ""),
        **worker_tags})
    log_values(client, run.info.run_id, params=params)
    return run.info.run_id


def end_trial_run(client: MlflowClient, run_id: str, state: str, reason: str = "",
                  interrupted: bool = False, metrics: dict | None = None, step: int = 0) -> None:
    """Log the last metrics and close a trial's run with the Optuna state as a tag: COMPLETE -> FINISHED, FAIL ->
    FAILED (KILLED when the user interrupted it), PRUNED -> KILLED."""
    tags = {"optuna.trial_state": state}
    if reason:
        tags["kdsearch.reason"] = reason[:4000]
    log_values(client, run_id, metrics=metrics, tags=tags, step=step)
    status = "KILLED" if interrupted else {"COMPLETE": "FINISHED", "FAIL": "FAILED"}.get(state, "KILLED")
    client.set_terminated(run_id, status)


def close_lost_trial_runs(client: MlflowClient, study_name: str, number: int, reason: str) -> int:
    """Close every run of trial `number` still RUNNING (its worker died, perhaps before the trial learnt the run's
    id) as KILLED; return how many."""
    exp = client.get_experiment_by_name(study_name)
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`optuna.trial_number` = '{number}' and tags.`{ROLE}` = 'trial' and attributes.status = 'RUNNING'"))
    for run in runs:
        end_trial_run(client, run.info.run_id, "FAIL", reason, interrupted=True)
    return len(runs)
