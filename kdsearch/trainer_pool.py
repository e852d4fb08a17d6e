"""Students trained in forked processes, one trial each, while Optuna, MLflow and the pruner stay in this process.

On a CPU a small student's training step is mostly Python and dispatch: one process keeps about one core busy, and
threads do not help (they share the GIL: two threads trained two digits students 1.2x faster than one after the
other, two processes 2.0x). With `engine.parallel_trials` = K > 1, `run_study` runs K trials at a time (Optuna's
threads) and each thread hands its student's training to one of K processes. They are forked once the session is
open, so they start warm; where this process has already run a backward pass (a teacher trained here), torch
refuses autograd in its forks, and they come from multiprocessing's fork server instead (which re-imports an
unguarded main script: guard yours with `if __name__ == "__main__":`). Each gets the training data and the
teacher's logits once, then students. The parent still sees every epoch: a process sends each epoch's loss and
val_acc and waits for the answer, so logging, pruning and the timing lock (a process trains its epochs under
`training_epoch` like any other) work as in one process.

A process that dies fails its trial only; its trials then train in the parent. Ctrl-C stops the processes first,
so the trials under way end as interrupted (FAIL), as they would in one process.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import queue
import signal
from dataclasses import dataclass

import torch
from torch import nn

from kdsearch.data import Split, StreamingSplit
from kdsearch.distill import Normalizer, Teacher, TrainSettings, train
from kdsearch.engine import PhaseTimer, prepare_model
from kdsearch.timing_lock import training_epoch

_PR_SET_PDEATHSIG = 1  # from linux/prctl.h
_IN_PARENT = None  # a free slot holding this marks "train in the parent process" (its trainer died)


class _Stop(Exception):
    """The parent said stop (the pruner stopped the trial, or it failed while logging)."""


@dataclass
class Workload:
    """What a training process needs from the session, sent to it once."""

    train: Split | StreamingSplit
    val: Split | StreamingSplit
    normalize: Normalizer
    teacher: Teacher  # the cached logits, or the model where augmentation needs it on every batch
    compile: bool

    @classmethod
    def of(cls, ctx) -> Workload:
        return cls(ctx.data.train, ctx.data.val, ctx.normalize, ctx.teacher.targets(ctx.cfg.data.augment),
                   ctx.cfg.engine.compile)


class TrainerPool:
    """`size` training processes; `train` borrows one for a trial and blocks until the student is trained."""

    def __init__(self, ctx, size: int, threads: int):
        work = pickle.dumps(Workload.of(ctx))
        self._procs: list = []
        self._free: queue.Queue = queue.Queue()
        self.closing = False
        conns = self._start("fork", size, threads, work) or self._start("forkserver", size, threads, work)
        for conn in conns or [_IN_PARENT]:
            self._free.put(conn)

    def _start(self, method: str, size: int, threads: int, work: bytes) -> list | None:
        """`size` processes started by `method`, each sent the workload; None if any of them cannot train."""
        mp = multiprocessing.get_context(method)
        started = []
        for _ in range(size):
            mine, theirs = mp.Pipe()
            ours = [m for _, m in started] + [mine]  # a forked process gets copies of these: it must close them
            proc = mp.Process(target=_serve, args=(theirs, ours, threads), daemon=True)
            proc.start()
            theirs.close()
            started.append((proc, mine))
        try:
            if any(_recv(mine) != "ready" for _, mine in started):
                raise EOFError
            for _, mine in started:
                mine.send_bytes(work)
        except (EOFError, OSError):
            for proc, _ in started:
                proc.kill()
                proc.join()
            return None
        self._procs = [proc for proc, _ in started]
        return [mine for _, mine in started]

    def train(self, ctx, model: nn.Module, settings: TrainSettings, on_epoch, timer: PhaseTimer) -> float:
        """Train `model` in a pooled process (in place, as `distill.train` does); return the final val_acc."""
        if self.closing:
            raise KeyboardInterrupt
        conn = self._free.get()
        if conn is _IN_PARENT:
            self._free.put(_IN_PARENT)
            return train_locally(Workload.of(ctx), model, settings, on_epoch, timer)
        try:
            return self._train_on(conn, model, settings, on_epoch, timer)
        except (EOFError, OSError) as e:
            conn = _IN_PARENT
            if self.closing:
                raise KeyboardInterrupt from e
            raise RuntimeError("the process training this student died; the next trials train in the main "
                               "process") from e
        finally:  # pruned or failed, the process is free again
            self._free.put(conn)

    @staticmethod
    def _train_on(conn, model, settings, on_epoch, timer) -> float:
        _send(conn, (model, settings))
        while True:
            kind, *body = _recv(conn)
            if kind == "epoch":
                try:
                    on_epoch(*body)
                except BaseException:
                    _send(conn, False)
                    _recv(conn)  # ("stopped",): the process is free again
                    raise
                _send(conn, True)
            elif kind == "done":
                val_acc, state, seconds = body
                model.load_state_dict(state)
                for name, s in seconds.items():
                    timer.add(name, s)
                return val_acc
            else:
                raise body[0]

    def close(self) -> None:
        """Stop the processes now (their trials' threads then end as interrupted)."""
        self.closing = True
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join()


MAX_AUTO = 8  # `engine.parallel_trials = 0` forks one process per core, at most this many


def processes_for(cfg, device: torch.device, n_trials: int) -> tuple[int, int]:
    """How many training processes a session forks, and the threads each: none on CUDA (a forked process cannot
    use the parent's CUDA context) or for a single trial."""
    cores = cfg.engine.threads or len(os.sched_getaffinity(0))
    size = min(cfg.engine.parallel_trials or min(cores, MAX_AUTO), n_trials)
    if device.type != "cpu" or size <= 1:
        return 1, cores
    return size, max(1, cores // size)


@contextlib.contextmanager
def trainer_pool(ctx, size: int, threads: int):
    """While open, `ctx.pool` trains the students in `size` forked processes; Ctrl-C stops them first (the
    parent's threads then end their trials as interrupted), and the parent keeps one thread for its own small
    work (test passes, latency timings), leaving the cores to the processes."""
    if size <= 1 or isinstance(ctx.data.train, StreamingSplit):  # streamed images: DataLoader workers use the cores
        yield
        return
    pool = TrainerPool(ctx, size, threads)
    ctx.pool, parent_threads = pool, torch.get_num_threads()
    torch.set_num_threads(1)
    previous = signal.getsignal(signal.SIGINT)

    def interrupt(signum, frame):
        pool.close()
        signal.default_int_handler(signum, frame)

    if previous is signal.default_int_handler:  # not where SIGINT is ignored (a background job)
        signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        if previous is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous)
        pool.close()
        ctx.pool = None
        torch.set_num_threads(parent_threads)


def train_locally(work: Workload, model: nn.Module, settings: TrainSettings, on_epoch, timer) -> float:
    trainable = torch.compile(model) if work.compile else model
    return train(trainable, work.train, work.val, work.normalize, settings, work.teacher, on_epoch, timer,
                 training_epoch)


def _serve(conn, ours: list, threads: int) -> None:
    """A training process: train each student the parent sends until the parent goes away."""
    for end in ours:
        end.close()  # else this process holds its own pipe's other end, and never sees the parent go
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the parent, even in mid-epoch
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (see `TrainerPool.close`)
    torch.set_num_threads(threads)
    try:
        torch.ones(1, requires_grad=True).sum().backward()
    except RuntimeError:  # forked from a process that had run a backward pass: torch refuses autograd here
        _send(conn, "cannot train")
        os._exit(0)
    try:
        _send(conn, "ready")
        work = _recv(conn)
    except (EOFError, OSError):
        os._exit(0)
    while True:
        try:
            task = conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(0)
        try:
            model, settings = pickle.loads(task)
            _send(conn, ("done", *_train_one(work, conn, model, settings)))
        except _Stop:
            _send(conn, ("stopped",))
        except Exception as e:  # noqa: BLE001 - the parent's trial records it
            _send(conn, ("error", _picklable(e)))


def _train_one(work: Workload, conn, model: nn.Module, settings: TrainSettings) -> tuple[float, dict, dict]:
    def on_epoch(epoch: int, train_loss: float, val_acc: float) -> None:
        _send(conn, ("epoch", epoch, train_loss, val_acc))
        if not _recv(conn):
            raise _Stop

    timer = PhaseTimer(work.train.y.device)
    prepare_model(model, work.train.y.device)
    val_acc = train_locally(work, model, settings, on_epoch, timer)
    return val_acc, model.state_dict(), timer.seconds


def _picklable(e: Exception) -> Exception:
    with contextlib.suppress(Exception):
        pickle.loads(pickle.dumps(e))
        return e
    return RuntimeError(f"{type(e).__name__}: {e}")


def _send(conn, obj) -> None:
    """Plain pickle: torch's own reducers would move every tensor to shared memory and pass file descriptors."""
    conn.send_bytes(pickle.dumps(obj))


def _recv(conn):
    return pickle.loads(conn.recv_bytes())
