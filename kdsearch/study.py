"""The Optuna study itself: create or resume it, its sampler, its enqueued baselines.

Every trial's sampler is seeded from the study seed and the trial's number. Optuna hands out each number once, to
one process, so workers and machines that ask for a trial at the same moment are given different students, while
one process replays the same study for the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
import warnings
from collections.abc import Callable

import optuna

from kdsearch import KdsearchError, first_line
from kdsearch.config import StudyConfig, families, kd_methods
from kdsearch.kd_losses import METHOD_DEFAULTS, METHOD_SPACE
from kdsearch.pruning import study_pruner
from kdsearch.storage import RETRY_KEEPS, open_storage, worker_identity
from kdsearch.students import middle_params, params_in_space, translated_params

DIRECTIONS = {"pareto": ["maximize", "minimize", "minimize"], "budget": ["maximize"]}
METRIC_NAMES = {"pareto": ["val_acc", "params", "latency_ms"], "budget": ["val_acc"]}
# Settings that may change when a study is resumed; anything else must match the study's first session.
RESUMABLE_KEYS = ("n_trials", "timeout", "heartbeat_interval", "grace_period")


def trial_seed(study_seed: int, number: int) -> int:
    return study_seed * 1_000_003 + number


# The Optuna features used here that Optuna still calls experimental (multivariate TPE, GP, metric names, stale-trial
# checks, heartbeats) are settled for our use. Ignored once for the process: a `catch_warnings` block per trial
# would reset Python's once-only registry and repeat every other warning each trial.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Only kdsearch enqueues trials (baselines at their papers' values, warm starts checked against the space): a no-KD
# baseline's alpha 0 below a range starting above 0 is meant, and Optuna's warning broke into the progress lines.
warnings.filterwarnings("ignore", message=r"Fixed parameter \S+ with value .* is out of range")


def _sampler_of(name: str, conditional: bool = False) -> Callable[[int], optuna.samplers.BaseSampler]:
    """`conditional`: the study searches several student families, each trial holding its own family's knobs; TPE
    then models each group of parameters that occur together (`group=True`, which needs its multivariate model),
    where otherwise it would model only the knobs every trial shares and sample the families' own at random. One
    family: TPE models each parameter on its own, as Optuna's default does; its multivariate model found worse
    fronts on the default study (BENCHMARKS.md, issue 19)."""
    def make(seed: int) -> optuna.samplers.BaseSampler:
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=conditional, group=conditional)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)
    return make


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler made afresh for each trial, seeded with `trial_seed(seed, trial.number)`. What the samplers
    decide from is read back from the study (the finished trials; NSGA-II's generations), so only the random state
    changes; the GP sampler also loses the warm start of its kernel fit, which costs it time, not quality."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed = make, seed
        self._inner = make(seed)
        self._per_trial: dict[int, optuna.samplers.BaseSampler] = {}  # trials in progress here, by trial id

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # Kept per trial, not in one attribute: with parallel trials (`run_trials`) another thread's trial begins
        # while this one still samples, and must not swap its sampler (and seed) underneath it.
        inner = self._inner = self._per_trial[trial._trial_id] = self._make(trial_seed(self._seed, trial.number))
        inner.before_trial(study, trial)

    def _of(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.BaseSampler:
        return self._per_trial.get(trial._trial_id, self._inner)

    def infer_relative_search_space(self, study, trial):
        return self._of(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._of(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._of(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._per_trial.pop(trial._trial_id, self._inner).after_trial(study, trial, state, values)


def make_sampler(cfg: StudyConfig) -> TrialSeededSampler:
    """The study file's sampler. The limits reach it as constraints that each trial sets (`trial.set_constraint`)."""
    conditional = len(families(cfg.student)) > 1 or len(kd_methods(cfg.distill)) > 1
    return TrialSeededSampler(_sampler_of(cfg.search.sampler, conditional), cfg.seed)


def open_study(cfg: StudyConfig, study_name: str, storage: str | optuna.storages.BaseStorage,
               warm_start_from: str | None = None) -> optuna.Study:
    """Create the study, or load it when it exists and was made from the same study file. A new study may start
    with the front of an earlier study in the same storage (`warm_start_from`) enqueued first."""
    directions = DIRECTIONS[cfg.search.mode]
    if isinstance(storage, str):
        storage = open_storage(storage)
    earlier = _earlier_study(warm_start_from, storage) if warm_start_from else None  # before anything is made
    sampler, pruner = make_sampler(cfg), study_pruner(cfg.search, cfg.distill.epochs)
    try:  # made here, or already there: only the process that makes it enqueues its first trials
        try:
            study = optuna.create_study(study_name=study_name, storage=storage, directions=directions,
                                        sampler=sampler, pruner=pruner)
            made_here = True
            study.set_user_attr("uid", uuid.uuid4().hex)  # tells this study's MLflow runs from an earlier namesake's
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
            made_here = False
    except (ValueError, optuna.exceptions.StorageInternalError) as e:
        raise KdsearchError(f"cannot open study '{study_name}' ({first_line(e)}): check --storage") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise KdsearchError(f"study '{study_name}' exists with other objectives: pass a new --study-name")
    wanted = _comparable(cfg)
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", wanted)
    elif _older_defaults_filled(stored) != wanted:
        raise KdsearchError(f"study '{study_name}' exists with a different study file: pass a new --study-name, "
                            "or resume with the file it was started with")
    if study.metric_names is None:  # optuna-dashboard shows these names (also for studies made before they were set)
        study.set_metric_names(METRIC_NAMES[cfg.search.mode])
    # Not `not study.trials`: two hosts that open a new study at the same moment would both see it empty
    new = made_here
    if earlier is not None:
        if new:
            enqueue_front(study, cfg, earlier, skip_baselines=cfg.search.baselines)
        else:
            print(f"--warm-start-from {warm_start_from}: study '{study_name}' already exists; nothing enqueued")
    if cfg.search.baselines and new:
        enqueue_baselines(study, cfg)
    elif cfg.search.baselines:
        requeue_interrupted_baselines(study)
    return study


def _earlier_study(name: str, storage: optuna.storages.BaseStorage) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise KdsearchError(f"--warm-start-from {name}: no study of that name in this --storage: pass the "
                            "--study-name of an earlier study in the same storage") from None


def enqueue_front(study: optuna.Study, cfg: StudyConfig, earlier: optuna.Study, skip_baselines: bool = False
                  ) -> list[int]:
    """Enqueue the students of `earlier`'s front (its best trials) that lie in this study's search space; return
    their trial numbers in `earlier`. With `skip_baselines`, its baselines are left to this study's own."""
    taken, outside = [], []
    for t in earlier.best_trials:
        if skip_baselines and "baseline" in t.user_attrs:
            continue
        params = translated_params(cfg, t.params, t.user_attrs.get("family", t.params.get("arch", "convnet")))
        if params_in_space(cfg, params):
            study.enqueue_trial(params, user_attrs={"warm_start": f"{earlier.study_name}#{t.number}",
                                                    "enqueued_by": worker_identity()["worker"]})
            taken.append(t.number)
        else:
            outside.append(t.number)
    print(f"warm start from '{earlier.study_name}': enqueued its front's trials {taken}"
          + (f"; left out {outside}, outside this study's search space" if outside else ""), flush=True)
    return taken


def enqueue_baselines(study: optuna.Study, cfg: StudyConfig) -> None:
    """Reference students first: a mid-sized student trained without distillation (alpha = 0), and the same
    student, learning rate and seed distilled by each of the study's KD methods at its paper's values (kd: alpha
    0.5 at T = 4); the report shows each difference. With `search.baseline_repeats` > 1, that many sets, each with
    a seed of its own; with several student families, as many sets for each family."""
    pair, here = 0, worker_identity()["worker"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a value may lie outside the study's range; Optuna warns, then uses it
        for family in families(cfg.student):
            for repeat in range(cfg.search.baseline_repeats):
                seed = trial_seed(cfg.seed, repeat)
                for kind, params in baseline_params(cfg).items():
                    study.enqueue_trial({**middle_params(cfg, family), **params},
                                        user_attrs={"baseline": kind, "baseline_pair": pair, "seed": seed,
                                                    "baseline_family": family, "enqueued_by": here})
                pair += 1


def requeue_interrupted_baselines(study: optuna.Study) -> None:
    """A resumed study queues again, on top of this session's trials, each baseline a Ctrl-C stopped (FAIL without
    a reason) that no other trial has replaced: without it the KD gain would lack its pair for good. A baseline
    that failed for a reason (an error, a dead worker, which is retried by itself) is not queued again."""
    def key(a: dict) -> tuple:
        return a["baseline"], a.get("baseline_pair"), a.get("baseline_family", "convnet")

    trials = [t for t in study.get_trials(deepcopy=False) if "baseline" in t.user_attrs]
    covered = {key(t.user_attrs) for t in trials
               if t.state != optuna.trial.TrialState.FAIL or t.user_attrs.get("fail_reason")}
    here = worker_identity()["worker"]
    for t in trials:
        if key(t.user_attrs) not in covered:
            covered.add(key(t.user_attrs))
            kept = {k: v for k, v in t.user_attrs.items() if k in RETRY_KEEPS}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a value may lie outside the study's range, as when first queued
                # as first queued: an interrupt may have come before the trial asked for all of them
                study.enqueue_trial(t.system_attrs.get("fixed_params", t.params),
                                    user_attrs={**kept, "enqueued_by": here})
            print(f"baseline trial {t.number} ({t.user_attrs['baseline']}) was interrupted: queued again", flush=True)


def waiting_enqueued(study: optuna.Study) -> dict[str, int]:
    """The trials this process enqueued (it made the study) that have not run yet, by kind. They come on top of its
    `search.n_trials`, not being the sampler's picks (counted in, baselines cost the default study 2 of its 20
    trials, BENCHMARKS.md, and a front left the baselines waiting). Another host, or a resumed session, runs what
    is left within its own."""
    here = worker_identity()["worker"]
    mine = [t for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.WAITING])
            if t.user_attrs.get("enqueued_by") == here]
    return {"baselines": sum("baseline" in t.user_attrs for t in mine),
            "warm starts": sum("warm_start" in t.user_attrs for t in mine)}


BASELINE_ALPHAS = {"no-kd": 0.0, "kd": 0.5}


def baseline_distillation(cfg: StudyConfig) -> dict:
    """The baselines' T and learning rate: T = 4 (within the study's range) and the middle of the study's
    learning-rate range on a log scale."""
    d = cfg.distill
    return {"temperature": min(max(4.0, d.temperature[0]), d.temperature[1]), "lr": math.sqrt(d.lr[0] * d.lr[1])}


def baseline_params(cfg: StudyConfig) -> dict[str, dict]:
    """The baselines' distillation parameters by kind: "no-kd", then each of the study's methods at its paper's
    values (see `kd_losses.METHOD_DEFAULTS`) within the study's ranges. See `students.sample_distillation`."""
    d, methods = cfg.distill, kd_methods(cfg.distill)
    shared = baseline_distillation(cfg)

    def params(method: str, **knobs) -> dict:
        return {**({"method": method} if len(methods) > 1 else {}), **shared, **knobs}

    out = {"no-kd": params("kd", alpha=0.0) if "kd" in methods else dict(shared)}
    for method in methods:
        paper = METHOD_DEFAULTS[method]
        temperature = paper.get("tau", paper.get("temperature"))
        knobs = {f"{method}.{k}": min(max(paper[k], low), high) for k, (low, high) in METHOD_SPACE[method].items()}
        out[method] = params(method, **knobs, temperature=min(max(temperature, d.temperature[0]), d.temperature[1]),
                             **({"alpha": BASELINE_ALPHAS["kd"]} if method == "kd" else {}))
    return out


# Keys added to the study file since the first studies, with the value that keeps a study made before each its
# earlier behaviour: channel counts were not rounded; latency was timed in eager PyTorch.
ADDED_KEYS = {("student", "channel_multiple"): 1, ("latency", "runtime"): "torch"}
# Defaults changed since, with the earlier defaults: a study made with one resumes with it while the file leaves
# the key at today's default.
CHANGED_DEFAULTS = {("student", "channel_multiple"): (8, 4)}


def as_it_was_made(cfg: StudyConfig, stored: dict | None) -> StudyConfig:
    """The study file's config for a study made by an earlier kdsearch: keys added since that the file leaves at
    their defaults take the values that keep the study's earlier behaviour."""
    defaults = StudyConfig()
    for (section, key), earlier in ADDED_KEYS.items():
        made = (stored or {}).get(section)
        now = getattr(cfg, section)
        if made and key not in made and getattr(now, key) == getattr(getattr(defaults, section), key):
            cfg = cfg.replace(**{section: dataclasses.replace(now, **{key: earlier})})
    for (section, key), earlier in CHANGED_DEFAULTS.items():
        made = (stored or {}).get(section) or {}
        now = getattr(cfg, section)
        if made.get(key) in earlier and getattr(now, key) == getattr(getattr(defaults, section), key):
            cfg = cfg.replace(**{section: dataclasses.replace(now, **{key: made[key]})})
    return cfg


def _older_defaults_filled(stored: dict) -> dict:
    """A stored config made by an earlier kdsearch, with the keys added since at their defaults (or at the values
    that keep the earlier behaviour, see ADDED_KEYS), so such a study resumes."""
    defaults = _comparable(StudyConfig())
    filled = {section: {**defaults[section], **value} if isinstance(value, dict) else value
              for section, value in stored.items()}
    for (section, key), earlier in ADDED_KEYS.items():
        if section in stored and key not in stored[section]:
            filled[section][key] = earlier
    return filled


def _comparable(cfg: StudyConfig) -> dict:
    """The config as the study stores it (JSON: ranges become lists), less what may change on resume."""
    d = json.loads(json.dumps(cfg.to_dict()))
    for key in RESUMABLE_KEYS:
        d["search"].pop(key)
    d["data"].pop("data_dir")
    d["data"].pop("skip_unreadable")  # whether to skip bad files; the data's identity is checked by the teacher
    d["latency"].pop("min_run_time")  # how long a latency is timed, not what is measured
    d.pop("engine")  # how a process trains (threads, compile) may differ between sessions and workers
    d.pop("refine")  # what is refined after the search, not what the search is
    return d
