"""The student search space: the families a study samples, each family's knobs, and how a trial samples them.

With one family (or a user builder) the knobs keep their own names (`width`, `depth`, ...), as before there were
families. With several, the family is a categorical parameter `arch` and each family's knobs are named
`<family>.<knob>`: a trial holds its own family's knobs only, a conditional space that every sampler handles. TPE
models each family's knobs (`group=True`); NSGA-II and GP evolve or model only the knobs every trial shares (the
family, T, alpha, lr) and sample each family's own knobs at random; random sampling is random throughout.

The KD method is sampled the same way: with several (`distill.method` a list) it is a categorical `method`, and a
trial holds its own method's knobs only (`alpha` for kd, `<method>.<knob>` for the others, see
`kd_losses.METHOD_SPACE`); every method shares `temperature` and `lr`. With one method there is no `method`
parameter, and a study of kd alone samples T, alpha and lr as it always has.
"""

from __future__ import annotations

import dataclasses
import math

import optuna

from kdsearch.config import (
    KD_METHODS,
    DistillConfig,
    IntRange,
    Range,
    StudentConfig,
    StudyConfig,
    families,
    kd_methods,
)
from kdsearch.distill import TrainSettings
from kdsearch.kd_losses import METHOD_SPACE
from kdsearch.models import FAMILIES, StudentSpec

SHARED = ("temperature", "alpha", "lr")  # distillation knobs every trial of a kd study samples


def is_distillation_param(name: str) -> bool:
    """Whether a trial's parameter is a distillation knob (one that cannot change a student's size or latency)."""
    return name in ("method", *SHARED) or name.split(".")[0] in KD_METHODS

# Training defaults per family, measured on digits with benchmarks/bench_training.py (BENCHMARKS.md); `[distill]`
# keys set to a value override them. The resnet gains from a warm-up and from leaving BatchNorm and biases
# undecayed (both beyond two standard errors over 5 seeds). For the convnet and the separable net no change
# measured better than the noise, so they train as the convnet always has; no family gained from label smoothing.
TRAINING_DEFAULTS = {
    "convnet": {"schedule": "cosine", "decay_norms": True, "label_smoothing": 0.0},
    "separable": {"schedule": "cosine", "decay_norms": True, "label_smoothing": 0.0},
    "resnet": {"schedule": "warmup-cosine", "decay_norms": False, "label_smoothing": 0.0},
}
USER_BUILDER_TRAINING = TRAINING_DEFAULTS["convnet"]


def knob_space(student: StudentConfig, family: str) -> dict:
    """The family's knobs: a Range (log scale) or IntRange is searched, a list of strings chosen from, a scalar
    fixed. Built-in families also get `channel_multiple`."""
    if family == "convnet":
        knobs = {k: getattr(student, k) for k in ("base_width", "width", "depth", "convs_per_stage")}
    elif family in FAMILIES:
        table = getattr(student, family)
        knobs = {f.name: getattr(table, f.name) for f in dataclasses.fields(table)}
    else:
        return dict(student.custom)
    return {**knobs, "channel_multiple": student.channel_multiple}


def searched(space: dict) -> dict:
    return {k: v for k, v in space.items() if isinstance(v, (Range, IntRange, list))}


def param_name(cfg: StudyConfig, family: str, knob: str) -> str:
    return f"{family}.{knob}" if len(families(cfg.student)) > 1 else knob


def sample_student(trial: optuna.Trial, cfg: StudyConfig) -> tuple[str, dict, dict]:
    """The trial's family, its knobs (fixed ones included) and the distillation knobs."""
    names = families(cfg.student)
    family = trial.suggest_categorical("arch", names) if len(names) > 1 else names[0]
    knobs = {}
    for knob, space in knob_space(cfg.student, family).items():
        name = param_name(cfg, family, knob)
        if isinstance(space, Range):
            knobs[knob] = trial.suggest_float(name, *space, log=space[0] > 0)
        elif isinstance(space, IntRange):
            knobs[knob] = trial.suggest_int(name, *space)
        elif isinstance(space, list):
            knobs[knob] = trial.suggest_categorical(name, space)
        else:
            knobs[knob] = space
    return family, knobs, sample_distillation(trial, cfg.distill)


def sample_distillation(trial: optuna.Trial, d: DistillConfig) -> dict:
    """The trial's method, T, its method's knobs and lr. A plain baseline of a study whose methods leave out kd
    trains with kd at alpha 0 without sampling a method (its methods' choices do not hold kd)."""
    methods = kd_methods(d)
    plain = trial.user_attrs.get("baseline") == "no-kd" and "kd" not in methods
    method = "kd" if plain else trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
    hp = {"method": method, "temperature": trial.suggest_float("temperature", *d.temperature, log=True)}
    if plain:
        hp["alpha"] = 0.0
    elif method == "kd":
        hp["alpha"] = trial.suggest_float("alpha", *d.alpha)
    for knob, space in METHOD_SPACE[method].items():
        hp[f"{method}.{knob}"] = trial.suggest_float(f"{method}.{knob}", *space, log=True)
    return {**hp, "lr": trial.suggest_float("lr", *d.lr, log=True)}


def student_spec(family: str, knobs: dict, input_shape: tuple[int, int, int], num_classes: int) -> StudentSpec:
    return StudentSpec(family, tuple(input_shape), num_classes, knobs)


def search_space(cfg: StudyConfig) -> dict[str, object]:
    """Every sampled parameter name and its range (a list for a choice), over all the study's families."""
    names = families(cfg.student)
    space: dict[str, object] = {"arch": names} if len(names) > 1 else {}
    for family in names:
        for knob, values in searched(knob_space(cfg.student, family)).items():
            space[param_name(cfg, family, knob)] = values
    d = cfg.distill
    methods = kd_methods(d)
    space.update({"method": methods} if len(methods) > 1 else {})
    space["temperature"] = d.temperature
    space.update({"alpha": d.alpha} if "kd" in methods else {})
    space.update({f"{m}.{k}": Range(r) for m in methods for k, r in METHOD_SPACE[m].items()})
    return {**space, "lr": d.lr}


def family_params(cfg: StudyConfig, family: str, method: str | None = None) -> list[str]:
    """The parameter names a trial of `family` (and KD `method`, default the study's first) holds."""
    names = ["arch"] if len(families(cfg.student)) > 1 else []
    names += [param_name(cfg, family, k) for k in searched(knob_space(cfg.student, family))]
    methods = kd_methods(cfg.distill)
    method = method or methods[0]
    names += (["method"] if len(methods) > 1 else []) + ["temperature"] + (["alpha"] if method == "kd" else [])
    return names + [f"{method}.{k}" for k in METHOD_SPACE[method]] + ["lr"]


def translated_params(cfg: StudyConfig, params: dict, family: str) -> dict:
    """An earlier study's trial of `family` named as this study names it: plain knob names where this study has
    one family, `arch` and `<family>.<knob>` where it has several (a warm start between the two kinds); `method`
    where this study samples several KD methods."""
    names = families(cfg.student)
    out = {"arch": family} if len(names) > 1 else {}
    for name, value in params.items():
        if name not in ("arch", "method"):
            knob = name.split(".", 1)[1] if name.startswith(f"{family}.") else name
            out[knob if is_distillation_param(knob) else param_name(cfg, family, knob)] = value
    # the KD method, named where this study samples it: the earlier trial's, else the one its knobs belong to
    method = params.get("method") or next((k.split(".")[0] for k in params if k.split(".")[0] in KD_METHODS), "kd")
    if len(kd_methods(cfg.distill)) > 1:
        out["method"] = method
    return out


def params_in_space(cfg: StudyConfig, params: dict) -> bool:
    """Whether a trial's parameters (e.g. an earlier study's) are exactly those of a family of this study, each
    within this study's range."""
    names = families(cfg.student)
    family = params.get("arch", names[0] if len(names) == 1 else None)
    methods = kd_methods(cfg.distill)
    method = params.get("method", methods[0] if len(methods) == 1 else None)
    if family not in names or method not in methods or sorted(params) != sorted(family_params(cfg, family, method)):
        return False
    space = search_space(cfg)
    return all(v in space[k] if isinstance(space[k], list) else space[k][0] <= v <= space[k][1]
               for k, v in params.items())


def middle_params(cfg: StudyConfig, family: str) -> dict:
    """A mid-sized student of `family` (the baselines): the convnet's width 1 where the range holds it (as before
    there were families), else the geometric middle (the middle for a range from 0); the middle integer; the
    first choice."""
    params: dict = {"arch": family} if len(families(cfg.student)) > 1 else {}
    for knob, space in searched(knob_space(cfg.student, family)).items():
        if isinstance(space, IntRange):
            value = round(sum(space) / 2)
        elif isinstance(space, Range):
            value = (min(max(1.0, space[0]), space[1]) if knob == "width" and family == "convnet"
                     else sum(space) / 2 if space[0] <= 0 else math.sqrt(space[0] * space[1]))
        else:
            value = space[0]
        params[param_name(cfg, family, knob)] = value
    return params


def middle_knobs(cfg: StudyConfig, family: str) -> dict:
    """The knobs (fixed ones included) of `family`'s mid-sized student."""
    space = search_space(cfg)  # the distillation knobs are not used: any value inside the study's ranges will do
    method = kd_methods(cfg.distill)[0]
    params = {k: v[0] for k, v in space.items() if k in family_params(cfg, family, method) and is_distillation_param(k)}
    return sample_student(optuna.trial.FixedTrial({**middle_params(cfg, family), **params}), cfg)[1]


def training_settings(cfg: StudyConfig, family: str) -> dict:
    """The family's training defaults, with the study file's values where it sets them."""
    defaults = TRAINING_DEFAULTS.get(family, USER_BUILDER_TRAINING)
    return {k: defaults[k] if getattr(cfg.distill, k) == "auto" else getattr(cfg.distill, k) for k in defaults}


def train_settings(cfg: StudyConfig, family: str, hp: dict, seed: int) -> TrainSettings:
    """How a trial trains a student of `family` with its sampled method, T, knobs and lr (`hp`, as
    `sample_distillation` returns it): the study's schedule, the family's training defaults (`training_settings`)
    and the trial's seed."""
    d = cfg.distill
    training = training_settings(cfg, family)
    method = hp.get("method", "kd")
    knobs = tuple((k.split(".", 1)[1], v) for k, v in hp.items() if k.startswith(f"{method}."))
    return TrainSettings(epochs=d.epochs, lr=hp["lr"], batch_size=d.batch_size, weight_decay=d.weight_decay,
                         temperature=hp["temperature"], alpha=hp.get("alpha", 0.0), seed=seed,
                         augment=cfg.data.augment, method=method, method_knobs=knobs, **training)
