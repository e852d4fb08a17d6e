"""Is the latency figure stable? Re-measure one student 5 times in one process and print the spread of medians.

    python benchmarks/bench_latency.py [--width 16] [--depth 3] [--image-size 28]

Uses the study file defaults (ONNX Runtime, CPU, 1 thread, batch 1, kdsearch's protocol). Target: the medians
within 10% of each other. A naive time.time() loop over the same graph (ONNX Runtime's default threads, no warm-up)
is printed beside it for reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from kdsearch.config import LatencyConfig
from kdsearch.measure import deployable, measure_latency
from kdsearch.models import Architecture, build_model


def naive_ms(graph: bytes, shape, n: int = 200) -> float:
    """The same ONNX graph in a session of the default settings (all cores), timed with time.time, no warm-up."""
    import onnxruntime as ort

    run = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run
    feed = {"images": np.random.default_rng(0).uniform(0, 255, (1, *shape)).astype(np.float32)}
    start = time.time()
    for _ in range(n):
        run(None, feed)
    return (time.time() - start) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = build_model(Architecture(1, 10, args.width, args.depth), args.image_size).eval()
    shape = (1, args.image_size, args.image_size)
    cfg = LatencyConfig()
    medians = []
    for i in range(args.repeats):
        lat = measure_latency(model, shape, cfg)
        medians.append(lat.median_ms)
        print(f"run {i + 1}: median {lat.median_ms:.4f} ms (IQR {lat.iqr_ms:.4f} ms, {lat.threads} thread, "
              f"batch {lat.batch_size}, {lat.device})")
    graph = deployable(model, shape, cfg)
    naive = [naive_ms(graph, shape) for _ in range(args.repeats)]
    for name, values in (("benchmark.Timer", medians), ("naive time.time", naive)):
        spread = (max(values) - min(values)) / statistics.median(values)
        print(f"{name}: medians {min(values):.4f}..{max(values):.4f} ms, spread {100 * spread:.1f}% of the median")


if __name__ == "__main__":
    main()
