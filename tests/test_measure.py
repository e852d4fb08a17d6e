"""Parameter and FLOP counts of a small student, worked out by hand.

Student: 1 input channel, 10 classes, width 4, depth 2 (one conv per stage), 8x8 images.
  conv1 3x3, 1 -> 4, no bias:  1*4*9  =  36    BatchNorm(4): 2*4 =  8
  conv2 3x3, 4 -> 8, no bias:  4*8*9  = 288    BatchNorm(8): 2*8 = 16
  linear 8 -> 10:              8*10+10 = 90
  parameters                              = 438 (BatchNorm's running mean/var are buffers)
FLOPs for one image (multiply-add = 2):
  conv1: 4 channels * 8*8 pixels * 9 MACs  = 2,304 MACs
  conv2: 8 channels * 4*4 pixels * 36 MACs = 4,608 MACs   (after a 2x2 max-pool)
  linear: 8*10                             =    80 MACs
  total 6,992 MACs = 13,984 FLOPs
"""

import time

import pytest
import torch

from kdsearch.config import LatencyConfig
from kdsearch.measure import count_flops, count_params, measure_latency, size_bytes
from kdsearch.models import Architecture, build_model, round_channels

ARCH = Architecture(in_channels=1, num_classes=10, width=4, depth=2)


def test_param_count_by_hand():
    assert count_params(build_model(ARCH, 8)) == 438


def test_two_convs_per_stage_adds_the_second_conv():
    arch = Architecture(1, 10, 4, 2, convs_per_stage=2)
    # + conv 4->4 (144) + BN(4) (8) + conv 8->8 (576) + BN(8) (16)
    assert count_params(build_model(arch, 8)) == 438 + 144 + 8 + 576 + 16


def test_flops_by_hand():
    assert count_flops(build_model(ARCH, 8), (1, 8, 8)) == 13_984


def test_size_in_bytes_counts_buffers_too():
    # 438 float32 parameters + BN buffers (running mean and var: 2*(4+8) floats, 2 int64 counters)
    assert size_bytes(build_model(ARCH, 8)) == 438 * 4 + 24 * 4 + 2 * 8


def test_channel_counts_round_to_the_multiple():
    assert [round_channels(8 * m, 1) for m in (0.25, 0.3, 1.0, 1.94, 0.01)] == [2, 2, 8, 16, 1]
    assert [round_channels(c, 8) for c in (2, 4.1, 11.9, 20.1, 101)] == [8, 8, 8, 24, 104]


def test_latency_reports_its_settings():
    lat = measure_latency(build_model(ARCH, 8), (1, 8, 8), LatencyConfig(min_run_time=0.05))
    assert 0 < lat.median_ms < 100 and 0 <= lat.iqr_ms < 100  # a tiny model: milliseconds, not seconds
    assert (lat.device, lat.threads, lat.batch_size, lat.dtype) == ("cpu", 1, 1, "float32")


class Sleeper(torch.nn.Module):
    """A forward pass that costs a known time: 3 ms a batch, whatever its size."""

    def forward(self, x):
        time.sleep(0.003)
        return x


@pytest.mark.parametrize("batch_size", [1, 4])
def test_latency_is_the_milliseconds_of_one_forward_pass_of_a_batch(batch_size):
    lat = measure_latency(Sleeper(), (1, 8, 8), LatencyConfig(min_run_time=0.1, runtime="torch",
                                                              batch_size=batch_size))
    # sleep() lasts at least what it is asked: a figure under 3 ms is wrong units or a per-sample figure; the upper
    # bound only catches seconds mistaken for milliseconds, not slowness (a loaded machine oversleeps)
    assert 3.0 <= lat.median_ms < 300 and lat.batch_size == batch_size


def test_latency_in_bfloat16_says_so():
    lat = measure_latency(build_model(ARCH, 8), (1, 8, 8),
                          LatencyConfig(min_run_time=0.05, dtype="bfloat16", runtime="torch"))
    assert lat.median_ms > 0 and lat.dtype == "bfloat16"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_every_depth_reduces_8x8_inputs(depth):
    import torch

    out = build_model(Architecture(1, 10, 4, depth), 8)(torch.zeros(2, 1, 8, 8))
    assert out.shape == (2, 10)


def probe(path, mode: str) -> str:
    """Whether another process could take the lock file `path` now ('free') or would wait ('held')."""
    import subprocess
    import sys

    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
            f"try:\n    fcntl.flock(fd, fcntl.LOCK_{mode} | fcntl.LOCK_NB); print('free')\n"
            "except BlockingIOError:\n    print('held')")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True).stdout.strip()


def test_a_latency_timing_runs_alone_on_its_host():
    """While one process times a latency, no other may time one or start a training epoch; epochs of several
    processes run side by side; the lock files are writable by every user."""
    from kdsearch.timing_lock import GATE, ROOM, timing_alone, training_epoch

    with timing_alone(), timing_alone():  # re-entrant
        assert (probe(GATE, "SH"), probe(ROOM, "SH")) == ("held", "held")  # no epoch may start or run
    with training_epoch():
        assert (probe(GATE, "EX"), probe(ROOM, "EX"), probe(ROOM, "SH")) == ("free", "held", "free")
    assert (probe(GATE, "EX"), probe(ROOM, "EX")) == ("free", "free")
    assert GATE.stat().st_mode & 0o777 == ROOM.stat().st_mode & 0o777 == 0o666


def test_a_timing_inside_a_training_epoch_is_refused_not_deadlocked():
    from kdsearch.timing_lock import timing_alone, training_epoch

    with pytest.raises(RuntimeError, match="inside a training epoch"), training_epoch(), timing_alone():
        pass
    with timing_alone():  # and the locks were all released
        pass


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_timing_a_latency_leaves_the_global_generator_alone(runtime):
    """Students are built from the global generator seeded per trial, in other threads meanwhile: a timing must not
    draw from it (its input batch once did, and a student's initial weights then depended on timing)."""
    import torch

    model = build_model(ARCH, 8)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    measure_latency(model, (1, 8, 8), LatencyConfig(min_run_time=0.01, runtime=runtime))
    assert torch.equal(torch.rand(3), expected)
