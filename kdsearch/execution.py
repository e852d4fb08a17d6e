"""Where a trial's work runs, behind one interface: `train` a student on the session's workload, make what the
latency runtime times (`deployable`) and time it (`time_latency`, or `measure_latency` for both at once).

`InProcess` does all of it in this process. `TrainerPool` (see `trainer_pool.py`) does it in forked processes, one
trial each, and falls back to this process by itself where they cannot (a student that cannot be pickled, a dead
process). A trial, the study's set-up and the teacher call the same methods and never ask which they hold:
`parallel_execution` swaps the session's executor for a pool while trials run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass

import torch
from torch import nn

from kdsearch.config import LatencyConfig
from kdsearch.data import Split, StreamingSplit
from kdsearch.distill import Normalizer, TeacherTargets, TrainSettings, fit
from kdsearch.engine import no_timer
from kdsearch.measure import Latency, deployable, measure_latency, time_deployed
from kdsearch.onnx_graph import TORCH_GLOBALS
from kdsearch.timing_lock import training_epoch


@dataclass
class Workload:
    """What training a student needs from the session; a pooled process is sent it once."""

    train: Split | StreamingSplit
    val: Split | StreamingSplit
    normalize: Normalizer
    targets: TeacherTargets  # the teacher's cached logits, or its model where augmentation needs it on every batch
    compile: bool

    @classmethod
    def of(cls, ctx) -> Workload:
        """The workload of a session's context (anything with cfg, data, teacher and normalize)."""
        return cls(ctx.data.train, ctx.data.val, ctx.normalize, ctx.teacher.targets(ctx.cfg.data.augment),
                   ctx.cfg.engine.compile)


class Executor:
    """The interface. `train` trains `model` in place (as `distill.fit` does), calling `on_epoch(epoch, train_loss,
    val_acc)` after each epoch in this process, and returns the final val_acc; `deployable` is
    `measure.deployable`; `time_latency` is `measure.time_deployed`, called under `timing_alone`."""

    def train(self, model: nn.Module, settings: TrainSettings, on_epoch=None, timer=no_timer) -> float:
        raise NotImplementedError

    def deployable(self, model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig, what: str = "the student",
                   normalize: tuple | None = None) -> nn.Module | bytes:
        raise NotImplementedError

    def time_latency(self, timed: nn.Module | bytes, input_shape: tuple[int, ...], cfg: LatencyConfig) -> Latency:
        raise NotImplementedError

    def measure_latency(self, model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig,
                        what: str = "the student", normalize: tuple | None = None,
                        timed: nn.Module | bytes | None = None) -> Latency:
        """What the runtime times (`timed`, where it was made beforehand), made outside the timing lock, then
        timed alone on this host."""
        if timed is None:
            timed = self.deployable(model, input_shape, cfg, what, normalize)
        return measure_latency(timed, input_shape, cfg, self.time_latency)

    def close(self) -> None:
        """Stop whatever runs elsewhere (Ctrl-C): trials under way then end as interrupted."""


class InProcess(Executor):
    """Everything in this process. Without a workload it only times (the teacher, before the session has one)."""

    def __init__(self, work: Workload | None = None):
        self.work = work

    def train(self, model: nn.Module, settings: TrainSettings, on_epoch=None, timer=no_timer) -> float:
        work = self.work
        trainable = torch.compile(model) if work.compile else model
        return fit(trainable, work.train, work.val, work.normalize, settings, work.targets, on_epoch, timer,
                   training_epoch)

    def deployable(self, model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig, what: str = "the student",
                   normalize: tuple | None = None) -> nn.Module | bytes:
        with TORCH_GLOBALS:  # torch.export keeps state process-wide; parallel trials build students meanwhile
            return deployable(model, input_shape, cfg, what, normalize)

    def time_latency(self, timed: nn.Module | bytes, input_shape: tuple[int, ...], cfg: LatencyConfig) -> Latency:
        return time_deployed(timed, input_shape, cfg)


MAX_AUTO = 8  # `engine.parallel_trials = 0` forks one process per core, at most this many


def processes_for(cfg, device: torch.device, n_trials: int) -> int:
    """How many training processes a session starts: one per core (or `engine.parallel_trials`), and none on CUDA
    (a forked process cannot use the parent's CUDA context) or for a single trial."""
    cores = cfg.engine.threads or len(os.sched_getaffinity(0))
    size = min(cfg.engine.parallel_trials or min(cores, MAX_AUTO), n_trials)
    return size if device.type == "cpu" and size > 1 else 1


@contextlib.contextmanager
def parallel_execution(ctx, size: int, work: Workload | None = None):
    """While open, `ctx.executor` trains the students (on `work`, default the session's) in `size` processes of
    one thread each (a forked process that used several OpenMP threads could hang); yields how many trials to run
    at once. Ctrl-C stops the processes first (the parent's threads then end their trials as interrupted); the
    parent keeps one thread for its own small work (test passes), leaving the cores to the processes."""
    from kdsearch.trainer_pool import TrainerPool

    parent_threads, in_process = torch.get_num_threads(), ctx.executor
    if size <= 1 or isinstance(ctx.data.train, StreamingSplit):  # streamed images: DataLoader workers use the cores
        ctx.executor = InProcess(work) if work else in_process
        try:
            yield 1
        finally:
            ctx.executor = in_process
        return
    torch.set_num_threads(1)
    pool = ctx.executor = TrainerPool(work or in_process.work, size)
    handled = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.default_int_handler)  # not in a background job

    def interrupt(signum, frame):
        pool.close()
        signal.default_int_handler(signum, frame)

    try:
        if handled:
            signal.signal(signal.SIGINT, interrupt)
        yield pool.size
    finally:
        if handled:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        pool.close()
        ctx.executor = in_process
        torch.set_num_threads(parent_threads)
