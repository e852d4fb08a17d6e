"""What a student costs: parameters, FLOPs, bytes and inference latency, all known before training."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from kdsearch.config import LatencyConfig


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


LOCK_FILE = Path(tempfile.gettempdir()) / "kdsearch-latency.lock"
_held = [0]  # how deep this process is inside host_timing_lock


@contextlib.contextmanager
def host_timing_lock():
    """One latency timing at a time on this host, across all kdsearch processes (an flock on a file in the
    temporary folder); re-entrant within a process."""
    if _held[0]:
        _held[0] += 1
        try:
            yield
        finally:
            _held[0] -= 1
        return
    with open(LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _held[0] = 1
        try:
            yield
        finally:
            _held[0] = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig) -> Latency:
    """Median time of one forward pass of a batch, with torch.utils.benchmark (warm-up, CUDA sync, fixed threads),
    never while another kdsearch process on this host times one."""
    with host_timing_lock():
        return _timed(model, input_shape, cfg)


def _timed(model: nn.Module, input_shape: tuple[int, ...], cfg: LatencyConfig) -> Latency:
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
