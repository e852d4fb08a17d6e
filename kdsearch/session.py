"""A session: one process's view of a study, opened before any trial runs.

Opening one checks the device and the data, builds or loads the teacher (with its cached logits), opens the Optuna
study (see `study.py`) and its MLflow runs, and hands the trials a `StudyContext` with an in-process executor
(see `execution.py`). Everything a user can get wrong is refused here, in one line, before any work is recorded.
"""

from __future__ import annotations

import dataclasses
import subprocess
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
from kdsearch.engine import configure_device
from kdsearch.execution import InProcess, Workload
from kdsearch.measure import latency_settings, runtime_label, runtime_of, warm_up
from kdsearch.models import Architecture, build_model, build_student
from kdsearch.shared_teacher import TeacherRun
from kdsearch.storage import fail_dead_local_trials, open_storage, peek_study_attrs, stale_trial_callback
from kdsearch.students import middle_knobs, student_spec
from kdsearch.study import as_it_was_made, open_study
from kdsearch.teacher import Teacher, get_teacher, teacher_key
from kdsearch.trial import StudyContext


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
    study is created (and, for a study that exists, the data checked against it before any teacher is trained)."""
    data = checked_data(cfg, study_name, study_attrs)
    key = require_same_teacher(study_attrs, cfg, data, device, study_name)
    client = tracking.open_client(tracking_uri, study_name)
    shared = TeacherRun(client, tracking.experiment_id(client, study_name), teacher_key(cfg, data, bf16=False),
                        cfg.search.heartbeat_interval, cfg.search.grace_period)
    data = on_device(data, device)
    teacher = get_teacher(cfg, data, device, cache_dir, key, shared)  # its own .to(device) calls are no-ops now
    return data, teacher, Normalizer(data.mean, data.std, device), client


def checked_data(cfg: StudyConfig, study_name: str = "", study_attrs: dict | None = None) -> Dataset:
    """The study file's data, checked against the study's (when it exists), and every student family checked to
    build on it: a builder that does not import or build fails here, not in each trial."""
    data = load_dataset(cfg.data, cfg.seed)
    require_same_data(study_attrs or {}, data, cfg, study_name)
    for family in families(cfg.student):
        build_student(student_spec(family, middle_knobs(cfg, family), data.input_shape, data.num_classes))
    return data


def on_device(data: Dataset, device: torch.device) -> Dataset:
    return dataclasses.replace(data, train=data.train.to(device), val=data.val.to(device), test=data.test.to(device))


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
        figures["latency_ms"] = InProcess().measure_latency(teacher.model, data.input_shape, cfg.latency,
                                                            what="the teacher", normalize=(data.mean, data.std)
                                                            ).median_ms
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
    ctx = StudyContext(cfg, data, teacher, normalize, client, exp_id, study_run_id, executor=None)
    ctx.executor = InProcess(Workload.of(ctx))
    return Session(study, ctx, dev)
