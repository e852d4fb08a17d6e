"""Are channel counts that are not multiples of 8 slower per parameter? Decides `student.channel_multiple`.

    python benchmarks/bench_channels.py [--image-size 28] [--family convnet] [--depth 3] [--convs 2] [--widths 2-32]

Times one student per first-stage channel count (every integer in --widths) in ONNX Runtime and in eager PyTorch
(batch 1, one thread, the study's protocol). Each width's latency is compared with the latency the multiples of 8
predict at its parameter count (log-log interpolation between the two nearest multiples of 8): a ratio above 1 means
slower per parameter than the multiples of 8. Then, for each multiple 1, 2, 4, 8: how many widths the space keeps,
and their mean ratio.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from kdsearch.config import LatencyConfig
from kdsearch.measure import count_params, measure_latency
from kdsearch.models import StudentSpec, build_student

RUNTIMES = ("onnxruntime", "torch")


def student(family: str, channels: int, args) -> StudentSpec:
    shape = (1, args.image_size, args.image_size)
    if family == "convnet":
        knobs = {"base_width": channels, "width": 1.0, "depth": args.depth, "convs_per_stage": args.convs}
    else:
        knobs = {"base_width": channels, "width": 1.0, "depth": args.depth, "blocks": args.convs, "expand": 1}
    return StudentSpec(family, shape, 10, knobs)


def predicted(params: int, anchors: list[tuple[int, float]]) -> float:
    """Latency at `params` interpolated log-log between the multiples of 8 (extrapolated at the ends)."""
    x, y = np.log([a[0] for a in anchors]), np.log([a[1] for a in anchors])
    i = int(np.clip(np.searchsorted(x, np.log(params)), 1, len(x) - 1))
    slope = (y[i] - y[i - 1]) / (x[i] - x[i - 1])
    return float(np.exp(y[i - 1] + slope * (np.log(params) - x[i - 1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="convnet", choices=["convnet", "separable"])
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--convs", type=int, default=2, help="convs per stage (convnet) or blocks (separable)")
    parser.add_argument("--widths", default="2-32", help="first-stage channel counts, low-high")
    args = parser.parse_args()
    low, high = map(int, args.widths.split("-"))
    rows = []
    for c in range(low, high + 1):
        model = build_student(student(args.family, c, args))
        ms = {r: measure_latency(model, (1, args.image_size, args.image_size),
                                 LatencyConfig(runtime=r, min_run_time=0.2)).median_ms for r in RUNTIMES}
        rows.append((c, count_params(model), ms))
    print(f"{args.family}, {args.image_size}x{args.image_size}, depth {args.depth}, {args.convs} convs/blocks a stage; "
          "batch 1, 1 thread, float32")
    print(f"{'channels':>8} {'params':>7} " + " ".join(f"{r + ' ms':>15} {'ratio':>6}" for r in RUNTIMES))
    ratios = {r: {} for r in RUNTIMES}
    for r in RUNTIMES:
        anchors = [(p, ms[r]) for c, p, ms in rows if c % 8 == 0]
        for c, p, ms in rows:
            ratios[r][c] = ms[r] / predicted(p, anchors)
    for c, p, ms in rows:
        print(f"{c:>8} {p:>7,} " + " ".join(f"{ms[r]:>15.4f} {ratios[r][c]:>6.2f}" for r in RUNTIMES))
    print("\nmultiple  widths  " + "  ".join(f"mean ratio {r} (max)" for r in RUNTIMES))
    for m in (1, 2, 4, 8):
        kept = [c for c, _, _ in rows if c % m == 0]
        cells = [f"{statistics.mean(ratios[r][c] for c in kept):.2f} ({max(ratios[r][c] for c in kept):.2f})"
                 for r in RUNTIMES]
        print(f"{m:>8}  {len(kept):>6}  " + "  ".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
