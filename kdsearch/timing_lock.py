"""Latency is timed alone on a host: no two kdsearch timings at once, and no kdsearch training epoch or
evaluation (students' and teachers') running beside one (on a CPU, workers that train while another times would
slow its student down, and that figure would be kept for the whole study).

Two lock files in the temporary folder make a turnstile: a timing takes the gate, then the room, both exclusive; a
training epoch passes the gate (shared, released at once) and holds the room shared while it runs. Once a timing
holds the gate no new epoch starts, the epochs under way finish, and the timing runs alone; epochs never wait for
each other. The files are made writable for every user, so the processes of several users share them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from pathlib import Path

GATE = Path(tempfile.gettempdir()) / "kdsearch-latency-gate.lock"
ROOM = Path(tempfile.gettempdir()) / "kdsearch-latency.lock"
# Per thread (a thread that trains must wait for another thread's timing): `timing`, how deep inside `timing_alone`;
# `in_epoch`, whether inside `training_epoch`. Unset reads as 0.
_state = threading.local()


def _get(name: str):
    return getattr(_state, name, 0)


def _open(path: Path) -> int:
    """The lock file, read-write for everyone. An existing file is opened without O_CREAT (which the kernel refuses
    on another user's file in /tmp where fs.protected_regular is set); a file another user left read-only falls
    back to a per-user one (that user's processes then lock among themselves only)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    except PermissionError:
        return os.open(path.with_name(f"{path.stem}-{os.getuid()}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, 0o666)  # the umask took write access from the others
    return fd


@contextlib.contextmanager
def _locked(path: Path, mode: int):
    fd = _open(path)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: forked DataLoader workers share the lock until they exit
        os.close(fd)


@contextlib.contextmanager
def timing_alone():
    """Hold while timing a latency: waits for other timings and for epochs under way; re-entrant. Never time
    inside a training epoch of the same process (it would wait for itself)."""
    if _get("in_epoch"):
        raise RuntimeError("a latency timing inside a training epoch would wait for that epoch")
    if _get("timing"):
        _state.timing += 1
        try:
            yield
        finally:
            _state.timing -= 1
        return
    with _locked(GATE, fcntl.LOCK_EX), _locked(ROOM, fcntl.LOCK_EX):
        _state.timing = 1
        try:
            yield
        finally:
            _state.timing = 0


@contextlib.contextmanager
def training_epoch():
    """Hold while a training epoch runs: waits only while a timing is under way or about to start."""
    if _get("timing"):  # this thread is timing; nothing of its own to wait for
        yield
        return
    with _locked(GATE, fcntl.LOCK_SH):
        pass
    with _locked(ROOM, fcntl.LOCK_SH):
        _state.in_epoch = True
        try:
            yield
        finally:
            _state.in_epoch = False
