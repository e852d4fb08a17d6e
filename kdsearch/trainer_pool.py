"""Students trained in forked processes, one trial each, while Optuna, MLflow and the pruner stay in this process.

On a CPU a small student's training step is mostly Python and dispatch: one process keeps about one core busy, and
threads do not help (they share the GIL: two threads trained two digits students 1.2x faster than one after the
other, two processes 2.0x). With `engine.parallel_trials` = K > 1, `run_study` runs K trials at a time in K threads
and each thread hands its student's training to one of K processes of one thread each. The parent still sees
every epoch: a process sends each epoch's loss and val_acc and waits for the answer, so logging, pruning and the
timing lock (a process trains its epochs under `training_epoch` like any other) work as in one process.

The processes are forked once the session is open: they start warm and share the training data. A forked process
must not use several OpenMP threads (it hangs in libgomp) or CUDA. Where this process has already run a backward
pass, torch refuses autograd in its forks; then the processes come from multiprocessing's fork server, which runs
`__main__` again in each: that is safe for `python -m kdsearch` and interactive sessions, and for a script only
behind `if __name__ == "__main__":`, so from a script the trials then train one at a time here.

Latency is timed in one more process, which does nothing else, while the timing lock keeps epochs out and this
process's threads are held off the GIL (`_wait_holding_the_gil`; a Ctrl-C then takes effect when the timing
ends). That process also makes the ONNX graphs it times, beforehand and without the lock. A student that cannot be
pickled is exported, timed and trained here.

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
import sys
import threading
from dataclasses import dataclass

import torch
from torch import nn

from kdsearch import first_line
from kdsearch.config import LatencyConfig
from kdsearch.data import Split, StreamingSplit
from kdsearch.distill import Normalizer, Teacher, TrainSettings, train
from kdsearch.engine import PhaseTimer, prepare_model
from kdsearch.measure import Latency, deployable, time_deployed
from kdsearch.onnx_graph import TORCH_GLOBALS
from kdsearch.timing_lock import training_epoch

_PR_SET_PDEATHSIG = 1  # from linux/prctl.h
_IN_PARENT = None  # a free slot holding this marks "train in the parent process" (its trainer died)
_INHERITED = None  # the workload, while forking: a forked process reads it here instead of receiving a copy


class _CannotTrain(Exception):
    """A started process answered that it cannot train (torch refuses autograd in a fork after a backward pass)."""


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
    """`size` training processes and one timing process; `train` borrows a training process for a trial and blocks
    until the student is trained, `time_latency` times an architecture in the timing process."""

    def __init__(self, work: Workload, size: int):
        self._work = work  # for the students that train here
        self._procs: list = []
        self._free: queue.Queue = queue.Queue()
        self._timer, self._timer_lock = None, threading.Lock()
        self.closing = False
        self._why: str | None = None  # why the last start failed, where it was not the forks' refusal to train
        conns = self._start("fork", size, work)
        if conns is None and _main_is_importable():
            conns = self._start("forkserver", size, work)
        if conns is None and self._why:
            print(f"trials train one at a time in this process: its training processes could not start "
                  f"({self._why})", flush=True)
        elif conns is None:
            print("trials train one at a time in this process: its forks cannot train (torch refuses autograd in a "
                  "fork once a backward pass has run here), and a fresh process would run this script again; run "
                  "`python -m kdsearch`, or call run_study from a module", flush=True)
        *trainers, self._timer = conns or [_IN_PARENT, None]
        for conn in trainers:
            self._free.put(conn)
        self.size = len(trainers) if conns else 1

    def _start(self, method: str, size: int, work: Workload) -> list | None:
        """`size` training processes and a timing process started by `method`, or None if any cannot start or
        train. Forked ones use the workload they inherit; the fork server's are sent it."""
        global _INHERITED
        mp = multiprocessing.get_context(method)
        started = []
        _INHERITED = work if method == "fork" else None
        try:
            for target in [_serve] * size + [_serve_timings]:
                mine, theirs = mp.Pipe()
                ours = [m for _, m in started] + [mine]  # a forked process gets copies of these: it must close them
                proc = mp.Process(target=target, args=(theirs, ours), daemon=True)
                started.append((proc, mine))
                proc.start()
                theirs.close()
            if any(_recv(mine) != "ready" for _, mine in started):
                raise _CannotTrain
            if method != "fork":
                for _, mine in started[:-1]:
                    _send(mine, work)
        except Exception as e:  # noqa: BLE001 - a process that cannot start or be sent the workload: train here
            self._why = None if isinstance(e, _CannotTrain) else f"{method}: {type(e).__name__}: {first_line(e)}"
            for proc, mine in started:
                if proc.pid is not None:
                    proc.kill()
                    proc.join()
                mine.close()
            return None
        finally:
            _INHERITED = None
        self._procs = [proc for proc, _ in started]
        return [mine for _, mine in started]

    def train(self, model: nn.Module, settings: TrainSettings, on_epoch, timer: PhaseTimer) -> float:
        """Train `model` in a pooled process (in place, as `distill.train` does); return the final val_acc. A
        student that cannot be pickled (a class defined inside a user's builder) trains in this process."""
        if self.closing:
            raise KeyboardInterrupt
        try:
            task = pickle.dumps((model, settings))
        except Exception:  # noqa: BLE001 - pickling raises many kinds
            return train_locally(self._work, model, settings, self._stoppable(on_epoch), timer)
        conn = self._free.get()
        if conn is _IN_PARENT:
            self._free.put(_IN_PARENT)
            return train_locally(self._work, model, settings, self._stoppable(on_epoch), timer)
        try:
            return self._train_on(conn, task, model, on_epoch, timer)
        except (EOFError, OSError) as e:
            conn.close()
            conn = _IN_PARENT
            if self.closing:
                raise KeyboardInterrupt from e
            raise RuntimeError("the process training this student died; the next trials train in the main "
                               "process") from e
        finally:  # pruned or failed, the process is free again
            self._free.put(conn)

    def _stoppable(self, on_epoch):
        """`on_epoch` for a student trained here: Ctrl-C (which closes the pool) stops it after its epoch."""
        def checked(*args) -> None:
            if self.closing:
                raise KeyboardInterrupt
            on_epoch(*args)
        return checked

    @staticmethod
    def _train_on(conn, task: bytes, model, on_epoch, timer) -> float:
        conn.send_bytes(task)
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

    def deployable(self, model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig, what: str,
                   normalize: tuple | None) -> nn.Module | bytes:
        """`measure.deployable` in the timing process: torch.export keeps some state process-wide (torch.fx's
        `current_meta`), and an export beside another thread's `torch.manual_seed` failed with a KeyError here. A
        student that cannot be pickled is exported in this process, holding `TORCH_GLOBALS` as seeded builds do."""
        args = (model, input_shape, cfg, what, normalize)

        def here():
            with TORCH_GLOBALS:
                return deployable(*args)
        return self._in_timing_process(("deployable", *args), here)

    def time_latency(self, timed: nn.Module | bytes, input_shape: tuple[int, ...], cfg: LatencyConfig) -> Latency:
        """`measure.time_deployed` in the timing process, which runs nothing else: in this process the trials' threads
        take the GIL often enough to inflate a timing (0.08 ms became about 60 ms beside a busy thread). The caller
        holds `timing_alone`, so no training epoch runs meanwhile. A forked process must not use more than one
        OpenMP thread (it would hang) nor CUDA: such timings, and students that cannot be pickled, stay here."""
        here = lambda: time_deployed(timed, input_shape, cfg)  # noqa: E731
        return self._in_timing_process(("time", timed, input_shape, cfg), here,
                                       usable=cfg.threads == 1 and cfg.device == "cpu", hold_gil=True)

    def _in_timing_process(self, task: tuple, here, usable: bool = True, hold_gil: bool = False):
        """The timing process's answer to `task`, or `here()` where the task cannot go there (no timing process, a
        task that cannot be pickled, `usable` false) or the process died on it."""
        try:
            data = pickle.dumps(task)
        except Exception:  # noqa: BLE001 - pickling raises many kinds
            data = None
        with self._timer_lock:
            if data is None or self._timer is None or not usable:
                return here()
            try:
                self._timer.send_bytes(data)
                if hold_gil:
                    _wait_holding_the_gil(self._timer.fileno())
                kind, value = _recv(self._timer)
            except (EOFError, OSError) as e:
                self._timer.close()
                self._timer = None
                if self.closing:
                    raise KeyboardInterrupt from e
                return here()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the processes now (their trials' threads then end as interrupted)."""
        self.closing = True
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join()


MAX_AUTO = 8  # `engine.parallel_trials = 0` forks one process per core, at most this many


def processes_for(cfg, device: torch.device, n_trials: int) -> int:
    """How many training processes a session starts: one per core (or `engine.parallel_trials`), and none on CUDA
    (a forked process cannot use the parent's CUDA context) or for a single trial."""
    cores = cfg.engine.threads or len(os.sched_getaffinity(0))
    size = min(cfg.engine.parallel_trials or min(cores, MAX_AUTO), n_trials)
    return size if device.type == "cpu" and size > 1 else 1


@contextlib.contextmanager
def trainer_pool(ctx, size: int):
    """While open, `ctx.pool` trains the students in `size` processes of one thread each (a forked process that
    used several OpenMP threads could hang); yields how many trials to run at once. Ctrl-C stops the processes
    first (the parent's threads then end their trials as interrupted); the parent keeps one thread for its own
    small work (test passes), leaving the cores to the processes."""
    if size <= 1 or isinstance(ctx.data.train, StreamingSplit):  # streamed images: DataLoader workers use the cores
        yield 1
        return
    parent_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = TrainerPool(Workload.of(ctx), size)
    ctx.pool = pool
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
        ctx.pool = None
        torch.set_num_threads(parent_threads)


def train_locally(work: Workload, model: nn.Module, settings: TrainSettings, on_epoch, timer) -> float:
    trainable = torch.compile(model) if work.compile else model
    return train(trainable, work.train, work.val, work.normalize, settings, work.teacher, on_epoch, timer,
                 training_epoch)


def _main_is_importable() -> bool:
    """Whether a fresh process may import `__main__` safely: a package's `__main__` (`python -m`) or none (an
    interactive session) is skipped by multiprocessing; a script would run again, whole study included."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", "")
    return getattr(main, "__file__", None) is None or name == "__main__" or name.endswith(".__main__")


def _become_child(ours: list) -> None:
    for end in ours:
        end.close()  # else this process holds its own pipe's other end, and never sees the parent go
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the parent, even in mid-epoch
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (see `TrainerPool.close`)
    torch.set_num_threads(1)


def _serve(conn, ours: list) -> None:
    """A training process: train each student the parent sends until the parent goes away."""
    _become_child(ours)
    try:
        torch.ones(1, requires_grad=True).sum().backward()
    except RuntimeError:  # forked from a process that had run a backward pass: torch refuses autograd here
        _send(conn, "cannot train")
        os._exit(0)
    try:
        _send(conn, "ready")
        work = _INHERITED or _recv(conn)
    except (EOFError, OSError):
        os._exit(0)
    _answer_each(conn, lambda model, settings: _train_one(work, conn, model, settings))


def _serve_timings(conn, ours: list) -> None:
    """The timing process: make what each architecture's runtime times (its ONNX graph), and time it, as the parent
    asks. Its first timing runs twice (a process's first one reads about 0.3 s slow)."""
    _become_child(ours)
    _send(conn, "ready")
    warm = []

    def serve(kind: str, *args) -> tuple:
        if kind == "deployable":
            return (deployable(*args),)
        if not warm:
            warm.append(time_deployed(*args))
        return (time_deployed(*args),)

    _answer_each(conn, serve)


def _answer_each(conn, handle) -> None:
    """Answer each task the parent sends with ("done", *handle(*task)), until the parent goes away."""
    while True:
        try:
            task = conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(0)
        try:
            reply = ("done", *handle(*pickle.loads(task)))
        except _Stop:
            reply = ("stopped",)
        except Exception as e:  # noqa: BLE001 - the parent's trial records it
            reply = ("error", _picklable(e))
        _send(conn, reply)


def _train_one(work: Workload, conn, model: nn.Module, settings: TrainSettings) -> tuple[float, dict, dict]:
    def on_epoch(epoch: int, train_loss: float, val_acc: float) -> None:
        _send(conn, ("epoch", epoch, train_loss, val_acc))
        if not _recv(conn):
            raise _Stop

    timer = PhaseTimer(work.train.y.device)
    prepare_model(model, work.train.y.device)
    val_acc = train_locally(work, model, settings, on_epoch, timer)
    return val_acc, model.state_dict(), timer.seconds


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


def _wait_holding_the_gil(fd: int, timeout_ms: int = 60_000) -> None:
    """Block until `fd` is readable without releasing the GIL (`ctypes.PyDLL` keeps it), so that this process's
    other threads stay off the CPU while the timing process times: on this 2-vCPU host a busy thread beside a
    timing read the smallest student 60% slow. A signal or the timeout ends the wait early."""
    with contextlib.suppress(OSError, AttributeError):
        poll = ctypes.PyDLL(None).poll
        poll.argtypes, poll.restype = [ctypes.POINTER(_PollFd), ctypes.c_ulong, ctypes.c_int], ctypes.c_int
        poll(ctypes.byref(_PollFd(fd, 1, 0)), 1, timeout_ms)  # 1: POLLIN


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
