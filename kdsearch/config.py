"""The study file's schema: every key, its type, its default and its allowed values, stated once in the
dataclasses below, and `check_values`, which holds a `StudyConfig` to them (`study_file.py` reads the TOML into
one). `docs/study-file.md` describes the keys. A search range is a two-element list `[low, high]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from kdsearch import KdsearchError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")
SAMPLERS = ("tpe", "nsga2", "random", "gp")
MODES = ("pareto", "budget")
LATENCY_DTYPES = ("float32", "bfloat16", "float16")
LATENCY_RUNTIMES = ("onnxruntime", "torch")
PRUNERS = ("auto", "none", "dominated", "rungs", "median", "hyperband")
AUGMENTATIONS = ("none", "crop", "crop-flip")
STUDENT_FAMILIES = ("convnet", "separable", "resnet")
SCHEDULES = ("auto", "cosine", "warmup-cosine")
KD_METHODS = ("kd", "dkd", "dist", "ls")  # see kd_losses


class Families(str):
    """`student.arch`: one family name (a string), or several (a list) to sample the family as a categorical."""


class Methods(str):
    """`distill.method`: one KD method (a string), or several (a list) to sample the method as a categorical."""


class AutoFloat(str):
    """A number, or "auto" for the student family's default."""


class AutoBool(str):
    """true or false, or "auto" for the student family's default."""


RESERVED_KNOBS = ("arch", "family", "method", "temperature", "alpha", "lr", "seed", "epochs", "batch_size", "channels",
                  "trial", "params", "latency_ms", "val_acc", "test_acc", "flops", "schedule", "decay_norms",
                  "label_smoothing", *KD_METHODS)


class IntOrRange(int):
    """An integer, or an int range `[low, high]` to search."""


class Knobs(dict):
    """A user builder's knobs: `name = [low, high]` is searched, a list of strings is a choice, a scalar is fixed."""


class Range(tuple):
    """A `[low, high]` float search range."""


class IntRange(tuple):
    """A `[low, high]` integer search range."""


class Bounds(tuple):
    """A list of numbers above 0 (budgets), empty by default."""


# A key's rule: its phase, a test of its value, and the end of the message "<file>: <key> = " when the test fails.
# Choices are checked first, then (after the student families) numbers above 0 (for a range: its low end), numbers
# not negative, and the rest; within a phase, key by key in the order below.
CHOICE, POSITIVE, NON_NEGATIVE, OTHER = range(4)


def _rule(default: Any, phase: int, ok: Callable[[Any], bool], says: Callable[[Any], str]) -> Any:
    return field(default=default, metadata={"rule": (phase, ok, says)})


def choice(default: str, allowed: tuple[str, ...]) -> Any:
    return _rule(default, CHOICE, lambda v: v in allowed,
                 lambda v: f"{v!r} is unknown: use one of {', '.join(allowed)}")


def _low(value: float | tuple) -> float:
    return value[0] if isinstance(value, tuple) else value


positive = partial(_rule, phase=POSITIVE, ok=lambda v: _low(v) > 0, says=lambda v: f"{_low(v)} must be above 0")
non_negative = partial(_rule, phase=NON_NEGATIVE, ok=lambda v: v >= 0, says=lambda v: f"{v} must not be negative")
fraction = partial(_rule, phase=OTHER, ok=lambda v: 0 < v < 0.5, says=lambda v: f"{v} must lie between 0 and 0.5")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = choice("digits", DATASETS)
    data_dir: str = "data"
    download: bool = False
    val_fraction: float = fraction(0.2)
    test_fraction: float = fraction(0.2)  # only for datasets without an official test split (digits, imagefolder)
    image_size: int = positive(32)  # imagefolder only: images are resized to this square
    # batched on the device: random crop with 4-pixel padding, and horizontal flip
    augment: str = choice("none", AUGMENTATIONS)
    memory_gb: float = non_negative(0.0)  # imagefolder: larger datasets stream from disk; 0: half the available memory
    skip_unreadable: bool = False  # imagefolder: leave out images that cannot be read (and say how many)


@dataclass(frozen=True)
class TeacherConfig:
    arch: str = "convnet"  # convnet, torchvision:<model name> (trained here, no weights downloaded)
    width: int = positive(32)  # channels of the first stage; each later stage doubles them
    depth: int = positive(3)  # convolution stages
    convs_per_stage: int = positive(1)
    epochs: int = non_negative(20)
    lr: float = positive(0.05)
    batch_size: int = positive(128)
    weight_decay: float = non_negative(5e-4)
    checkpoint: str = ""  # a state_dict for `arch`, a torch.export (.pt2) or TorchScript file, instead of training


@dataclass(frozen=True)
class SeparableConfig:
    base_width: int = positive(8)  # stem channels at width multiplier 1; stage i has (i + 1) times as many
    width: Range = positive(Range((0.5, 2.0)))  # sampled on a log scale
    depth: IntRange = positive(IntRange((2, 4)))  # stages, each halving the image
    blocks: IntRange = positive(IntRange((1, 2)))  # blocks per stage
    expand: IntRange = positive(IntRange((1, 4)))  # 1: plain separable convs; above 1: inverted residuals


@dataclass(frozen=True)
class ResnetConfig:
    base_width: int = positive(16)  # channels of the first stage at width 1 (16, 32, 64: the CIFAR ResNets)
    width: Range = positive(Range((0.25, 1.0)))  # sampled on a log scale
    blocks: IntRange = positive(IntRange((1, 3)))  # basic blocks per stage: 1 resnet8, 2 resnet14, 3 resnet20


@dataclass(frozen=True)
class StudentConfig:
    arch: Families = Families("convnet")  # a family, a list of families, or a builder "package.module:function"
    # built-in families round channel counts to a multiple of this (1: no rounding). In ONNX Runtime other counts
    # ran 1.1-4.5x slower per parameter, multiples of 4 within 1.14x of 8's (benchmarks/bench_channels.py), yet
    # unrounded widths found better fronts on the default study, latency axis included (BENCHMARKS.md, issue 19)
    channel_multiple: int = positive(1)
    # the convnet's knobs
    base_width: int = positive(8)  # channels of the first stage at width multiplier 1
    width: Range = positive(Range((0.25, 2.0)))  # channel multiplier, sampled on a log scale
    depth: IntRange = positive(IntRange((1, 3)))
    convs_per_stage: IntOrRange = positive(1)  # or a range [low, high] to search
    separable: SeparableConfig = field(default_factory=SeparableConfig)
    resnet: ResnetConfig = field(default_factory=ResnetConfig)
    custom: Knobs = field(default_factory=Knobs)  # a user builder's knobs


@dataclass(frozen=True)
class DistillConfig:
    method: Methods = Methods("kd")  # kd (Hinton's), dkd, dist, ls, or a list of them to search over
    temperature: Range = positive(Range((1.0, 20.0)))  # sampled on a log scale
    alpha: Range = _rule(Range((0.0, 1.0)), OTHER, lambda a: 0 <= a[0] and a[1] <= 1,
                         lambda a: f"{list(a)} must lie within [0, 1]")
    lr: Range = positive(Range((0.01, 0.3)))  # sampled on a log scale
    epochs: int = positive(10)
    batch_size: int = positive(64)
    weight_decay: float = non_negative(5e-4)
    # "auto" takes the student family's default (see students.TRAINING_DEFAULTS); cosine, or warmup-cosine (a linear
    # warm-up over the first epoch, then cosine)
    schedule: str = choice("auto", SCHEDULES)
    decay_norms: AutoBool = AutoBool("auto")  # weight decay on BatchNorm and bias parameters too, or weights only
    label_smoothing: AutoFloat = _rule(AutoFloat("auto"), OTHER, lambda v: v == "auto" or 0 <= v < 1,
                                       lambda v: f"{v} must lie in [0, 1)")  # of the hard-label term, in [0, 1)


@dataclass(frozen=True)
class SearchConfig:
    n_trials: int = positive(20)
    timeout: float = non_negative(0.0)  # seconds; 0 means no limit
    sampler: str = choice("tpe", SAMPLERS)
    mode: str = choice("pareto", MODES)  # pareto: (val_acc, params, latency_ms); budget: val_acc under the limits below
    max_params: int = non_negative(0)  # 0: no limit; a student above it is rejected before training
    max_latency_ms: float = non_negative(0.0)  # 0: no limit
    pruner: str = choice("auto", PRUNERS)  # auto: none in pareto mode, median in budget mode
    # dominated pruning: accuracy a trial may trail the dominating one by, per epoch
    prune_margin: float = non_negative(0.05)
    # rungs pruning: rungs at epochs rung_min_epochs * eta**k; the best 1/eta of a rung go on
    rung_eta: int = _rule(3, OTHER, lambda v: v >= 2, lambda v: f"{v} must be 2 or more (3 is usual)")
    rung_min_epochs: int = positive(1)
    baselines: bool = True  # enqueue a reference student without distillation (alpha = 0) and its distilled twin
    baseline_repeats: int = positive(1)  # baseline pairs, each with its own seed: the KD gain's spread over seeds
    heartbeat_interval: int = positive(30)  # seconds between a worker's heartbeats (RDB storage other than SQLite)
    grace_period: int = positive(90)  # seconds without a heartbeat after which a trial's worker counts as dead


@dataclass(frozen=True)
class LatencyConfig:
    # onnxruntime: the network's ONNX graph (as `export` writes it) in ONNX Runtime, as it is deployed; torch: eager
    # PyTorch, which at batch 1 mostly times its per-operator dispatch (up to 27x the ONNX Runtime figure here)
    runtime: str = choice("onnxruntime", LATENCY_RUNTIMES)
    device: str = "cpu"
    threads: int = positive(1)
    batch_size: int = positive(1)
    dtype: str = "float32"  # float32, bfloat16 or float16 (float16 on CUDA only)
    # seconds of timing per measurement, after warm-up; 0.1 and 0.2 gave the same spread of medians here (2-9%,
    # the machine's own noise) and 0.1 saves ~0.1 s a trial
    min_run_time: float = positive(0.1)


@dataclass(frozen=True)
class EngineConfig:
    threads: int = non_negative(0)  # CPU threads for training; 0: every core this process may use
    compile: bool = False  # torch.compile the student (made CPU epochs slower here, and costs ~30 s a trial)
    # trials trained at once in forked processes on a CPU; 0: one per core (at most 8)
    parallel_trials: int = non_negative(0)


@dataclass(frozen=True)
class RefineConfig:
    after_search: bool = False  # run-study refines when its trials end (else: the `refine` command)
    # Budgets: the most accurate student (by val_acc) at or under each bound is refined; none: the whole front
    max_params: Bounds = Bounds(())
    max_latency_ms: Bounds = Bounds(())
    epochs: int = positive(30)
    augment: str = choice("none", AUGMENTATIONS)
    seeds: int = positive(1)  # trainings per student, each with its own seed; the best by val_acc is kept
    # students refined per budget, its most accurate by the search's val_acc; the budget's pick is then the one
    # most accurate by refined val_acc (short trials rank students this small only roughly)
    top: int = positive(1)


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
    refine: RefineConfig = field(default_factory=RefineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> StudyConfig:
        return dataclasses.replace(self, **sections)


def check_values(c: StudyConfig, where: str) -> None:
    """Checks on allowed values that the types alone do not express: each key's rule, then the checks across keys."""
    _check_rules(c, where, CHOICE)
    _check_families(c, where)
    for phase in (POSITIVE, NON_NEGATIVE, OTHER):
        _check_rules(c, where, phase)
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
    if c.latency.dtype not in LATENCY_DTYPES or (c.latency.dtype == "float16" and c.latency.device == "cpu"):
        raise KdsearchError(f"{where}: latency.dtype = {c.latency.dtype!r}: use float32 or bfloat16 "
                            "(float16 with a cuda latency.device)")
    if c.latency.device not in ("cpu", "cuda") and not c.latency.device.startswith("cuda:"):
        raise KdsearchError(f"{where}: latency.device = {c.latency.device!r}: use 'cpu' or 'cuda'")


def _check_rules(config: Any, where: str, phase: int, prefix: str = "") -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            _check_rules(value, where, phase, f"{prefix}{f.name}.")
        elif "rule" in f.metadata:
            in_phase, ok, says = f.metadata["rule"]
            if in_phase == phase and not ok(value):
                raise KdsearchError(f"{where}: {prefix}{f.name} = {says(value)}")


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


def kd_methods(distill: DistillConfig) -> list[str]:
    """The KD methods a study samples from."""
    return [distill.method] if isinstance(distill.method, str) else list(distill.method)


def families(student: StudentConfig) -> list[str]:
    """The student families (or the user builder) a study samples from."""
    return [student.arch] if isinstance(student.arch, str) else list(student.arch)
