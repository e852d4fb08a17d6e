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
import pickle
import queue
import sys
import threading

from torch import nn

from kdsearch import first_line, pool_processes
from kdsearch.config import LatencyConfig
from kdsearch.distill import TrainSettings
from kdsearch.engine import no_timer
from kdsearch.execution import Executor, InProcess, Workload
from kdsearch.measure import Latency
from kdsearch.pool_processes import receive, send

_IN_PARENT = None  # a free slot holding this marks "train in the parent process" (its trainer died)


class _CannotTrain(Exception):
    """A started process answered that it cannot train (torch refuses autograd in a fork after a backward pass)."""


class TrainerPool(Executor):
    """`size` training processes and one timing process; `train` borrows a training process for a trial and blocks
    until the student is trained, `time_latency` times an architecture in the timing process."""

    def __init__(self, work: Workload, size: int):
        self._here = InProcess(work)  # for the students that train here
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
        mp = multiprocessing.get_context(method)
        started = []
        pool_processes.INHERITED = work if method == "fork" else None
        try:
            for target in [pool_processes.serve_training] * size + [pool_processes.serve_timings]:
                mine, theirs = mp.Pipe()
                ours = [m for _, m in started] + [mine]  # a forked process gets copies of these: it must close them
                proc = mp.Process(target=target, args=(theirs, ours), daemon=True)
                started.append((proc, mine))
                proc.start()
                theirs.close()
            if any(receive(mine) != "ready" for _, mine in started):
                raise _CannotTrain
            if method != "fork":
                for _, mine in started[:-1]:
                    send(mine, work)
        except Exception as e:  # noqa: BLE001 - a process that cannot start or be sent the workload: train here
            self._why = None if isinstance(e, _CannotTrain) else f"{method}: {type(e).__name__}: {first_line(e)}"
            for proc, mine in started:
                if proc.pid is not None:
                    proc.kill()
                    proc.join()
                mine.close()
            return None
        finally:
            pool_processes.INHERITED = None
        self._procs = [proc for proc, _ in started]
        return [mine for _, mine in started]

    def train(self, model: nn.Module, settings: TrainSettings, on_epoch=None, timer=no_timer) -> float:
        """Train `model` in a pooled process (in place, as `distill.fit` does); return the final val_acc. A
        student that cannot be pickled (a class defined inside a user's builder) trains in this process."""
        on_epoch = on_epoch or (lambda *epoch: None)
        if self.closing:
            raise KeyboardInterrupt
        try:
            task = pickle.dumps((model, settings))
        except Exception:  # noqa: BLE001 - pickling raises many kinds
            return self._here.train(model, settings, self._stoppable(on_epoch), timer)
        conn = self._free.get()
        if conn is _IN_PARENT:
            self._free.put(_IN_PARENT)
            return self._here.train(model, settings, self._stoppable(on_epoch), timer)
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
            kind, *body = receive(conn)
            if kind == "epoch":
                try:
                    on_epoch(*body)
                except BaseException:
                    send(conn, False)
                    receive(conn)  # ("stopped",): the process is free again
                    raise
                send(conn, True)
            elif kind == "done":
                val_acc, state, seconds = body
                model.load_state_dict(state)
                for name, s in seconds.items():
                    timer.add(name, s)
                return val_acc
            else:
                raise body[0]

    def deployable(self, model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig, what: str = "the student",
                   normalize: tuple | None = None) -> nn.Module | bytes:
        """`measure.deployable` in the timing process: torch.export keeps some state process-wide (torch.fx's
        `current_meta`), and an export beside another thread's `torch.manual_seed` failed with a KeyError here. A
        student that cannot be pickled is exported in this process, holding `TORCH_GLOBALS` as seeded builds do."""
        args = (model, input_shape, cfg, what, normalize)
        return self._in_timing_process(("deployable", *args), lambda: self._here.deployable(*args))

    def time_latency(self, timed: nn.Module | bytes, input_shape: tuple[int, ...], cfg: LatencyConfig) -> Latency:
        """`measure.time_deployed` in the timing process, which runs nothing else: in this process the trials' threads
        take the GIL often enough to inflate a timing (0.08 ms became about 60 ms beside a busy thread). The caller
        holds `timing_alone`, so no training epoch runs meanwhile. A forked process must not use more than one
        OpenMP thread (it would hang) nor CUDA: such timings, and students that cannot be pickled, stay here."""
        here = lambda: self._here.time_latency(timed, input_shape, cfg)  # noqa: E731
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
                kind, value = receive(self._timer)
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


def _main_is_importable() -> bool:
    """Whether a fresh process may import `__main__` safely: a package's `__main__` (`python -m`) or none (an
    interactive session) is skipped by multiprocessing; a script would run again, whole study included."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", "")
    return getattr(main, "__file__", None) is None or name == "__main__" or name.endswith(".__main__")


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
