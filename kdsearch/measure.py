"""What a student costs: parameters, FLOPs, bytes and inference latency, all known before training."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from kdsearch.config import LatencyConfig
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

    def to_dict(self) -> dict:
        return asdict(self)


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig, timer=None) -> Latency:
    """Median time of one forward pass of a batch, with torch.utils.benchmark (warm-up, CUDA sync, fixed threads),
    alone on this host (see `timing_lock`); `timer` (default `time_forward`) may time it in another process."""
    with timing_alone():
        return (timer or time_forward)(model, input_shape, cfg)


def time_forward(model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig) -> Latency:
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    model = copy.deepcopy(model).to(device, dtype, memory_format=torch.contiguous_format).eval()
    x = torch.randn(cfg.batch_size, *input_shape, device=device, dtype=dtype)
    with torch.inference_mode():
        model(x)  # warm-up outside the timed region
        timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=cfg.threads)
        m = timer.blocked_autorange(min_run_time=cfg.min_run_time)
    iqr = m.iqr if len(m.times) >= 4 else 0.0
    return Latency(median_ms=m.median * 1e3, iqr_ms=iqr * 1e3, device=cfg.device, threads=cfg.threads,
                   batch_size=cfg.batch_size, dtype=cfg.dtype)


def warm_up(input_shape: tuple[int, ...], cfg: LatencyConfig, model: nn.Module) -> None:
    """Pay the measuring tools' one-off start-up while a session opens rather than inside its first trial: the
    flop counter imports torch._dynamo on first use (1.4 s here), and a process's first latency run takes 0.3 s
    longer than the next ones."""
    count_flops(model, input_shape)
    measure_latency(model, input_shape, dataclasses.replace(cfg, min_run_time=0.01))
