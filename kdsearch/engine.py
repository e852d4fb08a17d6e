"""Device settings for the training loop: threads and allocator on the CPU, cuDNN and bf16 on CUDA,
channels_last memory layout on both."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import time

import torch
from torch import nn

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters from glibc's malloc.h


def configure_cpu(threads: int | None = None) -> int:
    """Set the thread count explicitly and keep glibc from returning activation buffers to the OS after every
    batch (each return and re-fault showed as a third of the epoch in system time)."""
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return threads


def configure_device(device: torch.device, threads: int = 0) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        configure_cpu(threads or None)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    fmt = torch.contiguous_format if has_unsafe_strided_1x1(model) else torch.channels_last
    return model.to(device=device, memory_format=fmt)


def has_unsafe_strided_1x1(model: nn.Module) -> bool:
    """A 1x1 convolution with a stride and fewer than 8 input channels: on the CPU in channels_last, with one
    thread, torch 2.14.1's oneDNN kernel for its weight gradient writes outside its buffers (heap corruption:
    `free(): invalid pointer`, seen here for 2 to 7 input channels, never for 8 or more; the resnet family's
    downsampling shortcut of narrow students). Such a model trains in the contiguous layout instead."""
    return any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 8
               for m in model.modules())


@functools.cache
def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def uses_bf16(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


def autocast(device: torch.device):
    """bf16 autocast for the training step on CUDA and on CPUs with native bf16 (1.4x faster epochs here)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Wall seconds per named phase (`with timer("train"): ...`); a phase nested in another is taken out of it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync(self.device)
        frame = [name, time.perf_counter(), 0.0]  # name, start, seconds of nested phases
        self._stack.append(frame)
        try:
            yield
        finally:
            sync(self.device)
            self._stack.pop()
            total = time.perf_counter() - frame[1]
            self.seconds[name] = self.seconds.get(name, 0.0) + total - frame[2]
            if self._stack:
                self._stack[-1][2] += total

    def add(self, name: str, seconds: float) -> None:
        """Seconds of phase `name` measured elsewhere (in another process), nested in the current phase."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if self._stack:
            self._stack[-1][2] += seconds


def no_timer(name: str):
    return contextlib.nullcontext()


def release_memory_after_failure(study, trial) -> None:
    """An Optuna callback: after a failed trial (CUDA out of memory, say) free what its frames held."""
    if trial.state.name == "FAIL":
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
