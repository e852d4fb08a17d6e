"""One trial: sample a student, build it, cost it, prune it before training if it cannot make the cut, distill it
with a report per epoch, and record it on both sides (Optuna and MLflow).

`objective` reads top to bottom like optuna-examples' `objective(trial)`. Where the student trains and is timed
(this process or the trainer pool) is the session's `executor`; the test set is measured and logged, never
returned to the sampler.
"""

from __future__ import annotations

import contextlib
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from mlflow import MlflowClient

from kdsearch import KdsearchError, tracking
from kdsearch.config import StudyConfig
from kdsearch.costs import cost_key, settled_latency, study_cost
from kdsearch.credentials import masked
from kdsearch.data import Dataset
from kdsearch.distill import Normalizer, TrainSettings, correct
from kdsearch.engine import PhaseTimer, prepare_model
from kdsearch.execution import Executor
from kdsearch.models import StudentSpec, build_student, channels_of
from kdsearch.onnx_graph import TORCH_GLOBALS
from kdsearch.progress import TrialStatus
from kdsearch.pruning import NoPruner, Pruned, epoch_pruner, limit_reason, limit_violations
from kdsearch.storage import worker_identity
from kdsearch.students import sample_student, student_spec, train_settings
from kdsearch.study import trial_seed
from kdsearch.teacher import Teacher
from kdsearch.timing_lock import training_epoch


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
    executor: Executor  # where students train and are timed (see `execution.py`)
    costs: dict = field(default_factory=dict)  # this process's copy of the study's costs (see `costs.study_cost`)
    status: TrialStatus | None = None  # the running trials' status line on the console, or none


def objective(ctx: StudyContext, trial: optuna.Trial) -> float | tuple[float, int, float]:
    """Sample, build and cost a student; reject it if it breaks a limit or cannot make the front; distill it; log
    everything. A trial that fails carries its reason (`fail_reason`), whatever failed."""
    cfg, data = ctx.cfg, ctx.data
    with failure_recorded(ctx, trial):
        for key, value in worker_identity().items():  # first: a process that dies from here on can be found
            trial.set_user_attr(key, value)
        timer = PhaseTimer(data.train.y.device)
        family, knobs, hp = sample_student(trial, cfg)
        seed = trial.user_attrs.get("seed", trial_seed(cfg.seed, trial.number))  # a baseline pair shares one seed
        spec = student_spec(family, knobs, data.input_shape, data.num_classes)
        model = seeded_student(spec, seed)
        key = cost_key(spec, model)
        with timer("measure"):
            cost = study_cost(ctx, trial.study, key, model, f"the {family} student")
            latency = cost.pop("latency")
        record_cost(trial, cfg, family, model, cost)
        pruner = NoPruner() if "baseline" in trial.user_attrs else epoch_pruner(cfg.search, cfg.distill.epochs)
        settings = train_settings(cfg, family, hp, seed)
        with timer("tracking"):
            run_id = start_run(ctx, trial, {**knobs, **hp, "family": family, "channels": channels_of(model)},
                               settings, latency)
        with run_ended(ctx, trial, run_id):
            reason = limit_reason(cost, cfg.search)
            if reason:
                raise Pruned(reason)
            pruner.before_training(trial, cost)
            with timer("train"):
                cost["val_acc"] = distill_student(ctx, trial, model, settings, run_id, timer, pruner)
            with timer("evaluate"), training_epoch():  # compute like an epoch's: never beside a latency timing
                cost["test_acc"] = test_accuracy(ctx, trial, model)
            with timer("tracking"):
                trial.set_user_attr("test_acc", cost["test_acc"])
                cost["latency_ms"] = settle_latency(trial, key, cost["latency_ms"])
                log_weights(ctx.client, run_id, model, spec)
            trial.set_user_attr("seconds", {k: round(v, 4) for k, v in timer.seconds.items()})
            times = {f"time_{k}_s": v for k, v in timer.seconds.items()}
            tracking.end_trial_run(ctx.client, run_id, "COMPLETE", metrics={**cost, **times}, step=cfg.distill.epochs)
    if cfg.search.mode == "budget":
        return cost["val_acc"]
    return cost["val_acc"], cost["params"], cost["latency_ms"]


@contextlib.contextmanager
def failure_recorded(ctx: StudyContext, trial: optuna.Trial):
    """Whatever fails in the trial, it carries the reason; one that failed before its MLflow run started gets a
    FAILED run saying why too."""
    try:
        yield
    except optuna.TrialPruned:
        raise
    except Exception as e:
        if not trial.user_attrs.get("fail_reason"):
            trial.set_user_attr("fail_reason", str(e) if isinstance(e, KdsearchError) else unexpected(e))
        if "mlflow_run_id" not in trial.user_attrs:
            _failed_run(ctx, trial, trial.user_attrs["fail_reason"])
        raise


@contextlib.contextmanager
def run_ended(ctx: StudyContext, trial: optuna.Trial, run_id: str):
    """The trial's MLflow run ends as the trial does: PRUNED with the reason, FAILED with the error, or KILLED
    when interrupted (Ctrl-C)."""
    try:
        yield
    except Pruned as e:
        trial.set_user_attr("prune_reason", e.reason)
        if e.by_trial is not None:
            trial.set_user_attr("pruned_by", e.by_trial)
        tracking.end_trial_run(ctx.client, run_id, "PRUNED", e.reason)
        raise
    except KeyboardInterrupt:
        tracking.end_trial_run(ctx.client, run_id, "FAIL", "interrupted (Ctrl-C)", interrupted=True)
        raise
    except Exception as e:
        reason = masked(f"{type(e).__name__}: {e}")
        trial.set_user_attr("fail_reason", reason)
        tracking.end_trial_run(ctx.client, run_id, "FAIL", reason)
        raise


def _failed_run(ctx: StudyContext, trial: optuna.Trial, reason: str) -> None:
    """A FAILED run for a trial that failed before its own run started (unless MLflow itself is what failed)."""
    with contextlib.suppress(Exception):
        run_id = tracking.start_trial_run(ctx.client, ctx.experiment_id, ctx.study_run_id, trial.study.study_name,
                                          trial.number, dict(trial.params))
        trial.set_user_attr("mlflow_run_id", run_id)
        tracking.end_trial_run(ctx.client, run_id, "FAIL", reason)


def unexpected(e: Exception) -> str:
    """An error nobody foresaw, with where it was raised: `KeyError: 'x' (at torch/fx/traceback.py:363)`."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {'/'.join(Path(frames[-1].filename).parts[-3:])}:{frames[-1].lineno})" if frames else ""
    return masked(f"{type(e).__name__}: {e}{where}")


def seeded_student(spec: StudentSpec, seed: int) -> torch.nn.Module:
    """The student with the initial weights its seed gives, also while other threads build theirs (parallel
    trials): torch's global generator is shared by them."""
    with TORCH_GLOBALS:
        torch.manual_seed(seed)
        return build_student(spec)


def record_cost(trial: optuna.Trial, cfg: StudyConfig, family: str, model: torch.nn.Module, cost: dict) -> None:
    """The student's cost on the trial, and its distance over each limit as a constraint: the sampler steers away
    from students over a limit."""
    for name in ("params", "latency_ms", "flops", "size_bytes", "latency_iqr_ms"):
        trial.set_user_attr(name, cost[name])
    trial.set_user_attr("family", family)
    trial.set_user_attr("channels", channels_of(model))
    for name, value in limit_violations(cost, cfg.search).items():
        trial.set_constraint(name, value)


def start_run(ctx: StudyContext, trial: optuna.Trial, sampled: dict, settings: TrainSettings, latency: dict) -> str:
    """The trial's MLflow run, nested under the study's, with what was sampled, how it trains and what its
    latency was timed with."""
    training = {k: getattr(settings, k) for k in ("schedule", "decay_norms", "label_smoothing")}
    trial.set_user_attr("training", training)
    params = {**sampled, **training, "epochs": settings.epochs, "batch_size": settings.batch_size,
              "seed": settings.seed, **{f"latency_{k}": v for k, v in latency.items() if not k.endswith("_ms")}}
    run_id = tracking.start_trial_run(ctx.client, ctx.experiment_id, ctx.study_run_id, trial.study.study_name,
                                      trial.number, params)
    trial.set_user_attr("mlflow_run_id", run_id)
    return run_id


def test_accuracy(ctx: StudyContext, trial: optuna.Trial, model: torch.nn.Module) -> float:
    """The student's test accuracy. A baseline also keeps which images it got right: the KD gain's standard error
    pairs the baselines image by image."""
    test_right = correct(model, ctx.data.test, ctx.normalize)
    if "baseline" in trial.user_attrs:
        trial.set_user_attr("test_correct", bits_of(test_right.cpu().tolist()))
        trial.set_user_attr("val_correct", bits_of(correct(model, ctx.data.val, ctx.normalize).cpu().tolist()))
    return test_right.float().mean().item()


def settle_latency(trial: optuna.Trial, key: str, measured: float) -> float:
    """The study's latency for the architecture as the trial ends (see `costs.settled_latency`), on the trial too."""
    settled = settled_latency(trial.study, key, measured)
    if settled != measured:
        trial.set_user_attr("latency_ms", settled)
    return settled


def bits_of(flags: list) -> str:
    """Which images a model got right, as a hex string of bits (12,000 images: 3,000 characters); a leading 1 bit
    keeps leading zeros (read back with `scores.paired_se`)."""
    return format(int("1" + "".join("1" if f else "0" for f in flags), 2), "x")


def distill_student(ctx: StudyContext, trial: optuna.Trial, model: torch.nn.Module, settings: TrainSettings,
                    run_id: str, timer: PhaseTimer, pruner: NoPruner) -> float:
    """Train the student in place against the teacher; log each epoch to the trial's run and offer it to the
    pruner; return the final val_acc."""
    epochs = settings.epochs
    prepare_model(model, ctx.data.train.y.device)
    history: list[float] = []
    buffer = tracking.MetricBuffer(ctx.client, run_id)

    def log_epoch(epoch: int, train_loss: float, val_acc: float) -> None:
        with timer("tracking"):
            buffer.add({"train_loss": train_loss, "val_acc": val_acc}, step=epoch)
            history.append(val_acc)
            if ctx.status is not None:
                ctx.status.epoch(trial.number, epoch, epochs, val_acc)
        if epoch < epochs:  # after the last epoch the result is known: completing it costs nothing
            pruner.after_epoch(trial, epoch, val_acc)

    if ctx.status is not None:
        ctx.status.started(trial.number)
    try:
        return ctx.executor.train(model, settings, log_epoch, timer)
    finally:  # once, however training ends: the pruner reads it from finished trials only (MLflow has each epoch)
        if ctx.status is not None:
            ctx.status.ended(trial.number)
        with timer("tracking"):
            buffer.flush()
            if history:
                trial.set_user_attr("val_acc_history", history)


def log_weights(client: MlflowClient, run_id: str, model: torch.nn.Module, spec: StudentSpec) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save({"spec": spec.to_dict(), "state_dict": state}, Path(tmp) / "student.pt")
        client.log_artifact(run_id, str(Path(tmp) / "student.pt"))
