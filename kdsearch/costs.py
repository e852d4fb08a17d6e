"""What an architecture costs in a study (parameters, FLOPs, bytes, latency), measured once per study and shared.

Any model of an architecture costs the same, so a cost is keyed by the architecture actually built (`cost_key`)
and stored in the study's user attributes: the first process to need it measures it, every other worker and every
later session reads it.
"""

from __future__ import annotations

import hashlib
import json

import optuna
import torch

from kdsearch.config import StudyConfig
from kdsearch.execution import Executor
from kdsearch.measure import count_flops, count_params, size_bytes
from kdsearch.models import FAMILIES, StudentSpec
from kdsearch.timing_lock import timing_alone, training_epoch


def measure_cost(model: torch.nn.Module, input_shape: tuple[int, ...], cfg: StudyConfig, executor: Executor,
                 timed: torch.nn.Module | bytes | None = None) -> dict:
    """What the architecture costs, known before any training, with the settings its latency was timed with;
    `timed` is what `executor.deployable` made of the model, when it was made beforehand."""
    latency = executor.measure_latency(model, input_shape, cfg.latency, timed=timed)
    return {"params": count_params(model), "flops": count_flops(model, input_shape), "size_bytes": size_bytes(model),
            "latency_ms": latency.median_ms, "latency_iqr_ms": latency.iqr_ms, "latency": latency.to_dict()}


def cost_key(spec: StudentSpec, model: torch.nn.Module) -> str:
    """The architecture actually built: its family, the data's shape and a digest of its layers and tensor shapes
    (and, for a user builder, of its knobs too: they may act in ways neither shows). Knob values that build the same
    network (two width multipliers rounded to the same channel counts) share one key."""
    shapes = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    knobs = spec.knobs if spec.family not in FAMILIES else {}
    text = json.dumps([repr(model), shapes, knobs], sort_keys=True, default=str)
    layers = hashlib.sha256(text.encode()).hexdigest()[:16]
    arch = {"family": spec.family, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes,
            "layers": layers}
    return "cost:" + json.dumps(arch, sort_keys=True, separators=(",", ":"))


def study_cost(ctx, study: optuna.Study, key: str, model: torch.nn.Module, what: str = "the student") -> dict:
    """The cost of architecture `key` in `study` (a copy), measured here under the host's latency lock (see
    `measure.measure_latency`) if no process has stored it yet. Its ONNX graph is made and checked before the lock
    is taken; an architecture that cannot be exported raises a KdsearchError naming `what`. `ctx` is the session's
    `StudyContext`, whose `costs` keep this process's copies."""
    if key not in ctx.costs:
        stored = _stored_cost(study, key)
        if stored is None:
            timed = deployed(ctx, key, model, what)
            with timing_alone():
                stored = _stored_cost(study, key)  # another worker on this host may have measured it meanwhile
                if stored is None:
                    stored = measure_cost(model, ctx.data.input_shape, ctx.cfg, ctx.executor, timed)
                    study.set_user_attr(key, stored)
        ctx.costs[key] = stored
    return json.loads(json.dumps(ctx.costs[key]))  # a copy


_GRAPHS: dict[tuple, bytes] = {}  # the ONNX graphs this process has made and checked, by architecture and data


def deployed(ctx, key: str, model: torch.nn.Module, what: str) -> torch.nn.Module | bytes:
    """What the runtime times for architecture `key` (see `measure.deployable`): an ONNX graph is made and checked
    once per process and architecture (0.5 s each here), since any model of an architecture times alike. The
    export holds the host's latency lock like a training epoch: no latency is timed beside it."""
    normalize = (tuple(ctx.data.mean), tuple(ctx.data.std))
    memo = (key, normalize, ctx.cfg.latency.runtime, ctx.cfg.latency.device)
    if memo not in _GRAPHS:
        with training_epoch():  # an export beside a timing slowed a resnet's figure by 1.47x on 2 cores
            timed = ctx.executor.deployable(model, ctx.data.input_shape, ctx.cfg.latency, what, normalize)
        if not isinstance(timed, bytes):
            return timed
        _GRAPHS[memo] = timed
    return _GRAPHS[memo]


def settled_latency(study: optuna.Study, key: str, measured: float) -> float:
    """The study's latency for `arch` when the trial ends. Two machines that measured the same new architecture
    at the same moment both stored theirs and the last write stands; by the end of training both read that one."""
    stored = _stored_cost(study, key)
    return stored["latency_ms"] if stored else measured


def _stored_cost(study: optuna.Study, key: str) -> dict | None:
    return study._storage.get_study_user_attrs(study._study_id).get(key)  # one attribute read, not the trials
