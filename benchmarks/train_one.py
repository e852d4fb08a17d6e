"""Distil one hand-picked student against a study's cached teacher and print its validation and test accuracy: a
quick look at a student before putting its family or range into a study file.

    python benchmarks/train_one.py convnet '{"base_width": 8, "width": 1, "depth": 2, "convs_per_stage": 3,
        "channel_multiple": 4}' --study mnist --set data.data_dir='../shared/data' --set data.augment="'crop'" \
        --epochs 12

Trains as a trial of the study would (the family's training defaults, the study's batch size and augmentation).
Prints each epoch's loss and val_acc, then the student's parameters, val_acc, test_acc and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from common import cpu_distillation

from kdsearch.distill import accuracy
from kdsearch.engine import configure_cpu, prepare_model
from kdsearch.measure import count_params
from kdsearch.models import build_student
from kdsearch.students import student_spec, train_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("family", help="convnet, separable, resnet or package.module:function")
    parser.add_argument("knobs", help="the family's knobs as JSON")
    parser.add_argument("--study", default="digits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    args = parser.parse_args()
    configure_cpu(args.threads or None)
    cfg, data, teacher, normalize, executor = cpu_distillation(args.study, args.set)
    torch.manual_seed(args.seed)
    spec = student_spec(args.family, json.loads(args.knobs), data.input_shape, data.num_classes)
    model = prepare_model(build_student(spec), torch.device("cpu"))
    hp = {"temperature": args.temperature, "alpha": args.alpha, "lr": args.lr}
    settings = dataclasses.replace(train_settings(cfg, args.family, hp, args.seed), epochs=args.epochs)
    started = time.perf_counter()

    def show(epoch: int, loss: float, val_acc: float) -> None:
        print(f"epoch {epoch}: loss {loss:.3f} val_acc {val_acc:.4f} ({time.perf_counter() - started:.0f} s)",
              flush=True)

    val_acc = executor.train(model, settings, on_epoch=show)
    print(f"{args.family} {count_params(model):,} parameters: val_acc {val_acc:.4f} "
          f"test_acc {accuracy(model, data.test, normalize):.4f} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
