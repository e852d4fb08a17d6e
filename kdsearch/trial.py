"""One trial: sample a student, measure its cost, distill it, and record it on both sides.

Wires the distillation loop's per-epoch callback to MLflow and to the pruner; the test set is measured and
logged, never returned to the sampler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from mlflow import MlflowClient

from kdsearch import KdsearchError, tracking
from kdsearch.config import StudyConfig
from kdsearch.credentials import masked
from kdsearch.data import Dataset
from kdsearch.distill import Normalizer, TrainSettings, correct
from kdsearch.engine import PhaseTimer, prepare_model
from kdsearch.measure import count_flops, count_params, deployable, measure_latency, size_bytes
from kdsearch.models import FAMILIES, StudentSpec, build_student, channels_of
from kdsearch.onnx_graph import TORCH_GLOBALS
from kdsearch.progress import TrialStatus
from kdsearch.pruning import NoPruner, Pruned, epoch_pruner, limit_reason, limit_violations
from kdsearch.storage import worker_identity
from kdsearch.students import sample_student, student_spec, training_settings
from kdsearch.study import trial_seed
from kdsearch.teacher import Teacher
from kdsearch.timing_lock import timing_alone, training_epoch
from kdsearch.trainer_pool import TrainerPool, Workload, train_locally


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
    costs: dict = field(default_factory=dict)  # this process's copy of the study's costs (see `study_cost`)
    pool: TrainerPool | None = None  # processes that train the students (see `trainer_pool`), or none
    status: TrialStatus | None = None  # the running trials' status line on the console, or none


def objective(ctx: StudyContext, trial: optuna.Trial) -> float | tuple[float, int, float]:
    """Sample, build and measure a student; reject it if it breaks a limit; distill it; log everything. A trial
    that fails carries its reason (`fail_reason`), whatever failed."""
    try:
        return _objective(ctx, trial)
    except optuna.TrialPruned:
        raise
    except Exception as e:
        if not trial.user_attrs.get("fail_reason"):
            trial.set_user_attr("fail_reason", str(e) if isinstance(e, KdsearchError) else unexpected(e))
        if "mlflow_run_id" not in trial.user_attrs:  # it failed before its run started: the run says why too
            _failed_run(ctx, trial, trial.user_attrs["fail_reason"])
        raise


def _failed_run(ctx: StudyContext, trial: optuna.Trial, reason: str) -> None:
    """A FAILED run for a trial that failed before its own run started (unless MLflow itself is what failed)."""
    with contextlib.suppress(Exception):
        run_id = tracking.start_trial_run(ctx.client, ctx.experiment_id, ctx.study_run_id, trial.study.study_name,
                                          trial.number, dict(trial.params))
        trial.set_user_attr("mlflow_run_id", run_id)
        tracking.end_trial_run(ctx.client, run_id, "FAIL", reason)


def _objective(ctx: StudyContext, trial: optuna.Trial) -> float | tuple[float, int, float]:
    cfg, data = ctx.cfg, ctx.data
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
    for name in ("params", "latency_ms", "flops", "size_bytes", "latency_iqr_ms"):
        trial.set_user_attr(name, cost[name])
    trial.set_user_attr("family", family)
    trial.set_user_attr("channels", channels_of(model))
    for name, value in limit_violations(cost, cfg.search).items():
        trial.set_constraint(name, value)  # the sampler steers away from students over a limit
    pruner = NoPruner() if "baseline" in trial.user_attrs else epoch_pruner(cfg.search, cfg.distill.epochs)
    with timer("tracking"):
        training = training_settings(cfg, family)
        trial.set_user_attr("training", training)
        run_params = {**knobs, **hp, "family": family,
                      "channels": channels_of(model), **training,
                      "epochs": cfg.distill.epochs, "batch_size": cfg.distill.batch_size, "seed": seed,
                      **{f"latency_{k}": v for k, v in latency.items() if not k.endswith("_ms")}}
        run_id = tracking.start_trial_run(ctx.client, ctx.experiment_id, ctx.study_run_id, trial.study.study_name,
                                          trial.number, run_params)
        trial.set_user_attr("mlflow_run_id", run_id)
    try:
        reason = limit_reason(cost, cfg.search)
        if reason:
            raise Pruned(reason)
        pruner.before_training(trial, cost)
        with timer("train"):
            cost["val_acc"] = distill_student(ctx, trial, model, {**hp, **training}, seed, run_id, timer, pruner)
        with timer("evaluate"), training_epoch():  # compute like an epoch's: never beside a latency timing
            test_right = correct(model, data.test, ctx.normalize)
            cost["test_acc"] = test_right.float().mean().item()
            if "baseline" in trial.user_attrs:  # the KD gain's standard error pairs the baselines image by image
                trial.set_user_attr("test_correct", bits_of(test_right.cpu().tolist()))
                trial.set_user_attr("val_correct", bits_of(correct(model, data.val, ctx.normalize).cpu().tolist()))
        with timer("tracking"):
            trial.set_user_attr("test_acc", cost["test_acc"])
            settled = settled_latency(trial.study, key, cost["latency_ms"])
            if settled != cost["latency_ms"]:
                cost["latency_ms"] = settled
                trial.set_user_attr("latency_ms", settled)
            _log_weights(ctx.client, run_id, model, spec)
        trial.set_user_attr("seconds", {k: round(v, 4) for k, v in timer.seconds.items()})
        times = {f"time_{k}_s": v for k, v in timer.seconds.items()}
        tracking.end_trial_run(ctx.client, run_id, "COMPLETE", metrics={**cost, **times}, step=cfg.distill.epochs)
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
    if cfg.search.mode == "budget":
        return cost["val_acc"]
    return cost["val_acc"], cost["params"], cost["latency_ms"]


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


def measure_cost(model: torch.nn.Module, input_shape: tuple[int, ...], cfg: StudyConfig, timer=None,
                 timed: torch.nn.Module | bytes | None = None) -> dict:
    """What the architecture costs, known before any training, with the settings its latency was timed with;
    `timed` is what `measure.deployable` made of the model, when it was made beforehand."""
    latency = measure_latency(model if timed is None else timed, input_shape, cfg.latency, timer)
    return {"params": count_params(model), "flops": count_flops(model, input_shape), "size_bytes": size_bytes(model),
            "latency_ms": latency.median_ms, "latency_iqr_ms": latency.iqr_ms, "latency": latency.to_dict()}


def cost_key(spec: StudentSpec, model: torch.nn.Module) -> str:
    """The architecture actually built: its family, the data's shape and a digest of its layers and tensor shapes
    (and, for a user builder, of its knobs too: they may act in ways neither shows). Knob values that build the same
    network (two width multipliers rounded to the same channel counts) share one key."""
    shapes = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    knobs = spec.knobs if spec.family not in FAMILIES else {}
    text = json.dumps([repr(model), shapes, knobs], sort_keys=True, default=str)
    layers = hashlib.sha256(text.encode()).hexdigest()[:16]
    arch = {"family": spec.family, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes,
            "layers": layers}
    return "cost:" + json.dumps(arch, sort_keys=True, separators=(",", ":"))


def study_cost(ctx: StudyContext, study: optuna.Study, key: str, model: torch.nn.Module,
               what: str = "the student") -> dict:
    """One cost per architecture per study, whoever measures it: the first process to need it measures it (under
    the host's latency lock, see `measure_latency`) and stores it in the study, where every other worker and every
    later session reads it. Its ONNX graph is made and checked before the lock is taken; an architecture that
    cannot be exported raises a KdsearchError naming `what`."""
    if key not in ctx.costs:
        stored = _stored_cost(study, key)
        if stored is None:
            timed = deployed(ctx, key, model, what)
            with timing_alone():
                stored = _stored_cost(study, key)  # another worker on this host may have measured it meanwhile
                if stored is None:
                    timer = ctx.pool.time_latency if ctx.pool is not None else None
                    stored = measure_cost(model, ctx.data.input_shape, ctx.cfg, timer, timed)
                    study.set_user_attr(key, stored)
        ctx.costs[key] = stored
    return json.loads(json.dumps(ctx.costs[key]))  # a copy


_GRAPHS: dict[tuple, bytes] = {}  # the ONNX graphs this process has made and checked, by architecture and data


def deployed(ctx: StudyContext, key: str, model: torch.nn.Module, what: str) -> torch.nn.Module | bytes:
    """What the runtime times for architecture `key` (see `measure.deployable`): an ONNX graph is made and checked
    once per process and architecture (0.5 s each here), since any model of an architecture times alike."""
    normalize = (tuple(ctx.data.mean), tuple(ctx.data.std))
    memo = (key, normalize, ctx.cfg.latency.runtime, ctx.cfg.latency.device)
    if memo not in _GRAPHS:
        make = ctx.pool.deployable if ctx.pool is not None else deployable
        timed = make(model, ctx.data.input_shape, ctx.cfg.latency, what, normalize)
        if not isinstance(timed, bytes):
            return timed
        _GRAPHS[memo] = timed
    return _GRAPHS[memo]


def settled_latency(study: optuna.Study, key: str, measured: float) -> float:
    """The study's latency for `arch` when the trial ends. Two machines that measured the same new architecture
    at the same moment both stored theirs and the last write stands; by the end of training both read that one."""
    stored = _stored_cost(study, key)
    return stored["latency_ms"] if stored else measured


def _stored_cost(study: optuna.Study, key: str) -> dict | None:
    return study._storage.get_study_user_attrs(study._study_id).get(key)  # one attribute read, not the trials


def bits_of(flags: list) -> str:
    """Which images a model got right, as a hex string of bits (12,000 images: 3,000 characters); a leading 1 bit
    keeps leading zeros (read back with `figures.paired_se`)."""
    return format(int("1" + "".join("1" if f else "0" for f in flags), 2), "x")


def distill_student(ctx: StudyContext, trial: optuna.Trial, model: torch.nn.Module, hp: dict, seed: int,
                    run_id: str, timer: PhaseTimer, pruner: NoPruner) -> float:
    """Train the student in place against the teacher; log each epoch to the trial's run and offer it to the
    pruner; return the final val_acc."""
    cfg = ctx.cfg
    settings = TrainSettings(epochs=cfg.distill.epochs, lr=hp["lr"], batch_size=cfg.distill.batch_size,
                             weight_decay=cfg.distill.weight_decay, temperature=hp["temperature"],
                             alpha=hp["alpha"], seed=seed, augment=cfg.data.augment, schedule=hp["schedule"],
                             decay_norms=hp["decay_norms"], label_smoothing=hp["label_smoothing"])
    prepare_model(model, ctx.data.train.y.device)
    history: list[float] = []
    epochs = tracking.MetricBuffer(ctx.client, run_id)

    def log_epoch(epoch: int, train_loss: float, val_acc: float) -> None:
        with timer("tracking"):
            epochs.add({"train_loss": train_loss, "val_acc": val_acc}, step=epoch)
            history.append(val_acc)
            if ctx.status is not None:
                ctx.status.epoch(trial.number, epoch, cfg.distill.epochs, val_acc)
        if epoch < cfg.distill.epochs:  # after the last epoch the result is known: completing it costs nothing
            pruner.after_epoch(trial, epoch, val_acc)

    if ctx.status is not None:
        ctx.status.started(trial.number)
    try:
        if ctx.pool is not None:
            return ctx.pool.train(model, settings, log_epoch, timer)
        return train_locally(Workload.of(ctx), model, settings, log_epoch, timer)
    finally:  # once, however training ends: the pruner reads it from finished trials only (MLflow has each epoch)
        if ctx.status is not None:
            ctx.status.ended(trial.number)
        with timer("tracking"):
            epochs.flush()
            if history:
                trial.set_user_attr("val_acc_history", history)


def _log_weights(client: MlflowClient, run_id: str, model: torch.nn.Module, spec: StudentSpec) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save({"spec": spec.to_dict(), "state_dict": state}, Path(tmp) / "student.pt")
        client.log_artifact(run_id, str(Path(tmp) / "student.pt"))
