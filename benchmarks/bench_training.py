"""Each student family's training defaults, one at a time: the family's mid-sized student (the baselines' knobs)
distilled with the family's defaults, and with one default changed, over several seeds, in one run.

    python benchmarks/bench_training.py [--study digits] [--seeds 0 1 2 3 4] [--set distill.epochs=15 ...]

Prints, for each family and each default, the mean validation accuracy (and its standard error over seeds) with
the default and with the other choice, and the difference. Distillation at T = 4, alpha = 0.5 and the middle of
the study's learning-rate range, as the baselines.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch
from common import cpu_distillation

from kdsearch.engine import configure_cpu, prepare_model
from kdsearch.models import build_student
from kdsearch.students import TRAINING_DEFAULTS, middle_knobs, student_spec, train_settings
from kdsearch.study import BASELINE_ALPHAS, baseline_distillation

OTHER = {"schedule": {"cosine": "warmup-cosine", "warmup-cosine": "cosine"},
         "decay_norms": {True: False, False: True}, "label_smoothing": {0.0: 0.1, 0.1: 0.0}}


def val_acc(cfg, executor, data, family: str, training: dict, seed: int) -> float:
    """The family's mid-sized student distilled as the baselines are, with the training defaults `training`."""
    one = cfg.replace(student=dataclasses.replace(cfg.student, arch=family))
    torch.manual_seed(seed)
    spec = student_spec(family, middle_knobs(one, family), data.input_shape, data.num_classes)
    model = prepare_model(build_student(spec), torch.device("cpu"))
    hp = {**baseline_distillation(cfg), "alpha": BASELINE_ALPHAS["kd"]}
    return executor.train(model, dataclasses.replace(train_settings(one, family, hp, seed), **training))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="digits")
    parser.add_argument("--families", nargs="+", default=["convnet", "separable", "resnet"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    configure_cpu()
    cfg, data, teacher, _, executor = cpu_distillation(args.study, args.set)
    print(f"{args.study}: {cfg.distill.epochs} epochs, seeds {args.seeds}, teacher val_acc "
          f"{teacher.metrics['val_acc']:.4f}", flush=True)
    for family in args.families:
        started = time.perf_counter()
        default = TRAINING_DEFAULTS[family]
        base = [val_acc(cfg, executor, data, family, default, s) for s in args.seeds]
        for key, flip in OTHER.items():
            changed = {**default, key: flip[default[key]]}
            other = [val_acc(cfg, executor, data, family, changed, s) for s in args.seeds]
            diffs = [a - b for a, b in zip(base, other)]
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
            print(f"{family:>9} {key}: default {default[key]!s:>13} {statistics.mean(base):.4f}, "
                  f"{flip[default[key]]!s:>13} {statistics.mean(other):.4f}: default better by "
                  f"{statistics.mean(diffs):+.4f} +/- {se:.4f} (paired over seeds)", flush=True)
        print(f"{family:>9}: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
