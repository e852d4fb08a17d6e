"""Progress of long work on the console: one line kept in place on a terminal; on a file or a pipe, plain lines
at most one every `interval_s` seconds (and always the last), so a log stays readable.

The teacher's epochs use `Progress`; the running trials share one `TrialStatus` line.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time

CLEAR = "\r\x1b[2K"  # back to the line's start, and erase it


def is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class Line:
    """One status line: rewritten in place on a terminal, printed at a steady rate elsewhere. Thread-safe; `print`
    writes a permanent line above the status (which is redrawn under it on a terminal)."""

    def __init__(self, stream=None, interval_s: float = 30.0):
        self.stream = stream or sys.stdout
        self.terminal = is_terminal(self.stream)
        self.interval_s = interval_s
        self._shown = ""
        self._last = 0.0
        self._lock = threading.Lock()

    def show(self, text: str, final: bool = False) -> None:
        """A status; a reader that went away (`| head`) is left for the next permanent line to find."""
        with self._lock, contextlib.suppress(OSError, ValueError):
            if self.terminal:
                if not final:  # one row: CLEAR erases only the row the cursor is on
                    text = text[:shutil.get_terminal_size().columns - 1]
                self._shown = "" if final else text
                self.stream.write(CLEAR + text + ("\n" if final else ""))
            elif final or time.monotonic() - self._last >= self.interval_s:
                self._last = time.monotonic()
                self.stream.write(text + "\n")
            self.stream.flush()

    def print(self, text: str) -> None:
        with self._lock:
            if self.terminal and self._shown:
                self.stream.write(CLEAR + text + "\n" + self._shown)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def redraw(self, text: str) -> None:
        """Replace what a terminal shows (a file keeps its lines)."""
        if self.terminal:
            self.show(text)

    def clear(self) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):
            if self.terminal and self._shown:
                self.stream.write(CLEAR)
                self.stream.flush()
            self._shown = ""


def time_left(elapsed_s: float, done: int, total: int) -> str:
    return f"about {elapsed_s / done * (total - done):.0f} s left" if 0 < done < total else "done"


class Progress:
    """`label: k/N detail (E s, about L s left)` for work of N equal steps, such as a teacher's epochs."""

    def __init__(self, label: str, total: int, stream=None, interval_s: float = 10.0):
        self.label, self.total = label, total
        self.line = Line(stream, interval_s)
        self.started = time.perf_counter()

    def update(self, done: int, detail: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.line.show(f"{self.label}: {done}/{self.total} {detail} ({elapsed:.0f} s, "
                       f"{time_left(elapsed, done, self.total)})", final=done >= self.total)


class TrialStatus:
    """The trials running in this process, on one line: `running: trial 12 epoch 3/15 val_acc 0.9412 (about
    40 s left) | trial 13 ...`."""

    def __init__(self, stream=None, interval_s: float = 30.0):
        self.line = Line(stream, interval_s)
        self._trials: dict[int, tuple[float, str]] = {}  # number -> (start, its part of the line)
        self._lock = threading.Lock()

    def epoch(self, number: int, epoch: int, epochs: int, val_acc: float) -> None:
        with self._lock:
            started = self._trials.get(number, (time.perf_counter(), ""))[0]
            left = time_left(time.perf_counter() - started, epoch, epochs) if epoch < epochs else "last epoch"
            self._trials[number] = (started, f"trial {number} epoch {epoch}/{epochs} val_acc {val_acc:.4f} ({left})")
            text = "running: " + " | ".join(part for _, part in sorted(self._trials.values()))
        self.line.show(text)

    def started(self, number: int) -> None:
        with self._lock:
            self._trials[number] = (time.perf_counter(), f"trial {number} starting")

    def ended(self, number: int) -> None:
        with self._lock:
            self._trials.pop(number, None)
            text = "running: " + " | ".join(part for _, part in sorted(self._trials.values()))
        if self._trials:
            self.line.redraw(text)  # without the trial that ended, which its own line then follows
        else:
            self.line.clear()

    def print(self, text: str) -> None:
        """A finished trial's line, above the status."""
        self.line.print(text)
