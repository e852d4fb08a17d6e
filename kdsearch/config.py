"""The study file: TOML in, one validated `StudyConfig` out.

Every key, its type and its default live in the dataclasses below; `docs/study-file.md` describes them.
A search range is a two-element list `[low, high]`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from kdsearch import KdsearchError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")
SAMPLERS = ("tpe", "nsga2", "random", "gp")
MODES = ("pareto", "budget")
LATENCY_DTYPES = ("float32", "bfloat16", "float16")
LATENCY_RUNTIMES = ("onnxruntime", "torch")
PRUNERS = ("auto", "none", "dominated", "rungs", "median", "hyperband")
AUGMENTATIONS = ("none", "crop", "crop-flip")
STUDENT_FAMILIES = ("convnet", "separable", "resnet")
SCHEDULES = ("auto", "cosine", "warmup-cosine")


class Families(str):
    """`student.arch`: one family name (a string), or several (a list) to sample the family as a categorical."""


class AutoFloat(str):
    """A number, or "auto" for the student family's default."""


class AutoBool(str):
    """true or false, or "auto" for the student family's default."""


RESERVED_KNOBS = ("arch", "family", "temperature", "alpha", "lr", "seed", "epochs", "batch_size", "channels",
                  "trial", "params", "latency_ms", "val_acc", "test_acc", "flops", "schedule", "decay_norms",
                  "label_smoothing")


class IntOrRange(int):
    """An integer, or an int range `[low, high]` to search."""


class Knobs(dict):
    """A user builder's knobs: `name = [low, high]` is searched, a list of strings is a choice, a scalar is fixed."""


class Range(tuple):
    """A `[low, high]` float search range."""


class IntRange(tuple):
    """A `[low, high]` integer search range."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    val_fraction: float = 0.2
    test_fraction: float = 0.2  # only for datasets without an official test split (digits, imagefolder)
    image_size: int = 32  # imagefolder only: images are resized to this square
    augment: str = "none"  # batched on the device: random crop with 4-pixel padding, and horizontal flip
    memory_gb: float = 0.0  # imagefolder: larger datasets stream from disk; 0: half the available memory
    skip_unreadable: bool = False  # imagefolder: leave out images that cannot be read (and say how many)


@dataclass(frozen=True)
class TeacherConfig:
    arch: str = "convnet"  # convnet, torchvision:<model name> (trained here, no weights downloaded)
    width: int = 32  # channels of the first stage; each later stage doubles them
    depth: int = 3  # convolution stages
    convs_per_stage: int = 1
    epochs: int = 20
    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 5e-4
    checkpoint: str = ""  # a state_dict for `arch`, a torch.export (.pt2) or TorchScript file, instead of training


@dataclass(frozen=True)
class SeparableConfig:
    base_width: int = 8  # stem channels at width multiplier 1; stage i has (i + 1) times as many
    width: Range = Range((0.5, 2.0))  # sampled on a log scale
    depth: IntRange = IntRange((2, 4))  # stages, each halving the image
    blocks: IntRange = IntRange((1, 2))  # blocks per stage
    expand: IntRange = IntRange((1, 4))  # 1: plain separable convs; above 1: inverted residuals


@dataclass(frozen=True)
class ResnetConfig:
    base_width: int = 16  # channels of the first stage at width 1 (16, 32, 64: the CIFAR ResNets)
    width: Range = Range((0.25, 1.0))  # sampled on a log scale
    blocks: IntRange = IntRange((1, 3))  # basic blocks per stage: 1 resnet8, 2 resnet14, 3 resnet20


@dataclass(frozen=True)
class StudentConfig:
    arch: Families = Families("convnet")  # a family, a list of families, or a builder "package.module:function"
    # built-in families round channel counts to a multiple of this (1: no rounding); in ONNX Runtime other counts
    # ran 1.1-4.5x slower per parameter, multiples of 4 within 1.14x of 8's (benchmarks/bench_channels.py)
    channel_multiple: int = 4
    # the convnet's knobs
    base_width: int = 8  # channels of the first stage at width multiplier 1
    width: Range = Range((0.25, 2.0))  # channel multiplier, sampled on a log scale
    depth: IntRange = IntRange((1, 3))
    convs_per_stage: IntOrRange = 1  # or a range [low, high] to search
    separable: SeparableConfig = field(default_factory=SeparableConfig)
    resnet: ResnetConfig = field(default_factory=ResnetConfig)
    custom: Knobs = field(default_factory=Knobs)  # a user builder's knobs


@dataclass(frozen=True)
class DistillConfig:
    temperature: Range = Range((1.0, 20.0))  # sampled on a log scale
    alpha: Range = Range((0.0, 1.0))
    lr: Range = Range((0.01, 0.3))  # sampled on a log scale
    epochs: int = 10
    batch_size: int = 64
    weight_decay: float = 5e-4
    # "auto" takes the student family's default (see students.TRAINING_DEFAULTS)
    schedule: str = "auto"  # cosine, or warmup-cosine (a linear warm-up over the first epoch, then cosine)
    decay_norms: AutoBool = AutoBool("auto")  # weight decay on BatchNorm and bias parameters too, or weights only
    label_smoothing: AutoFloat = AutoFloat("auto")  # of the hard-label term, in [0, 1)


@dataclass(frozen=True)
class SearchConfig:
    n_trials: int = 20
    timeout: float = 0.0  # seconds; 0 means no limit
    sampler: str = "tpe"
    mode: str = "pareto"  # pareto: (val_acc, params, latency_ms); budget: val_acc under the limits below
    max_params: int = 0  # 0: no limit; a student above it is rejected before training
    max_latency_ms: float = 0.0  # 0: no limit
    pruner: str = "auto"  # auto: dominated in pareto mode, median in budget mode
    prune_margin: float = 0.05  # dominated pruning: accuracy a trial may trail the dominating one by, per epoch
    rung_eta: int = 3  # rungs pruning: rungs at epochs rung_min_epochs * eta**k; the best 1/eta of a rung go on
    rung_min_epochs: int = 1
    baselines: bool = True  # enqueue a reference student without distillation (alpha = 0) and its distilled twin
    baseline_repeats: int = 1  # baseline pairs, each with its own seed: the KD gain's spread over seeds
    heartbeat_interval: int = 30  # seconds between a worker's heartbeats (RDB storage other than SQLite)
    grace_period: int = 90  # seconds without a heartbeat after which a trial's worker counts as dead


@dataclass(frozen=True)
class LatencyConfig:
    # onnxruntime: the network's ONNX graph (as `export` writes it) in ONNX Runtime, as it is deployed; torch: eager
    # PyTorch, which at batch 1 mostly times its per-operator dispatch (up to 27x the ONNX Runtime figure here)
    runtime: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 1
    batch_size: int = 1
    dtype: str = "float32"  # float32, bfloat16 or float16 (float16 on CUDA only)
    # seconds of timing per measurement, after warm-up; 0.1 and 0.2 gave the same spread of medians here (2-9%,
    # the machine's own noise) and 0.1 saves ~0.1 s a trial
    min_run_time: float = 0.1


@dataclass(frozen=True)
class EngineConfig:
    threads: int = 0  # CPU threads for training; 0: every core this process may use
    compile: bool = False  # torch.compile the student (made CPU epochs slower here, and costs ~30 s a trial)
    parallel_trials: int = 0  # trials trained at once in forked processes on a CPU; 0: one per core (at most 8)


@dataclass(frozen=True)
class StudyConfig:
    name: str = "digits"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> StudyConfig:
        return dataclasses.replace(self, **sections)


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read, override (`section.key=value` strings) and validate a study file."""
    path = Path(path)
    if not path.is_file():
        raise KdsearchError(f"study file {path} not found: pass an existing .toml file (see studies/)")
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise KdsearchError(f"{path} is not valid TOML ({e}): fix the syntax") from None
    for item in overrides or []:
        _apply_override(table, item)
    config = build(StudyConfig, table, str(path))
    check_values(config, str(path))
    return config


def _apply_override(table: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise KdsearchError(f"--set {item!r}: write it as section.key=value, e.g. --set distill.epochs=5")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word is taken as a string
    *sections, last = key.strip().split(".")
    for name in sections:
        table = table.setdefault(name, {})
        if not isinstance(table, dict):
            raise KdsearchError(f"--set {item!r}: {name} is not a section")
    table[last] = value


def build(cls: type, table: Any, where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a TOML table, checking keys and types; `where` names the file."""
    if not isinstance(table, dict):
        raise KdsearchError(f"{where}: {prefix.rstrip('.')} = {table!r}: expected a table [{prefix.rstrip('.')}]")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{prefix}{near[0]}'?" if near else f"valid keys: {', '.join(names)}"
            raise KdsearchError(f"{where}: unknown key '{prefix}{key}': {hint}")
    values = {}
    for name in names:
        if name in table:
            values[name] = _convert(hints[name], table[name], where, f"{prefix}{name}")
    return cls(**values)


def _convert(kind: type, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return build(kind, value, where, f"{key}.")
    if kind in (AutoFloat, AutoBool):
        return "auto" if value == "auto" else _scalar(float if kind is AutoFloat else bool, value, where, key)
    if kind is Families:
        return _families(value, where, key)
    if kind is Knobs:
        return _knobs(value, where, key)
    if kind is IntOrRange:
        if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
            return _convert(IntRange, value, where, key)
        if type(value) is not int:
            raise KdsearchError(f"{where}: {key} = {value!r}: expected an integer or an integer range [low, high], "
                                "e.g. 2 or [1, 3]")
        return value
    if kind in (Range, IntRange):
        scalar = float if kind is Range else int
        if not (isinstance(value, list) and len(value) == 2):
            raise KdsearchError(f"{where}: {key} = {value!r}: expected a range [low, high]")
        low, high = (_scalar(scalar, v, where, key) for v in value)
        if low > high:
            raise KdsearchError(f"{where}: {key} = {value!r}: low is above high; write [{high}, {low}]")
        return kind((low, high))
    return _scalar(kind, value, where, key)


def _families(value: Any, where: str, key: str) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value
    if not (isinstance(value, list) and value and all(v in STUDENT_FAMILIES for v in value)
            and len(set(value)) == len(value)):
        raise KdsearchError(f"{where}: {key} = {value!r}: expected a family name, a list of distinct families from "
                            f"{', '.join(STUDENT_FAMILIES)}, or a builder 'package.module:function'")
    return tuple(value) if len(value) > 1 else value[0]


def _knobs(table: Any, where: str, key: str) -> dict:
    if not isinstance(table, dict):
        raise KdsearchError(f"{where}: {key} = {table!r}: expected a table [{key}] of knob = value or [low, high]")
    knobs = {}
    for name, value in table.items():
        if name in RESERVED_KNOBS or "." in name:
            raise KdsearchError(f"{where}: {key}.{name}: this name is taken by kdsearch's own parameters "
                                f"({', '.join(RESERVED_KNOBS)}) or has a dot: rename the builder's knob")
        if isinstance(value, list) and len(value) == 2 and all(type(v) in (int, float) for v in value):
            kind = IntRange if all(type(v) is int for v in value) else Range
            knobs[name] = _convert(kind, value, where, f"{key}.{name}")
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            knobs[name] = list(value)
        elif type(value) in (int, float, str, bool):
            knobs[name] = value
        else:
            raise KdsearchError(f"{where}: {key}.{name} = {value!r}: use a number, a string, true/false, a range "
                                "[low, high] or a list of strings to choose from")
    return Knobs(knobs)


def _scalar(kind: type, value: Any, where: str, key: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind or (kind is float and not math.isfinite(value)):
        expected = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}[kind]
        raise KdsearchError(f"{where}: {key} = {value!r}: expected {expected}")
    return value


def check_values(c: StudyConfig, where: str) -> None:
    """Checks on allowed values that the types alone do not express."""
    choices = [
        ("data.dataset", c.data.dataset, DATASETS),
        ("search.sampler", c.search.sampler, SAMPLERS),
        ("data.augment", c.data.augment, AUGMENTATIONS),
        ("search.mode", c.search.mode, MODES),
        ("search.pruner", c.search.pruner, PRUNERS),
        ("distill.schedule", c.distill.schedule, SCHEDULES),
        ("latency.runtime", c.latency.runtime, LATENCY_RUNTIMES),
    ]
    for key, value, allowed in choices:
        if value not in allowed:
            raise KdsearchError(f"{where}: {key} = {value!r} is unknown: use one of {', '.join(allowed)}")
    _check_families(c, where)
    positive = {
        "teacher.width": c.teacher.width, "teacher.depth": c.teacher.depth,
        "teacher.convs_per_stage": c.teacher.convs_per_stage, "teacher.batch_size": c.teacher.batch_size,
        "teacher.lr": c.teacher.lr, "student.base_width": c.student.base_width,
        "student.width": c.student.width[0], "student.depth": c.student.depth[0],
        "student.convs_per_stage": _low(c.student.convs_per_stage), "distill.temperature": c.distill.temperature[0],
        "distill.lr": c.distill.lr[0], "distill.epochs": c.distill.epochs,
        "distill.batch_size": c.distill.batch_size, "search.n_trials": c.search.n_trials,
        "latency.threads": c.latency.threads, "latency.batch_size": c.latency.batch_size,
        "latency.min_run_time": c.latency.min_run_time, "data.image_size": c.data.image_size,
        "search.heartbeat_interval": c.search.heartbeat_interval, "search.grace_period": c.search.grace_period,
        "search.baseline_repeats": c.search.baseline_repeats, "search.rung_min_epochs": c.search.rung_min_epochs,
        "student.channel_multiple": c.student.channel_multiple,
        "student.separable.base_width": c.student.separable.base_width,
        "student.separable.width": c.student.separable.width[0],
        "student.separable.depth": c.student.separable.depth[0],
        "student.separable.blocks": c.student.separable.blocks[0],
        "student.separable.expand": c.student.separable.expand[0],
        "student.resnet.base_width": c.student.resnet.base_width, "student.resnet.width": c.student.resnet.width[0],
        "student.resnet.blocks": c.student.resnet.blocks[0],
    }
    for key, value in positive.items():
        if value <= 0:
            raise KdsearchError(f"{where}: {key} = {value} must be above 0")
    for key, value in {"teacher.epochs": c.teacher.epochs, "search.timeout": c.search.timeout,
                       "teacher.weight_decay": c.teacher.weight_decay,
                       "distill.weight_decay": c.distill.weight_decay, "engine.threads": c.engine.threads,
                       "engine.parallel_trials": c.engine.parallel_trials, "search.max_params": c.search.max_params,
                       "search.max_latency_ms": c.search.max_latency_ms, "search.prune_margin": c.search.prune_margin,
                       "data.memory_gb": c.data.memory_gb}.items():
        if value < 0:
            raise KdsearchError(f"{where}: {key} = {value} must not be negative")
    if c.distill.label_smoothing != "auto" and not 0 <= c.distill.label_smoothing < 1:
        raise KdsearchError(f"{where}: distill.label_smoothing = {c.distill.label_smoothing} must lie in [0, 1)")
    if not (0 <= c.distill.alpha[0] and c.distill.alpha[1] <= 1):
        raise KdsearchError(f"{where}: distill.alpha = {list(c.distill.alpha)} must lie within [0, 1]")
    for key, value in {"data.val_fraction": c.data.val_fraction, "data.test_fraction": c.data.test_fraction}.items():
        if not 0 < value < 0.5:
            raise KdsearchError(f"{where}: {key} = {value} must lie between 0 and 0.5")
    if c.search.grace_period <= c.search.heartbeat_interval:
        raise KdsearchError(f"{where}: search.grace_period = {c.search.grace_period} must exceed "
                            f"search.heartbeat_interval = {c.search.heartbeat_interval}, or live workers are taken for "
                            "dead between two heartbeats: raise grace_period (3x the interval is usual)")
    if c.search.pruner in ("median", "hyperband") and c.search.mode == "pareto":
        raise KdsearchError(f"{where}: search.pruner = {c.search.pruner!r} needs one objective: use "
                            "search.mode = 'budget', or pruner 'dominated' for the Pareto mode")
    if c.search.pruner in ("dominated", "rungs") and c.search.mode == "budget":
        raise KdsearchError(f"{where}: search.pruner = {c.search.pruner!r} is for the Pareto mode: use 'median' "
                            "or 'hyperband' in budget mode")
    if c.search.rung_eta < 2:
        raise KdsearchError(f"{where}: search.rung_eta = {c.search.rung_eta} must be 2 or more (3 is usual)")
    if c.latency.dtype not in LATENCY_DTYPES or (c.latency.dtype == "float16" and c.latency.device == "cpu"):
        raise KdsearchError(f"{where}: latency.dtype = {c.latency.dtype!r}: use float32 or bfloat16 "
                            "(float16 with a cuda latency.device)")
    if c.latency.device not in ("cpu", "cuda") and not c.latency.device.startswith("cuda:"):
        raise KdsearchError(f"{where}: latency.device = {c.latency.device!r}: use 'cpu' or 'cuda'")


def _low(value: int | IntRange) -> int:
    return value[0] if isinstance(value, tuple) else value


def _check_families(c: StudyConfig, where: str) -> None:
    arch = c.student.arch
    if isinstance(arch, str) and arch not in STUDENT_FAMILIES and (":" not in arch or arch.startswith("torchvision:")):
        raise KdsearchError(f"{where}: student.arch = {arch!r} is unknown: use one of {', '.join(STUDENT_FAMILIES)}, "
                            "a list of them, or a builder 'package.module:function'")
    if c.student.custom and not (isinstance(arch, str) and ":" in arch):
        raise KdsearchError(f"{where}: [student.custom] holds a user builder's knobs, but student.arch = {arch!r}: "
                            "set student.arch = 'package.module:function' or remove [student.custom]")
    t = c.teacher.arch
    if t != "convnet" and not (t.startswith("torchvision:") and len(t) > len("torchvision:")):
        raise KdsearchError(f"{where}: teacher.arch = {t!r} is unknown: use 'convnet' or 'torchvision:<model>', "
                            "e.g. 'torchvision:resnet18'")


def families(student: StudentConfig) -> list[str]:
    """The student families (or the user builder) a study samples from."""
    return [student.arch] if isinstance(student.arch, str) else list(student.arch)
