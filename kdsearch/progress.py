"""Progress of long work on the console: one line kept in place on a terminal; on a file or a pipe, plain lines
at most one every `interval_s` seconds (and always the last), so a log stays readable.

The teacher's epochs use `Progress`; the running trials share one `TrialStatus` line, and each finished trial
prints one line above it (`print_progress`, an Optuna callback).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time

import optuna

from kdsearch.students import is_distillation_param

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


def study_progress(study: optuna.Study, target: int, complete_only: bool, mine: int) -> str:
    """Workers: `[k/N complete]`, the study's complete trials against the target, whoever ran them. One process:
    `[i/n, k in the study]`, its own trials against its --n-trials and the study's finished trials (other
    machines may be adding theirs)."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    if complete_only:
        return f"[{states.count(optuna.trial.TrialState.COMPLETE)}/{target} complete]"
    return f"[{mine}/{target}, {sum(s.is_finished() for s in states)} in the study]"


def params_line(params: dict) -> str:
    """`arch separable width 1.23 depth 3 ... T 4.00 alpha 0.50 lr 0.055`: the family first, the distillation
    knobs last (with several KD methods: `method dkd T 4 beta 8 lr 0.055`)."""
    student = {k: v for k, v in params.items() if not is_distillation_param(k)}
    method = params.get("method", "kd")
    knobs = {k: v for k, v in params.items() if k.startswith(f"{method}.")}
    shown = {k.split(".")[-1]: v for k, v in student.items()}
    shown.update({"method": params["method"]} if "method" in params else {})
    shown["T"] = params.get("temperature", 0)
    shown.update({k.split(".")[-1]: v for k, v in knobs.items()} or {"alpha": params.get("alpha", 0)})
    shown["lr"] = params.get("lr", 0)
    return " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def print_progress(target: int, started: float, complete_only: bool = False, status: TrialStatus | None = None):
    """An Optuna callback printing one line per finished trial (above the running trials' `status` line)."""
    lock = threading.Lock()  # trials may end in several threads (see `run_trials`)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with lock:
            callback.mine += 1
            mine = callback.mine
        head = f"trial {trial.number:3d} {study_progress(study, target, complete_only, mine)}"
        head += f" {params_line(trial.params)}" if trial.params else ""  # none: pruned as surplus before sampling
        a = trial.user_attrs
        cost = f"params {a['params']:,} latency {a['latency_ms']:.3f} ms" if "params" in a else ""
        if trial.state == optuna.trial.TrialState.COMPLETE:
            tail = f"val_acc {trial.values[0]:.4f} test_acc {a['test_acc']:.4f} {cost}"
        else:
            reason = a.get("prune_reason") or a.get("fail_reason", "")
            tail = f"{trial.state.name}{f' ({cost})' if cost else ''}: {reason}"
        if "baseline" in a:
            tail += f" [baseline {a['baseline']}]"
        if "warm_start" in a:
            tail += f" [warm start from {a['warm_start']}]"
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        line = f"{head} | {tail} | {seconds:.1f} s (elapsed {time.time() - started:.0f} s)"
        if status is not None:
            status.print(line)
        else:
            print(line, flush=True)
    callback.mine = 0
    return callback
