"""Latency in eager PyTorch against ONNX Runtime, batch 1, one thread, float32: which students change places.

    python benchmarks/bench_runtimes.py                          # the MNIST teacher and students of each family
    python benchmarks/bench_runtimes.py --study mnist-small      # every complete trial of a study, and its front
                                        [--storage sqlite:///optuna.db] [--tracking-uri URI]

Each network is timed in both runtimes in this one run, with kdsearch's protocol (`measure.measure_latency`); the ONNX
graph is the one `export` writes, normalisation folded in. With --study, the study's front is recomputed
(Optuna's `best_trials` over the same accuracies and parameters) with each runtime's latencies, and the trials that
are on one front only are named.
"""

from __future__ import annotations

import argparse
import os

import optuna

from kdsearch.config import LatencyConfig
from kdsearch.measure import count_params, measure_latency
from kdsearch.models import Architecture, StudentSpec, build_model, build_student
from kdsearch.scores import hypervolume

RUNTIMES = ("torch", "onnxruntime")
MNIST = (1, 28, 28)
MNIST_NORMALIZE = ([0.1307], [0.3081])
# The MNIST teacher (studies/mnist.toml) and students of each family, mnist-8k's and mnist-tiny's among them
NETWORKS = {
    "teacher: convnet 16, 3 stages of 2 convs": StudentSpec("convnet", MNIST, 10, {
        "base_width": 16, "width": 1.0, "depth": 3, "convs_per_stage": 2}),
    "convnet 8/16, 3 convs a stage (mnist-8k)": StudentSpec("convnet", MNIST, 10, {
        "base_width": 8, "width": 1.0, "depth": 2, "convs_per_stage": 3}),
    "convnet 8/16": StudentSpec("convnet", MNIST, 10, {"base_width": 8, "width": 1.0, "depth": 2}),
    "separable 6, 6/12/18, 2 blocks (mnist-tiny)": StudentSpec("separable", MNIST, 10, {
        "base_width": 6, "width": 1.0, "depth": 3, "blocks": 2, "expand": 1}),
    "separable 8, 8/16/24, 2 blocks": StudentSpec("separable", MNIST, 10, {
        "base_width": 8, "width": 1.0, "depth": 3, "blocks": 2, "expand": 1}),
    "separable 6, 3 stages, 2 blocks, expand 2": StudentSpec("separable", MNIST, 10, {
        "base_width": 6, "width": 1.0, "depth": 3, "blocks": 2, "expand": 2}),
    "resnet8 width 8": StudentSpec("resnet", MNIST, 10, {"base_width": 8, "width": 1.0, "blocks": 1}),
    "resnet14 width 4": StudentSpec("resnet", MNIST, 10, {"base_width": 4, "width": 1.0, "blocks": 2}),
}


def both(model, input_shape, normalize) -> dict[str, float]:
    return {r: measure_latency(model, input_shape, LatencyConfig(runtime=r, min_run_time=0.3),
                               normalize=normalize if r == "onnxruntime" else None).median_ms for r in RUNTIMES}


def networks() -> None:
    print(f"{'network':<46} {'params':>7} {'torch ms':>9} {'ort ms':>8} {'torch/ort':>9}")
    for name, spec in NETWORKS.items():
        model = build_student(spec)
        ms = both(model, MNIST, MNIST_NORMALIZE)
        print(f"{name:<46} {count_params(model):>7,} {ms['torch']:>9.3f} {ms['onnxruntime']:>8.3f} "
              f"{ms['torch'] / ms['onnxruntime']:>8.1f}x")


def study_fronts(name: str, storage: str, tracking_uri: str | None) -> None:
    from kdsearch.export import load_student
    from kdsearch.tracking import client_for

    study = optuna.load_study(study_name=name, storage=storage)
    client = client_for(tracking_uri)
    data = study.user_attrs["data"]
    shape, normalize = tuple(data["input_shape"]), (data["mean"], data["std"])
    t = study.user_attrs["config"]["teacher"]
    teacher = build_model(Architecture(shape[0], data["num_classes"], t["width"], t["depth"], t["convs_per_stage"]),
                          shape[1])
    teacher_ms = both(teacher, shape, normalize)
    done = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    timed, rows = {}, []
    for trial in done:
        student, spec = load_student(client, trial.user_attrs["mlflow_run_id"])
        key = repr(student)
        timed.setdefault(key, both(student, shape, normalize))
        rows.append((trial, spec.family, timed[key]))
    print(f"study '{name}': {len(done)} complete trials, {len(timed)} architectures; the teacher "
          f"{count_params(teacher):,} params, torch {teacher_ms['torch']:.3f} ms, onnxruntime "
          f"{teacher_ms['onnxruntime']:.3f} ms")
    fronts = {}
    for runtime in RUNTIMES:
        again = optuna.create_study(directions=["maximize", "minimize", "minimize"])
        for trial, _, ms in rows:
            again.add_trial(optuna.trial.create_trial(values=[trial.values[0], trial.values[1], ms[runtime]],
                                                      user_attrs={"number": trial.number}))
        front = again.best_trials
        fronts[runtime] = {f.user_attrs["number"] for f in front}
        ref = {**study.user_attrs["teacher"], "latency_ms": teacher_ms[runtime]}
        faster = sum(ms[runtime] < teacher_ms[runtime] for _, _, ms in rows)
        print(f"\n{runtime}: front of {len(front)}, hypervolume {hypervolume([f.values for f in front], ref):.4f}; "
              f"{faster} of {len(rows)} students faster than the teacher")
    print(f"\n{'trial':>5} {'family':<10} {'params':>7} {'val_acc':>7} {'test_acc':>8} {'torch ms':>9} {'ort ms':>8}  "
          "on the front of")
    for trial, family, ms in sorted(rows, key=lambda r: r[0].values[1]):
        on = [r for r in RUNTIMES if trial.number in fronts[r]]
        if on:
            print(f"{trial.number:>5} {family:<10} {int(trial.values[1]):>7,} {trial.values[0]:>7.4f} "
                  f"{trial.user_attrs['test_acc']:>8.4f} {ms['torch']:>9.3f} {ms['onnxruntime']:>8.3f}  "
                  f"{' and '.join(on) if len(on) == 2 else on[0] + ' only'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", help="re-time every complete trial of this study and compare its fronts")
    parser.add_argument("--storage", default="sqlite:///optuna.db")
    parser.add_argument("--tracking-uri")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.study:
        study_fronts(args.study, args.storage, args.tracking_uri)
    else:
        networks()


if __name__ == "__main__":
    main()
