"""Scheduling a session's trials: one after the other, several at once in threads (each handing its student to
the executor), or, as one of several workers, until the study holds enough complete trials.

Optuna's `study.optimize` runs each trial; what runs them at once, waits for other workers and stops on repeated
failures lives here.
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
import time

import optuna

from kdsearch import KdsearchError
from kdsearch.session import Session
from kdsearch.storage import fail_dead_local_trials
from kdsearch.trial import objective

COMPLETE, RUNNING, WAITING = (optuna.trial.TrialState[s] for s in ("COMPLETE", "RUNNING", "WAITING"))


def stop_on_repeated_failure(limit: int = 3):
    """Stop the study when the last `limit` trials of this session all failed with the same message."""
    reasons: list[str | None] = []

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        failed = trial.state == optuna.trial.TrialState.FAIL
        reasons.append(trial.user_attrs.get("fail_reason", "unknown error") if failed else None)
        last = reasons[-limit:]
        if len(last) == limit and last[0] is not None and last.count(last[0]) == limit:
            callback.reason = last[0]
            study.stop()
    callback.reason = None
    return callback


def run_trials(session: Session, at_once: int, callbacks: list, failures, n_trials: int) -> None:
    """`n_trials` trials, `at_once` at a time (each thread runs its own trials, one after the other), until
    `search.timeout` or `failures` stops them."""
    study, cfg = session.study, session.ctx.cfg
    if at_once == 1:
        study.optimize(lambda trial: objective(session.ctx, trial), n_trials=n_trials,
                       timeout=cfg.search.timeout or None, catch=(Exception,), callbacks=callbacks)
        return
    deadline = time.time() + cfg.search.timeout if cfg.search.timeout else math.inf
    lock, left, interrupted, errors = threading.Lock(), [n_trials], threading.Event(), []

    def take() -> bool:
        with lock:
            if left[0] <= 0 or failures.reason or time.time() >= deadline or interrupted.is_set():
                return False
            left[0] -= 1
            return True

    def work(done: threading.Event) -> None:
        try:
            while take():
                study.optimize(lambda trial: objective(session.ctx, trial), n_trials=1, catch=(Exception,),
                               callbacks=callbacks)
        except KeyboardInterrupt:  # Ctrl-C: the main thread handles it
            pass
        except Exception as e:  # noqa: BLE001 - raised again in the main thread
            errors.append(e)
            interrupted.set()
        finally:
            done.set()

    # Waited for through events, not `Thread.join`: before Python 3.13 a join that Ctrl-C interrupts can mark its
    # thread ended while it still runs (CPython gh-90882), and the trial it was ending was then left RUNNING.
    dones = [threading.Event() for _ in range(at_once)]
    threads = [threading.Thread(target=work, args=(done,), name=f"kdsearch-trials-{i}", daemon=True)
               for i, done in enumerate(dones)]
    with one_ask_at_a_time(study):
        try:  # a Ctrl-C while the threads start is handled like one while they run
            for thread in threads:
                thread.start()
            for done in dones:
                done.wait()
        except KeyboardInterrupt:  # the threads end their trials as interrupted once the processes are stopped
            interrupted.set()
            session.ctx.executor.close()
            stop_waiting = time.time() + 60  # the threads end together once the processes are gone
            for thread, done in zip(threads, dones):
                if thread.ident is not None or thread.is_alive():  # started, or being started
                    done.wait(timeout=max(0.0, stop_waiting - time.time()))
            raise
    if errors:
        raise errors[0]


@contextlib.contextmanager
def one_ask_at_a_time(study: optuna.Study):
    """Serialise `study.ask` between this process's threads: on SQLite two threads could both take the same
    enqueued (WAITING) trial, as its row lock is a no-op there, and train it twice."""
    ask, lock = study.ask, threading.Lock()

    def locked_ask(*args, **kwargs):
        with lock:
            return ask(*args, **kwargs)

    study.ask = locked_ask
    try:
        yield
    finally:
        del study.ask


@contextlib.contextmanager
def long_lived_objects_frozen():
    """Keep the garbage collector off the objects that outlive the trials. torch, MLflow and pandas leave ~640k of
    them, and a full collection walked them all again: 0.3-0.6 s a pass, about one pass every two trials. What the
    trials allocate is still collected; the freeze (garbage caught in it included) ends with the trial loop."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


GIVE_UP_FACTOR = 5  # workers stop after this many trials per complete one asked for, when too few complete


def run_until_complete(session: Session, target: int, callbacks: list, failures, poll_s: float = 1.0) -> None:
    """One of several workers: take trials until the study holds `target` complete ones, `search.timeout` has
    passed, or `failures` stops it. While trials running elsewhere would reach the target, wait; a trial of a dead
    process on this host is failed and queued again, and one running elsewhere for far longer than trials take
    (a dead machine on a journal file, which has no heartbeats) is no longer waited for."""
    study, cfg, client = session.study, session.ctx.cfg, session.ctx.client
    deadline = time.time() + cfg.search.timeout if cfg.search.timeout else math.inf
    trials = study.get_trials(deepcopy=False)
    first, give_up_after = len(trials), GIVE_UP_FACTOR * max(1, target - sum(t.state == COMPLETE for t in trials))
    while not failures.reason and time.time() < deadline:
        optuna.storages.fail_stale_trials(study)
        fail_dead_local_trials(study, client)
        trials = study.get_trials(deepcopy=False)
        complete = sum(t.state == COMPLETE for t in trials)
        if complete >= target:
            return
        if len(trials) - first >= give_up_after:
            raise KdsearchError(_give_up_message(trials, complete, target, len(trials) - first))
        waiting = any(t.state == WAITING for t in trials)
        if complete + len(live_trials(trials, cfg.search.grace_period)) >= target and not waiting:
            time.sleep(poll_s)
            continue
        study.optimize(lambda trial: surplus_checked(session.ctx, trial, target), n_trials=1, catch=(Exception,),
                       callbacks=callbacks)


SURPLUS = "surplus:"  # how a surplus trial's prune reason starts


def surplus_checked(ctx, trial: optuna.Trial, target: int):
    """`objective`, unless the trials numbered below this one already make the target (complete, or running and
    worth waiting for): two workers that saw the study one short at the same moment both asked for a trial, and
    the later one is pruned before it samples anything (and has no MLflow run). A queued trial (a baseline, a warm
    start, a killed trial's retry) always runs."""
    trials = trial.study.get_trials(deepcopy=False)
    mine = next(t for t in trials if t.number == trial.number)
    if "fixed_params" in mine.system_attrs or "failed_trial" in mine.system_attrs:
        return objective(ctx, trial)
    below = [t for t in trials if t.number < trial.number]
    ahead = sum(t.state == COMPLETE for t in below) + len(live_trials(below, ctx.cfg.search.grace_period))
    if ahead >= target:
        reason = f"{SURPLUS} {ahead} trials before it already complete or run toward the {target} asked for"
        trial.set_user_attr("prune_reason", reason)
        raise optuna.TrialPruned(reason)
    return objective(ctx, trial)


def live_trials(trials: list[optuna.trial.FrozenTrial], grace_period: float) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials worth waiting for: those started less than max(grace_period, 3x the slowest complete trial)
    ago."""
    took = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.state == COMPLETE]
    patience = max(grace_period, 3 * max(took, default=0.0))
    now = time.time()
    return [t for t in trials if t.state == RUNNING and t.datetime_start
            and now - t.datetime_start.timestamp() < patience]


def _give_up_message(trials: list[optuna.trial.FrozenTrial], complete: int, target: int, attempts: int) -> str:
    reasons = [t.user_attrs.get("prune_reason") or t.user_attrs.get("fail_reason") for t in trials]
    reasons = [r for r in reasons if r and not r.startswith(SURPLUS)]  # a surplus trial says nothing of the limits
    reason = reasons[-1] if reasons else "see the trials' reasons in MLflow"
    return (f"stopped: only {complete} of {target} trials are complete after {attempts} more were tried (the last: "
            f"{reason}): loosen search.max_params, search.max_latency_ms or the pruner, then resume")
