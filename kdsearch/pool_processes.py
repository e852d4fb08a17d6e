"""What runs inside the trainer pool's processes (see `trainer_pool.py`): a training process trains each student
the parent sends, a timing process makes and times what the latency runtime runs. Every message is plain pickle:
torch's own reducers would move every tensor to shared memory and pass file descriptors.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal

import torch
from torch import nn

from kdsearch.distill import TrainSettings
from kdsearch.engine import PhaseTimer, prepare_model
from kdsearch.execution import InProcess, Workload
from kdsearch.measure import deployable, time_deployed

_PR_SET_PDEATHSIG = 1  # from linux/prctl.h
INHERITED = None  # the workload, while forking: a forked process reads it here instead of receiving a copy


class Stop(Exception):
    """The parent said stop (the pruner stopped the trial, or it failed while logging)."""


def _become_child(ours: list) -> None:
    for end in ours:
        end.close()  # else this process holds its own pipe's other end, and never sees the parent go
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the parent, even in mid-epoch
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (see `TrainerPool.close`)
    torch.set_num_threads(1)


def serve_training(conn, ours: list) -> None:
    """A training process: train each student the parent sends until the parent goes away."""
    _become_child(ours)
    try:
        torch.ones(1, requires_grad=True).sum().backward()
    except RuntimeError:  # forked from a process that had run a backward pass: torch refuses autograd here
        send(conn, "cannot train")
        os._exit(0)
    try:
        send(conn, "ready")
        work = INHERITED or receive(conn)
    except (EOFError, OSError):
        os._exit(0)
    _answer_each(conn, lambda model, settings: _train_one(work, conn, model, settings))


def serve_timings(conn, ours: list) -> None:
    """The timing process: make what each architecture's runtime times (its ONNX graph), and time it, as the parent
    asks. Its first timing runs twice (a process's first one reads about 0.3 s slow)."""
    _become_child(ours)
    send(conn, "ready")
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
        except Stop:
            reply = ("stopped",)
        except Exception as e:  # noqa: BLE001 - the parent's trial records it
            reply = ("error", _picklable(e))
        send(conn, reply)


def _train_one(work: Workload, conn, model: nn.Module, settings: TrainSettings) -> tuple[float, dict, dict]:
    def on_epoch(epoch: int, train_loss: float, val_acc: float) -> None:
        send(conn, ("epoch", epoch, train_loss, val_acc))
        if not receive(conn):
            raise Stop

    timer = PhaseTimer(work.train.y.device)
    prepare_model(model, work.train.y.device)
    val_acc = InProcess(work).train(model, settings, on_epoch, timer)
    return val_acc, model.state_dict(), timer.seconds


def _picklable(e: Exception) -> Exception:
    with contextlib.suppress(Exception):
        pickle.loads(pickle.dumps(e))
        return e
    return RuntimeError(f"{type(e).__name__}: {e}")


def send(conn, obj) -> None:
    conn.send_bytes(pickle.dumps(obj))


def receive(conn):
    return pickle.loads(conn.recv_bytes())
