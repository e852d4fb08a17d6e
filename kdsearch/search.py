"""The Optuna study: sample a student, distill it, measure it, return (val_acc, params, latency_ms).

Wires the distillation loop's per-epoch callback to MLflow; the test set is measured and logged, never returned.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from mlflow import MlflowClient

from kdsearch import KdsearchError, tracking
from kdsearch.config import StudyConfig
from kdsearch.data import Dataset, load_dataset
from kdsearch.distill import Normalizer, TrainSettings, accuracy, train
from kdsearch.engine import PhaseTimer, configure_device, prepare_model
from kdsearch.measure import Latency, count_flops, count_params, measure_latency, size_bytes
from kdsearch.models import Architecture, build_model, student_width
from kdsearch.teacher import Teacher, get_teacher

DIRECTIONS = ["maximize", "minimize", "minimize"]
OBJECTIVES = ["val_acc", "params", "latency_ms"]
# Settings that may change when a study is resumed; anything else must match the study's first session.
RESUMABLE_KEYS = ("n_trials", "timeout")


@dataclass
class StudyContext:
    """Everything a trial needs, built once per process."""

    cfg: StudyConfig
    data: Dataset  # on the training device
    teacher: Teacher
    normalize: Normalizer
    client: MlflowClient
    experiment_id: str
    study_run_id: str


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdsearchError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise KdsearchError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


def sample_student(trial: optuna.Trial, cfg: StudyConfig) -> dict:
    s, d = cfg.student, cfg.distill
    return {
        "width": trial.suggest_float("width", *s.width, log=True),
        "depth": trial.suggest_int("depth", *s.depth),
        "temperature": trial.suggest_float("temperature", *d.temperature, log=True),
        "alpha": trial.suggest_float("alpha", *d.alpha),
        "lr": trial.suggest_float("lr", *d.lr, log=True),
    }


def student_arch(cfg: StudyConfig, data: Dataset, width: float, depth: int) -> Architecture:
    return Architecture(data.input_shape[0], data.num_classes, student_width(cfg.student.base_width, width), depth,
                        cfg.student.convs_per_stage)


def trial_seed(study_seed: int, number: int) -> int:
    return study_seed * 1_000_003 + number


def objective(ctx: StudyContext, trial: optuna.Trial) -> tuple[float, int, float]:
    cfg, data = ctx.cfg, ctx.data
    timer = PhaseTimer(data.train.x.device)
    hp = sample_student(trial, cfg)
    seed = trial_seed(cfg.seed, trial.number)
    torch.manual_seed(seed)
    arch = student_arch(cfg, data, hp["width"], hp["depth"])
    model = build_model(arch, data.input_shape[1])
    with timer("measure"):
        cost, latency = measure_cost(model, data.input_shape, cfg)
    with timer("tracking"):
        run_params = {**hp, "channels": arch.channels(), "convs_per_stage": arch.convs_per_stage,
                      "epochs": cfg.distill.epochs, "batch_size": cfg.distill.batch_size, "seed": seed,
                      **{f"latency_{k}": v for k, v in latency.to_dict().items() if not k.endswith("_ms")}}
        run_id = tracking.start_trial_run(ctx.client, ctx.experiment_id, ctx.study_run_id, trial.study.study_name,
                                          trial.number, run_params)
        trial.set_user_attr("mlflow_run_id", run_id)
    try:
        with timer("train"):
            cost["val_acc"] = distill_student(ctx, model, hp, seed, run_id, timer)
        with timer("evaluate"):
            cost["test_acc"] = accuracy(model, data.test, ctx.normalize)
        with timer("tracking"):
            for key in ("test_acc", "flops", "size_bytes", "latency_iqr_ms"):
                trial.set_user_attr(key, cost[key])
            trial.set_user_attr("channels", arch.channels())
            tracking.log_values(ctx.client, run_id, metrics=cost, step=cfg.distill.epochs)
            _log_weights(ctx.client, run_id, model, arch)
        trial.set_user_attr("seconds", {k: round(v, 4) for k, v in timer.seconds.items()})
        tracking.log_values(ctx.client, run_id, metrics={f"time_{k}_s": v for k, v in timer.seconds.items()})
        tracking.end_trial_run(ctx.client, run_id, "COMPLETE")
    except KeyboardInterrupt:
        tracking.end_trial_run(ctx.client, run_id, "FAIL", "interrupted (Ctrl-C)", interrupted=True)
        raise
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        trial.set_user_attr("fail_reason", reason)
        tracking.end_trial_run(ctx.client, run_id, "FAIL", reason)
        raise
    return cost["val_acc"], cost["params"], cost["latency_ms"]


def measure_cost(model: torch.nn.Module, input_shape: tuple[int, ...], cfg: StudyConfig) -> tuple[dict, Latency]:
    """What the architecture costs, known before any training."""
    latency = measure_latency(model, input_shape, cfg.latency)
    cost = {"params": count_params(model), "flops": count_flops(model, input_shape), "size_bytes": size_bytes(model),
            "latency_ms": latency.median_ms, "latency_iqr_ms": latency.iqr_ms}
    return cost, latency


def distill_student(ctx: StudyContext, model: torch.nn.Module, hp: dict, seed: int, run_id: str,
                    timer: PhaseTimer) -> float:
    """Train the student in place against the teacher, logging each epoch to the trial's run; return val_acc."""
    cfg = ctx.cfg
    settings = TrainSettings(epochs=cfg.distill.epochs, lr=hp["lr"], batch_size=cfg.distill.batch_size,
                             weight_decay=cfg.distill.weight_decay, temperature=hp["temperature"],
                             alpha=hp["alpha"], seed=seed, augment=cfg.data.augment)
    prepare_model(model, ctx.data.train.x.device)
    trainable = torch.compile(model) if cfg.engine.compile else model

    def log_epoch(epoch: int, train_loss: float, val_acc: float) -> None:
        with timer("tracking"):
            tracking.log_values(ctx.client, run_id, metrics={"train_loss": train_loss, "val_acc": val_acc}, step=epoch)

    teacher = ctx.teacher.targets(cfg.data.augment)
    return train(trainable, ctx.data.train, ctx.data.val, ctx.normalize, settings, teacher, log_epoch, timer)


def _log_weights(client: MlflowClient, run_id: str, model: torch.nn.Module, arch: Architecture) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"arch": arch.to_dict(), "state_dict": model.state_dict()}, Path(tmp) / "student.pt")
        client.log_artifact(run_id, str(Path(tmp) / "student.pt"))


def open_study(cfg: StudyConfig, study_name: str, storage: str) -> optuna.Study:
    """Create the study, or load it when it exists and was made from the same study file."""
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, directions=DIRECTIONS,
                                    load_if_exists=True)
    except (ValueError, ImportError, optuna.exceptions.StorageInternalError) as e:
        raise KdsearchError(f"cannot open Optuna storage {storage!r} ({str(e).splitlines()[0]}): pass a valid "
                            "--storage URL such as sqlite:///optuna.db") from None
    if [d.name.lower() for d in study.directions] != DIRECTIONS:
        raise KdsearchError(f"study '{study_name}' exists with other objectives: pass a new --study-name")
    wanted = _comparable(cfg)
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", wanted)
    elif stored != wanted:
        raise KdsearchError(f"study '{study_name}' exists with a different study file: pass a new --study-name, "
                            "or resume with the file it was started with")
    study.sampler = make_sampler(cfg.search.sampler, cfg.seed + len(study.trials))  # no repeats on resume
    return study


def _comparable(cfg: StudyConfig) -> dict:
    """The config as the study stores it (JSON: ranges become lists), less what may change on resume."""
    d = json.loads(json.dumps(cfg.to_dict()))
    for key in RESUMABLE_KEYS:
        d["search"].pop(key)
    d["data"].pop("data_dir")
    return d


def prepare(cfg: StudyConfig, device: torch.device, cache_dir: Path) -> tuple[Dataset, Teacher, Normalizer]:
    """Data on the device and the teacher with its cached logits: checked before any study is created."""
    data = load_dataset(cfg.data, cfg.seed)
    teacher = get_teacher(cfg, data, device, cache_dir)
    data = dataclasses.replace(data, train=data.train.to(device), val=data.val.to(device), test=data.test.to(device))
    return data, teacher, Normalizer(data.mean, data.std, device)


def teacher_figures(teacher: Teacher) -> dict:
    return {k: teacher.metrics[k] for k in ("val_acc", "test_acc", "params", "flops", "latency_ms")}


def start_tracking(cfg: StudyConfig, study: optuna.Study, teacher: Teacher, tracking_uri: str | None
                   ) -> tuple[MlflowClient, str, str]:
    client = tracking.client_for(tracking_uri)
    exp_id = tracking.experiment_id(client, study.study_name)
    t = cfg.teacher
    teacher_params = {"arch": t.arch, "width": t.width, "depth": t.depth, "convs_per_stage": t.convs_per_stage,
                      "epochs": t.epochs, "lr": t.lr, "batch_size": t.batch_size, "checkpoint": t.checkpoint,
                      "dataset": cfg.data.dataset, "seed": cfg.seed}
    teacher_run_id = tracking.teacher_run(client, exp_id, teacher.key, teacher_params, teacher_figures(teacher))
    study_run_id = tracking.open_study_run(client, exp_id, study.study_name, study.user_attrs.get("mlflow_run_id"))
    study.set_user_attr("mlflow_run_id", study_run_id)
    study.set_user_attr("teacher", {**teacher_figures(teacher), "mlflow_run_id": teacher_run_id})
    tracking.log_values(client, study_run_id, tags={"kdsearch.teacher_run_id": teacher_run_id})
    tracking.log_json(client, study_run_id, "config.json", cfg.to_dict())
    return client, exp_id, study_run_id


def print_progress(total: int, started: float):
    """An Optuna callback printing one line per finished trial."""
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        p = trial.params
        head = (f"trial {trial.number:3d} [{callback.done + 1}/{total}] width {p.get('width', 0):.2f} "
                f"depth {p.get('depth', 0)} T {p.get('temperature', 0):5.2f} alpha {p.get('alpha', 0):.2f} "
                f"lr {p.get('lr', 0):.3f}")
        if trial.state == optuna.trial.TrialState.COMPLETE:
            acc, params, latency = trial.values
            tail = (f"val_acc {acc:.4f} test_acc {trial.user_attrs['test_acc']:.4f} params {int(params):,} "
                    f"latency {latency:.3f} ms")
        else:
            tail = f"{trial.state.name}: {trial.user_attrs.get('fail_reason', '')}"
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        print(f"{head} | {tail} | {seconds:.1f} s (elapsed {time.time() - started:.0f} s)", flush=True)
        callback.done += 1
    callback.done = 0
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


def run_study(cfg: StudyConfig, *, study_name: str | None = None, storage: str = "sqlite:///optuna.db",
              tracking_uri: str | None = None, device: str | None = None, cache_dir: str | Path = ".kdsearch-cache",
              reports_dir: str | Path = "reports") -> optuna.Study:
    """Run (or resume) a study: `cfg.search.n_trials` more trials, then write and log the report."""
    from kdsearch.report import report_study

    study_name = study_name or cfg.name
    dev = resolve_device(device)
    configure_device(dev, cfg.engine.threads)
    started = time.time()
    data, teacher, normalize = prepare(cfg, dev, Path(cache_dir))
    print(f"teacher {teacher.key}: val_acc {teacher.metrics['val_acc']:.4f} test_acc {teacher.metrics['test_acc']:.4f}"
          f" params {teacher.metrics['params']:,} ({time.time() - started:.1f} s)", flush=True)
    study = open_study(cfg, study_name, storage)
    client, exp_id, study_run_id = start_tracking(cfg, study, teacher, tracking_uri)
    ctx = StudyContext(cfg, data, teacher, normalize, client, exp_id, study_run_id)
    failures = stop_on_repeated_failure()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our progress line replaces Optuna's
    print(f"study '{study_name}': {len(study.trials)} trials so far, running {cfg.search.n_trials} more on {dev}",
          flush=True)
    try:
        study.optimize(lambda trial: objective(ctx, trial), n_trials=cfg.search.n_trials,
                       timeout=cfg.search.timeout or None, catch=(Exception,),
                       callbacks=[print_progress(cfg.search.n_trials, time.time()), failures])
    except KeyboardInterrupt:
        client.set_terminated(study_run_id, "KILLED")
        raise
    client.set_terminated(study_run_id, "FINISHED")
    if failures.reason:
        raise KdsearchError(f"stopped: the last trials all failed with '{failures.reason}': fix the cause and "
                            f"run the same command again to resume")
    report_study(study, Path(reports_dir), client)
    return study
