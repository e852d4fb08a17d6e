"""The Optuna study: open or resume it, wire it to MLflow, run its trials (see `trial.py`), report the front.

Pareto mode maximises val_acc and minimises params and latency_ms; budget mode maximises val_acc under the study
file's limits, which reach the sampler as constraints each trial sets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from mlflow import MlflowClient

from kdsearch import KdsearchError, __version__, tracking
from kdsearch.config import StudyConfig, families
from kdsearch.data import Dataset, load_dataset
from kdsearch.distill import Normalizer
from kdsearch.engine import configure_device, release_memory_after_failure
from kdsearch.measure import latency_settings, measure_latency, runtime_label, runtime_of, warm_up
from kdsearch.models import Architecture, build_model, build_student
from kdsearch.progress import TrialStatus
from kdsearch.shared_teacher import TeacherRun
from kdsearch.storage import fail_dead_local_trials, open_storage, peek_study_attrs, stale_trial_callback
from kdsearch.students import middle_knobs, student_spec
from kdsearch.study import as_it_was_made, open_study
from kdsearch.teacher import Teacher, get_teacher, teacher_key
from kdsearch.trainer_pool import processes_for, trainer_pool
from kdsearch.trial import StudyContext, objective

COMPLETE, RUNNING, WAITING = (optuna.trial.TrialState[s] for s in ("COMPLETE", "RUNNING", "WAITING"))


def require_visible_cuda(name: str, setting: str, fix: str) -> None:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdsearchError(f"{setting}: no CUDA device is visible here; {fix}")


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require_visible_cuda(name, f"--device {name}", "use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise KdsearchError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None


def prepare(cfg: StudyConfig, device: torch.device, cache_dir: Path, study_name: str, study_attrs: dict,
            tracking_uri: str | None) -> tuple[Dataset, Teacher, Normalizer, MlflowClient]:
    """Data on the device, the MLflow client and the study's teacher with its cached logits: checked before any
    study is created (and, for a study that exists, the data checked against it before any teacher is trained),
    as is every student family: a builder that does not import or build fails here, not in each trial."""
    data = load_dataset(cfg.data, cfg.seed)
    require_same_data(study_attrs, data, cfg, study_name)
    for family in families(cfg.student):
        build_student(student_spec(family, middle_knobs(cfg, family), data.input_shape, data.num_classes))
    key = require_same_teacher(study_attrs, cfg, data, device, study_name)
    client = tracking.open_client(tracking_uri, study_name)
    shared = TeacherRun(client, tracking.experiment_id(client, study_name), teacher_key(cfg, data, bf16=False),
                        cfg.search.heartbeat_interval, cfg.search.grace_period)
    data = dataclasses.replace(data, train=data.train.to(device), val=data.val.to(device), test=data.test.to(device))
    teacher = get_teacher(cfg, data, device, cache_dir, key, shared)  # its own .to(device) calls are no-ops now
    return data, teacher, Normalizer(data.mean, data.std, device), client


def require_same_data(study_attrs: dict, data: Dataset, cfg: StudyConfig, study_name: str) -> None:
    """A study resumes on the data it was made with: a changed dataset would mix students of two datasets."""
    made_with = study_attrs.get("data", {}).get("fingerprint")
    if made_with and made_with != data.fingerprint:
        raise KdsearchError(f"the data in '{cfg.data.data_dir}' differ from those study '{study_name}' was "
                            f"made with (digest {data.fingerprint} against {made_with}): restore them, or pass a new "
                            "--study-name to start a study on the data as they are now")


def require_same_teacher(study_attrs: dict, cfg: StudyConfig, data: Dataset, device: torch.device,
                         study_name: str) -> str:
    """The key of the teacher this session uses: the study's, which it resumes with, or this host's for a new
    study. New trials must not distill from another teacher, nor its figures (the hypervolume's reference) change
    under the old trials. The study's teacher may have been trained in another precision (bf16 on a GPU host): the
    hosts share it through MLflow (`get_teacher`)."""
    made_with = study_attrs.get("teacher", {}).get("key")
    key = teacher_key(cfg, data, device)
    if made_with and made_with not in (teacher_key(cfg, data, bf16=False), teacher_key(cfg, data, bf16=True)):
        raise KdsearchError(f"study '{study_name}' was made with teacher {made_with}, and this session's teacher "
                            f"would be {key} (its checkpoint file, its settings or kdsearch's teacher family "
                            "changed): restore them, or pass a new --study-name to start a study with this teacher")
    return made_with or key


def teacher_figures(teacher: Teacher) -> dict:
    figures = {k: teacher.metrics[k] for k in ("val_acc", "test_acc", "params", "flops", "latency_ms")}
    return {**figures, "seconds": teacher.metrics.get("seconds", 0.0)}


def start_tracking(cfg: StudyConfig, study: optuna.Study, data: Dataset, teacher: Teacher, client: MlflowClient
                   ) -> tuple[str, str]:
    exp_id = tracking.experiment_id(client, study.study_name)
    teacher_params = {**dataclasses.asdict(cfg.teacher), "dataset": cfg.data.dataset, "seed": cfg.seed}
    stored = study.user_attrs.get("teacher", {})
    figures = teacher_figures(teacher)
    if stored.get("key") == teacher.key:  # the study's first session measured it: one figure per study
        figures = {k: stored.get(k, v) for k, v in figures.items()}
    elif not teacher.latency_timed_now:  # a new study times its teacher beside its first students (the reference)
        figures["latency_ms"] = measure_latency(teacher.model, data.input_shape, cfg.latency, what="the teacher",
                                                normalize=(data.mean, data.std)).median_ms
    teacher_run_id = tracking.teacher_run(client, exp_id, teacher.key, teacher_params, figures,
                                          teacher.metrics.get("finished_at"), teacher.run_id, cfg.teacher.epochs)
    study_run_id = tracking.open_study_run(client, exp_id, study.study_name, study.user_attrs.get("mlflow_run_id"),
                                           study.user_attrs.get("uid"))
    study.set_user_attr("mlflow_run_id", study_run_id)
    study.set_user_attr("teacher", {**figures, "key": teacher.key, "mlflow_run_id": teacher_run_id})
    if "latency" not in study.user_attrs:  # what every latency of the study means, its teacher's included
        study.set_user_attr("latency", latency_settings(cfg.latency))
    study.set_user_attr("data", {"mean": list(data.mean), "std": list(data.std), "input_shape": list(data.input_shape),
                                 "num_classes": data.num_classes, "fingerprint": data.fingerprint})
    tracking.log_values(client, study_run_id, tags={"kdsearch.teacher_run_id": teacher_run_id})
    tracking.log_json(client, study_run_id, "config.json", {**cfg.to_dict(), "kdsearch_version": __version__,
                                                             "git_commit": git_commit()})
    return exp_id, study_run_id


def git_commit() -> str | None:
    """The commit of the kdsearch checkout this runs from, when it runs from one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def study_progress(study: optuna.Study, target: int, complete_only: bool, mine: int) -> str:
    """Workers: `[k/N complete]`, the study's complete trials against the target, whoever ran them. One process:
    `[i/n, k in the study]`, its own trials against its --n-trials and the study's finished trials (other
    machines may be adding theirs)."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    if complete_only:
        return f"[{states.count(COMPLETE)}/{target} complete]"
    return f"[{mine}/{target}, {sum(s.is_finished() for s in states)} in the study]"


def params_line(params: dict) -> str:
    """`arch separable width 1.23 depth 3 ... T 4.00 alpha 0.50 lr 0.055`: the family first, the shared knobs last."""
    shown = {"T" if k == "temperature" else k.split(".")[-1]: v for k, v in params.items()
             if k not in ("temperature", "alpha", "lr")}
    shown.update({"T": params.get("temperature", 0), "alpha": params.get("alpha", 0), "lr": params.get("lr", 0)})
    return " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def print_progress(target: int, started: float, complete_only: bool = False, status: TrialStatus | None = None):
    """An Optuna callback printing one line per finished trial (above the running trials' `status` line)."""
    lock = threading.Lock()  # trials may end in several threads (see `run_trials`)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with lock:
            callback.mine += 1
            mine = callback.mine
        head = (f"trial {trial.number:3d} {study_progress(study, target, complete_only, mine)} "
                f"{params_line(trial.params)}")
        a = trial.user_attrs
        cost = f"params {a['params']:,} latency {a['latency_ms']:.3f} ms" if "params" in a else ""
        if trial.state == optuna.trial.TrialState.COMPLETE:
            tail = f"val_acc {trial.values[0]:.4f} test_acc {a['test_acc']:.4f} {cost}"
        else:
            reason = a.get("prune_reason") or a.get("fail_reason", "")
            tail = f"{trial.state.name}{f' ({cost})' if cost else ''}: {reason}"
        if "baseline" in a:
            tail += f" [baseline {a['baseline']}]"
        if "warm_start" in a:
            tail += f" [warm start from {a['warm_start']}]"
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        line = f"{head} | {tail} | {seconds:.1f} s (elapsed {time.time() - started:.0f} s)"
        if status is not None:
            status.print(line)
        else:
            print(line, flush=True)
    callback.mine = 0
    return callback


def stop_on_repeated_failure(limit: int = 3):
    """Stop the study when the last `limit` trials of this session all failed with the same message."""
    reasons: list[str | None] = []

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        failed = trial.state == optuna.trial.TrialState.FAIL
        reasons.append(trial.user_attrs.get("fail_reason", "unknown error") if failed else None)
        last = reasons[-limit:]
        if len(last) == limit and last[0] is not None and last.count(last[0]) == limit:
            callback.reason = last[0]
            study.stop()
    callback.reason = None
    return callback


@dataclass
class Session:
    """A process's view of a study, ready to run trials."""

    study: optuna.Study
    ctx: StudyContext  # ctx.client is the session's MLflow client
    device: torch.device


def open_session(cfg: StudyConfig, *, study_name: str | None = None, storage: str = "sqlite:///optuna.db",
                 tracking_uri: str | None = None, device: str | None = None,
                 cache_dir: str | Path = ".kdsearch-cache", warm_start_from: str | None = None) -> Session:
    """Check the data, build or load the teacher, open the study and its MLflow runs: all before any trial."""
    dev = resolve_device(device)
    latency_device = cfg.latency.device
    require_visible_cuda(latency_device, f"latency.device = {latency_device!r}", "set latency.device = 'cpu'")
    configure_device(dev, cfg.engine.threads)
    started = time.time()
    made = peek_study_attrs(storage, study_name or cfg.name)
    cfg = as_it_was_made(cfg, made.get("config"))
    if cfg.latency.runtime == "onnxruntime" and cfg.latency.dtype != "float32":  # after: old studies timed in torch
        raise KdsearchError(f"latency.dtype = {cfg.latency.dtype!r} with latency.runtime = 'onnxruntime': its graph "
                            "is float32; set latency.runtime = 'torch' to time other dtypes")
    data, teacher, normalize, client = prepare(cfg, dev, Path(cache_dir), study_name or cfg.name, made, tracking_uri)
    print(f"teacher {teacher.key} ({teacher.source}): val_acc {teacher.metrics['val_acc']:.4f} test_acc "
          f"{teacher.metrics['test_acc']:.4f} params {teacher.metrics['params']:,} ({time.time() - started:.1f} s)",
          flush=True)
    tiny = build_model(Architecture(data.input_shape[0], data.num_classes, width=8, depth=1), data.input_shape[1])
    warm_up(data.input_shape, cfg.latency, tiny)  # after the teacher's line, whose time it is not
    store = open_storage(storage, stale_trial_callback(client), cfg.search.heartbeat_interval,
                         cfg.search.grace_period)
    study = open_study(cfg, study_name or cfg.name, store, warm_start_from)
    require_same_data(study.user_attrs, data, cfg, study.study_name)  # another process may have made it meanwhile
    lost = fail_dead_local_trials(study, client)
    if lost:
        print(f"trials {lost} were left RUNNING by a process that has ended: marked FAIL, their MLflow runs closed, "
              "and queued again", flush=True)
    runtime, why = runtime_of(cfg.latency)
    made = study.user_attrs.get("latency", {}).get("runtime")
    if made and runtime != made:  # one study, one latency axis: a host without ORT's CUDA provider would mix in eager
        raise KdsearchError(f"study '{study.study_name}' times latency in {made}, and this host would time it in "
                            f"{runtime} ({why}): run this study's workers where {made} can time it")
    exp_id, study_run_id = start_tracking(cfg, study, data, teacher, client)
    print(f"latency: timed in {runtime_label(study.user_attrs['latency'])}" + (f" ({why})" if why else "")
          + f"; the teacher's {study.user_attrs['teacher']['latency_ms']:.4g} ms", flush=True)
    return Session(study, StudyContext(cfg, data, teacher, normalize, client, exp_id, study_run_id), dev)


def run_study(cfg: StudyConfig, *, study_name: str | None = None, storage: str = "sqlite:///optuna.db",
              tracking_uri: str | None = None, device: str | None = None, cache_dir: str | Path = ".kdsearch-cache",
              reports_dir: str | Path = "reports", until_complete: int | None = None,
              report: bool = True, warm_start_from: str | None = None) -> optuna.Study:
    """Run (or resume) a study: `cfg.search.n_trials` more trials (or, as one of several workers, trials until
    the study holds `until_complete` complete ones), then write and log the report."""
    from kdsearch.report import report_study

    session = open_session(cfg, study_name=study_name, storage=storage, tracking_uri=tracking_uri, device=device,
                           cache_dir=cache_dir, warm_start_from=warm_start_from)
    study, client, run_id = session.study, session.ctx.client, session.ctx.study_run_id
    failures = stop_on_repeated_failure()
    finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    session.ctx.status = TrialStatus()
    progress = print_progress(until_complete or cfg.search.n_trials, time.time(), bool(until_complete),
                              session.ctx.status)
    callbacks = [progress, release_memory_after_failure, failures]
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our progress line replaces Optuna's
    print(f"study '{study.study_name}': {finished} trials so far, running "
          f"{f'until {until_complete} are complete' if until_complete else f'{cfg.search.n_trials} more'} "
          f"on {session.device}", flush=True)
    try:
        processes = processes_for(cfg, session.device, 1 if until_complete else cfg.search.n_trials)
        with long_lived_objects_frozen(), trainer_pool(session.ctx, processes) as at_once:
            if until_complete:
                run_until_complete(session, until_complete, callbacks, failures)
            else:
                run_trials(session, at_once, callbacks, failures)
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
        client.set_terminated(run_id, "FINISHED")
        report_study(study, Path(reports_dir), client)
        print(f"MLflow runs: {tracking.runs_page(client, session.ctx.experiment_id)}", flush=True)
    return study


def run_trials(session: Session, at_once: int, callbacks: list, failures) -> None:
    """`search.n_trials` trials, `at_once` at a time (each thread runs its own trials, one after the other), until
    `search.timeout` or `failures` stops them."""
    study, cfg = session.study, session.ctx.cfg
    if at_once == 1:
        study.optimize(lambda trial: objective(session.ctx, trial), n_trials=cfg.search.n_trials,
                       timeout=cfg.search.timeout or None, catch=(Exception,), callbacks=callbacks)
        return
    deadline = time.time() + cfg.search.timeout if cfg.search.timeout else math.inf
    lock, left, interrupted, errors = threading.Lock(), [cfg.search.n_trials], threading.Event(), []

    def take() -> bool:
        with lock:
            if left[0] <= 0 or failures.reason or time.time() >= deadline or interrupted.is_set():
                return False
            left[0] -= 1
            return True

    def work(done: threading.Event) -> None:
        try:
            while take():
                study.optimize(lambda trial: objective(session.ctx, trial), n_trials=1, catch=(Exception,),
                               callbacks=callbacks)
        except KeyboardInterrupt:  # Ctrl-C: the main thread handles it
            pass
        except Exception as e:  # noqa: BLE001 - raised again in the main thread
            errors.append(e)
            interrupted.set()
        finally:
            done.set()

    # Waited for through events, not `Thread.join`: before Python 3.13 a join that Ctrl-C interrupts can mark its
    # thread ended while it still runs (CPython gh-90882), and the trial it was ending was then left RUNNING.
    dones = [threading.Event() for _ in range(at_once)]
    threads = [threading.Thread(target=work, args=(done,), name=f"kdsearch-trials-{i}", daemon=True)
               for i, done in enumerate(dones)]
    with one_ask_at_a_time(study):
        try:  # a Ctrl-C while the threads start is handled like one while they run
            for thread in threads:
                thread.start()
            for done in dones:
                done.wait()
        except KeyboardInterrupt:  # the threads end their trials as interrupted once the processes are stopped
            interrupted.set()
            if session.ctx.pool is not None:
                session.ctx.pool.close()
            stop_waiting = time.time() + 60  # the threads end together once the processes are gone
            for thread, done in zip(threads, dones):
                if thread.ident is not None or thread.is_alive():  # started, or being started
                    done.wait(timeout=max(0.0, stop_waiting - time.time()))
            raise
    if errors:
        raise errors[0]


@contextlib.contextmanager
def one_ask_at_a_time(study: optuna.Study):
    """Serialise `study.ask` between this process's threads: on SQLite two threads could both take the same
    enqueued (WAITING) trial, as its row lock is a no-op there, and train it twice."""
    ask, lock = study.ask, threading.Lock()

    def locked_ask(*args, **kwargs):
        with lock:
            return ask(*args, **kwargs)

    study.ask = locked_ask
    try:
        yield
    finally:
        del study.ask


@contextlib.contextmanager
def long_lived_objects_frozen():
    """Keep the garbage collector off the objects that outlive the trials. torch, MLflow and pandas leave ~640k of
    them, and a full collection walked them all again: 0.3-0.6 s a pass, about one pass every two trials. What the
    trials allocate is still collected; the freeze (garbage caught in it included) ends with the trial loop."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


GIVE_UP_FACTOR = 5  # workers stop after this many trials per complete one asked for, when too few complete


def run_until_complete(session: Session, target: int, callbacks: list, failures, poll_s: float = 1.0) -> None:
    """One of several workers: take trials until the study holds `target` complete ones, `search.timeout` has
    passed, or `failures` stops it. While trials running elsewhere would reach the target, wait; a trial of a dead
    process on this host is failed and queued again, and one running elsewhere for far longer than trials take
    (a dead machine on a journal file, which has no heartbeats) is no longer waited for."""
    study, cfg, client = session.study, session.ctx.cfg, session.ctx.client
    deadline = time.time() + cfg.search.timeout if cfg.search.timeout else math.inf
    trials = study.get_trials(deepcopy=False)
    first, give_up_after = len(trials), GIVE_UP_FACTOR * max(1, target - sum(t.state == COMPLETE for t in trials))
    while not failures.reason and time.time() < deadline:
        optuna.storages.fail_stale_trials(study)
        fail_dead_local_trials(study, client)
        trials = study.get_trials(deepcopy=False)
        complete = sum(t.state == COMPLETE for t in trials)
        if complete >= target:
            return
        if len(trials) - first >= give_up_after:
            raise KdsearchError(_give_up_message(trials, complete, target, len(trials) - first))
        waiting = any(t.state == WAITING for t in trials)
        if complete + len(live_trials(trials, cfg.search.grace_period)) >= target and not waiting:
            time.sleep(poll_s)
            continue
        study.optimize(lambda trial: objective(session.ctx, trial), n_trials=1, catch=(Exception,),
                       callbacks=callbacks)


def live_trials(trials: list[optuna.trial.FrozenTrial], grace_period: float) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials worth waiting for: those started less than max(grace_period, 3x the slowest complete trial)
    ago."""
    took = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.state == COMPLETE]
    patience = max(grace_period, 3 * max(took, default=0.0))
    now = time.time()
    return [t for t in trials if t.state == RUNNING and t.datetime_start
            and now - t.datetime_start.timestamp() < patience]


def _give_up_message(trials: list[optuna.trial.FrozenTrial], complete: int, target: int, attempts: int) -> str:
    reasons = [t.user_attrs.get("prune_reason") or t.user_attrs.get("fail_reason") for t in trials]
    reason = next((r for r in reversed(reasons) if r), "see the trials' reasons in MLflow")
    return (f"stopped: only {complete} of {target} trials are complete after {attempts} more were tried (the last: "
            f"{reason}): loosen search.max_params, search.max_latency_ms or the pruner, then resume")
