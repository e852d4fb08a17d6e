"""Refine the search's winners: the study file's `[refine]` section picks the most accurate student (by val_acc)
at or under each of its budgets (or every student of the front), and trains each again from scratch with a longer
schedule (epochs, augmentation, seeds): same architecture, KD method, T, knobs and lr.

Each training is an MLflow run ("refine trial N seed k") nested under the study's run, with its per-epoch
metrics, val_acc and test_acc and its weights. The study keeps what was refined in its user attribute
`refined:<trial>` (the settings, each seed's result, the best by val_acc), written as each seed ends: a study
whose refining was interrupted resumes with the seeds still to train, and one already refined with the same
settings is skipped. The report, `pareto.csv`, the card and `export` read the refined student where it exists.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import optuna

from kdsearch import tracking
from kdsearch.config import RefineConfig
from kdsearch.distill import correct
from kdsearch.engine import PhaseTimer, prepare_model
from kdsearch.execution import Workload, parallel_execution, processes_for
from kdsearch.storage import local_process_ended, worker_identity
from kdsearch.students import sample_student, student_spec, train_settings
from kdsearch.study import trial_seed
from kdsearch.timing_lock import training_epoch
from kdsearch.trial import StudyContext, log_weights, seeded_student, unexpected

COMPLETE = optuna.trial.TrialState.COMPLETE
SEED_OFFSET = 1_000_003  # refine seeds differ from every trial's own
WORKER, WORKER_PROCESS = "kdsearch.worker", "kdsearch.worker_process"  # tags of a refine run: its process


def refined(study: optuna.Study, number: int) -> dict | None:
    """The best refined run of trial `number` ({"seed", "val_acc", "test_acc", "run_id", "epochs", "augment"}), or
    None: what the report, the card and `export` read."""
    return (study.user_attrs.get(f"refined:{number}") or {}).get("best")


def picked(study: optuna.Study, r: RefineConfig) -> list[tuple[str, optuna.trial.FrozenTrial]]:
    """(budget, trial) for each budget's `r.top` most accurate students (fewer parameters break ties), or for each
    student of the front where the study file names no budget. A budget no student meets is reported and skipped."""
    complete = study.get_trials(deepcopy=False, states=[COMPLETE])
    budgets = [(f"params <= {b:,}", "params", b) for b in r.max_params]
    budgets += [(f"latency <= {b:g} ms", "latency_ms", b) for b in r.max_latency_ms]
    if not budgets:
        # budget mode: a student over a limit never completes (it is pruned before training)
        front = study.best_trials if len(study.directions) > 1 else \
            [max(complete, key=lambda t: t.values[0])] if complete else []
        return [("front", t) for t in sorted(front, key=lambda t: t.user_attrs["params"])]
    out = []
    for label, key, bound in budgets:
        fits = [t for t in complete if t.user_attrs[key] <= bound]
        if not fits:
            print(f"refine {label}: no complete student fits it; run more trials or loosen the bound", flush=True)
        fits.sort(key=lambda t: (t.values[0], -t.user_attrs["params"]), reverse=True)
        out += [(label, t) for t in fits[:r.top]]
    return out


def _close_dead_runs(client, exp_id: str) -> int:
    """Close as KILLED the experiment's refine runs still RUNNING whose process on this host has ended (killed, a
    power cut): their seeds were never recorded and train again; return how many."""
    runs = client.search_runs([exp_id], f"tags.`{tracking.ROLE}` = 'refine' and attributes.status = 'RUNNING'")
    closed = 0
    for run in runs:
        tags = run.data.tags
        if local_process_ended(tags.get(WORKER, ""), json.loads(tags.get(WORKER_PROCESS, "{}"))):
            client.set_tag(run.info.run_id, "kdsearch.reason", f"its process {tags[WORKER]} ended")
            client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
    return closed


def refine_study(ctx: StudyContext, study: optuna.Study) -> None:
    """Refine the students `picked` by the study file, each once however many budgets picked it, several at once
    in the session's training processes where there are cores for them; then name each budget's pick."""
    r, device = ctx.cfg.refine, ctx.data.train.y.device
    closed = _close_dead_runs(ctx.client, ctx.experiment_id)
    if closed:
        print(f"{closed} refine run{'s' if closed > 1 else ''} left RUNNING by a process that ended: closed as KILLED",
              flush=True)
    chosen = picked(study, r)
    todo = list({t.number: (label, t) for label, t in reversed(chosen)}.values())[::-1]
    work = Workload(ctx.data.train, ctx.data.val, ctx.normalize, ctx.teacher.targets(r.augment),
                    ctx.cfg.engine.compile)
    with parallel_execution(ctx, processes_for(ctx.cfg, device, len(todo)), work) as at_once, \
            ThreadPoolExecutor(at_once) as threads:
        futures = [threads.submit(_refine_or_report, ctx, study, t, label) for label, t in todo]
        for future in futures:
            future.result()
    if r.top > 1:
        _print_picks(study, chosen)


def _refine_or_report(ctx: StudyContext, study: optuna.Study, trial: optuna.trial.FrozenTrial, label: str) -> None:
    try:
        refine_trial(ctx, study, trial, label)
    except Exception as e:  # e.g. a loss that diverged with the longer schedule: the others still refine
        print(f"refining trial {trial.number} failed ({unexpected(e)}); its search result stands", flush=True)


def _print_picks(study: optuna.Study, chosen: list[tuple[str, optuna.trial.FrozenTrial]]) -> None:
    """Each budget's student, most accurate by refined val_acc among those refined (test_acc only reported)."""
    for label in dict.fromkeys(label for label, _ in chosen):
        done = [(refined(study, t.number), t) for lab, t in chosen if lab == label and refined(study, t.number)]
        if done:
            best, t = max(done, key=lambda bt: (bt[0]["val_acc"], -bt[1].user_attrs["params"]))
            print(f"{label}: trial {t.number} ({t.user_attrs['params']:,} params), picked by refined val_acc "
                  f"{best['val_acc']:.4f} among {len(done)}; test_acc {best['test_acc']:.4f}", flush=True)


def refine_trial(ctx: StudyContext, study: optuna.Study, trial: optuna.trial.FrozenTrial, label: str) -> dict:
    """Train `trial`'s student `refine.seeds` times with the refine schedule; record and return the best."""
    r = ctx.cfg.refine
    settings_key = {"epochs": r.epochs, "augment": r.augment, "seeds": r.seeds}
    attr = f"refined:{trial.number}"
    record = study.user_attrs.get(attr) or {}
    if record.get("settings") != settings_key:
        record = {"settings": settings_key, "seeds": []}
    for k in range(len(record["seeds"]), r.seeds):
        record["seeds"].append(_train_once(ctx, study, trial, k))
        record["best"] = max(record["seeds"], key=lambda s: s["val_acc"])
        study.set_user_attr(attr, record)
    best = record["best"]
    print(f"refined trial {trial.number} ({label}, {trial.user_attrs['params']:,} params; {r.epochs} epochs, "
          f"augment {r.augment}, {r.seeds} seed{'s' if r.seeds > 1 else ''}): val_acc {trial.values[0]:.4f} -> "
          f"{best['val_acc']:.4f}, test_acc {trial.user_attrs['test_acc']:.4f} -> {best['test_acc']:.4f}", flush=True)
    return best


def _train_once(ctx: StudyContext, study: optuna.Study, trial: optuna.trial.FrozenTrial, k: int) -> dict:
    """One refine training of `trial`'s student with seed number `k`, as its own nested MLflow run."""
    cfg, data, r = ctx.cfg, ctx.data, ctx.cfg.refine
    fixed = optuna.trial.FixedTrial(trial.params, trial.number)
    if "baseline" in trial.user_attrs:  # a plain baseline samples its distillation by its kind
        fixed.set_user_attr("baseline", trial.user_attrs["baseline"])
    family, knobs, hp = sample_student(fixed, cfg)
    seed = trial_seed(cfg.seed + SEED_OFFSET, trial.number * 1000 + k)
    spec = student_spec(family, knobs, data.input_shape, data.num_classes)
    model = seeded_student(spec, seed)
    prepare_model(model, data.train.y.device)
    settings = dataclasses.replace(train_settings(cfg, family, hp, seed), epochs=r.epochs, augment=r.augment)
    params = {**trial.params, "family": family, "refine_seed": k, "seed": seed, "epochs": r.epochs,
              "augment": r.augment}
    me = worker_identity()
    tags = {WORKER: me["worker"], WORKER_PROCESS: json.dumps(me["worker_process"])}
    run_id = tracking.start_refine_run(ctx.client, ctx.experiment_id, ctx.study_run_id, study.study_name, trial,
                                       k, params, tags)
    buffer = tracking.MetricBuffer(ctx.client, run_id)
    try:
        every = max(1, r.epochs // 10)  # a long schedule says where it is about ten times

        def on_epoch(epoch: int, loss: float, acc: float) -> None:
            buffer.add({"train_loss": loss, "val_acc": acc}, step=epoch)
            if epoch % every == 0 and epoch < r.epochs:
                print(f"refining trial {trial.number} seed {k}: epoch {epoch}/{r.epochs} val_acc {acc:.4f}",
                      flush=True)

        val_acc = ctx.executor.train(model, settings, on_epoch, PhaseTimer(data.train.y.device))
        with training_epoch():  # compute like an epoch's: never beside a latency timing
            test_acc = correct(model, data.test, ctx.normalize).float().mean().item()
        buffer.flush()
        log_weights(ctx.client, run_id, model, spec)
    except BaseException as e:
        buffer.flush()
        ctx.client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracking.log_values(ctx.client, run_id, metrics={"val_acc": val_acc, "test_acc": test_acc}, step=r.epochs)
    ctx.client.set_terminated(run_id, "FINISHED")
    return {"seed": seed, "val_acc": val_acc, "test_acc": test_acc, "run_id": run_id, "epochs": r.epochs,
            "augment": r.augment}
