"""What a student costs: parameters, FLOPs, bytes and inference latency, all known before training.

Latency is timed in the runtime the network is deployed with (`latency.runtime`): by default its ONNX graph in ONNX
Runtime, or eager PyTorch (`"torch"`); one protocol for both, the teacher's included.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from kdsearch import KdsearchError
from kdsearch.config import LatencyConfig
from kdsearch.onnx_graph import deployed_graph
from kdsearch.onnx_graph import session as onnx_session
from kdsearch.timing_lock import timing_alone


def count_params(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm's running statistics are buffers, not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def size_bytes(model: nn.Module) -> int:
    """Bytes of the state_dict's tensors (parameters and buffers): the weights file without its framing."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of one image (a multiply-add counts as 2), from torch's flop counter."""
    model = copy.deepcopy(model).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_shape))
    return counter.get_total_flops()


@dataclass(frozen=True)
class Latency:
    median_ms: float
    iqr_ms: float
    device: str
    threads: int
    batch_size: int
    dtype: str = "float32"
    runtime: str = "torch"  # what ran the network: onnxruntime (its ONNX graph) or torch (eager PyTorch)
    runtime_version: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def runtime_of(cfg: LatencyConfig) -> tuple[str, str]:
    """The runtime that times the study's networks, and why it is not the one asked for ('' when it is): ONNX
    Runtime on a CUDA device needs its CUDA provider (the onnxruntime-gpu package)."""
    if cfg.runtime == "onnxruntime" and cfg.device != "cpu":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "torch", ("onnxruntime here has no CUDAExecutionProvider (pip install onnxruntime-gpu to time the "
                             "ONNX graph on the GPU)")
    return cfg.runtime, ""


def runtime_label(latency: dict) -> str:
    """`onnxruntime 1.32.0, cpu, 1 thread, batch 1, float32`: what a latency figure means, for axes and lines."""
    threads = f"{latency['threads']} thread" + ("s" if latency["threads"] != 1 else "")
    return (f"{latency.get('runtime', 'torch')} {latency.get('runtime_version', '')}".strip()
            + f", {latency['device']}, {threads}, batch {latency['batch_size']}, {latency['dtype']}")


def deployable(model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig, what: str = "the student",
               normalize: tuple | None = None) -> nn.Module | bytes:
    """What the runtime times: the checked ONNX graph that `export` writes, with the data's (mean, std) folded in
    when given (see `onnx_graph.deployed_graph`, whose one-line error names `what`), or the model itself for eager
    PyTorch. Made outside the timing lock: exporting takes ~0.5 s."""
    if runtime_of(cfg)[0] == "onnxruntime":
        if cfg.dtype != "float32":
            raise KdsearchError(f"latency.dtype = {cfg.dtype!r}: the ONNX graph is float32; set latency.runtime = "
                                "'torch' to time other dtypes")
        return deployed_graph(model, input_shape, what, normalize)
    return model


def measure_latency(model: nn.Module | bytes, input_shape: tuple[int, ...], cfg: LatencyConfig, timer=None,
                    what: str = "the student", normalize: tuple | None = None) -> Latency:
    """Median time of one forward pass of a batch in the study's runtime, with torch.utils.benchmark's protocol
    (warm-up, blocks of runs until `min_run_time`, median and IQR over the blocks, CUDA sync, fixed threads),
    alone on this host (see `timing_alone`); `timer` (default `time_deployed`) may time it in another process.
    `model` may already be what `deployable` made of it."""
    timed = model if isinstance(model, bytes) else deployable(model, input_shape, cfg, what, normalize)
    with timing_alone():
        return (timer or time_deployed)(timed, input_shape, cfg)


def time_deployed(timed: nn.Module | bytes, input_shape: tuple[int, ...], cfg: LatencyConfig) -> Latency:
    """Time an ONNX graph (bytes) in ONNX Runtime, or a model in eager PyTorch, under the same protocol."""
    if isinstance(timed, bytes):
        return _time_graph(timed, input_shape, cfg)
    return time_forward(timed, input_shape, cfg)


def time_forward(model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig) -> Latency:
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    model = copy.deepcopy(model).to(device, dtype, memory_format=torch.contiguous_format).eval()
    x = _random_batch(input_shape, cfg).to(device, dtype)
    with torch.inference_mode():
        model(x)  # warm-up outside the timed region
        m = _timed("model(x)", {"model": model, "x": x}, cfg)
    return _latency(m, cfg)


def _time_graph(graph: bytes, input_shape: tuple[int, ...], cfg: LatencyConfig) -> Latency:
    run = onnx_session(graph, cfg.threads, cfg.device).run
    feed = {"images": (_random_batch(input_shape, cfg).abs() * 100).numpy()}  # pixel values, as deployed
    run(None, feed)  # warm-up outside the timed region (the first run allocates)
    return _latency(_timed("run(None, feed)", {"run": run, "feed": feed}, cfg), cfg)


def _random_batch(input_shape: tuple[int, ...], cfg: LatencyConfig) -> torch.Tensor:
    """A batch from a private generator: the global one seeds the students built in other threads meanwhile."""
    return torch.randn(cfg.batch_size, *input_shape, generator=torch.Generator().manual_seed(0))


def _timed(stmt: str, names: dict, cfg: LatencyConfig) -> benchmark.Measurement:
    timer = benchmark.Timer(stmt=stmt, globals=names, num_threads=cfg.threads)
    return timer.blocked_autorange(min_run_time=cfg.min_run_time)


def _latency(m: benchmark.Measurement, cfg: LatencyConfig) -> Latency:
    iqr = m.iqr if len(m.times) >= 4 else 0.0
    return Latency(median_ms=m.median * 1e3, iqr_ms=iqr * 1e3, **latency_settings(cfg))


def latency_settings(cfg: LatencyConfig) -> dict:
    """What a latency figure of these settings means: runtime and its version, device, threads, batch, dtype."""
    runtime = runtime_of(cfg)[0]
    if runtime == "onnxruntime":
        import onnxruntime

        version = onnxruntime.__version__
    else:
        version = torch.__version__
    return {"device": cfg.device, "threads": cfg.threads, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
            "runtime": runtime, "runtime_version": version}


def warm_up(input_shape: tuple[int, ...], cfg: LatencyConfig, model: nn.Module) -> None:
    """Pay the measuring tools' one-off start-up while a session opens rather than inside its first trial: the
    flop counter imports torch._dynamo on first use (1.0-1.4 s here), the first ONNX export its exporter (0.7 s),
    and a process's first latency run takes 0.3 s longer than the next ones."""
    count_flops(model, input_shape)
    measure_latency(model, input_shape, dataclasses.replace(cfg, min_run_time=0.01))


def study_latency(study_attrs: dict) -> dict:
    """The settings a study's latencies were timed with (see `latency_settings`); a study made before they were
    recorded timed them in eager PyTorch, whose version was not kept."""
    if "latency" in study_attrs:
        return study_attrs["latency"]
    made = study_attrs.get("config", {}).get("latency", {})
    return {"device": made.get("device", "cpu"), "threads": made.get("threads", 1),
            "batch_size": made.get("batch_size", 1), "dtype": made.get("dtype", "float32"),
            "runtime": made.get("runtime", "torch"), "runtime_version": ""}
