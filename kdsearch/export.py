"""Take the chosen student away: a torch.export program (.pt2), ONNX and a JSON card, logged as an MLflow model on
its trial's run. (TorchScript is deprecated in torch 2.14: `torch.jit.load` warns on every load, so it is no longer
written.)

The exported model takes float32 images [N, C, H, W] with pixel values 0..255 and normalises them itself, so it
needs nothing from kdsearch to run.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import optuna
import torch
from mlflow import MlflowClient
from torch import nn

from kdsearch import KdsearchError, first_line
from kdsearch.measure import study_latency
from kdsearch.models import Architecture, StudentSpec, build_student, channels_of, convnet
from kdsearch.onnx_graph import Deployable, to_onnx
from kdsearch.students import is_distillation_param

COMPLETE = optuna.trial.TrialState.COMPLETE


def choose_trial(study: optuna.Study, trial: int | None = None, max_params: int | None = None,
                 max_latency_ms: float | None = None) -> optuna.trial.FrozenTrial:
    """The given trial, or the most accurate complete one within the bounds (fewer parameters break ties)."""
    complete = study.get_trials(deepcopy=False, states=[COMPLETE])
    if trial is not None:
        found = [t for t in complete if t.number == trial]
        if not found:
            raise KdsearchError(f"trial {trial} of study '{study.study_name}' is not complete: pick one from "
                                f"{sorted(t.number for t in complete)}")
        return found[0]
    fits = [t for t in complete if (max_params is None or t.user_attrs["params"] <= max_params)
            and (max_latency_ms is None or t.user_attrs["latency_ms"] <= max_latency_ms)]
    if not fits:
        raise KdsearchError(f"no complete trial of study '{study.study_name}' fits the bound: loosen --max-params "
                            "or --max-latency-ms, or run more trials")
    return max(fits, key=lambda t: (t.values[0], -t.user_attrs["params"]))


def load_student(client: MlflowClient, run_id: str) -> tuple[nn.Module, StudentSpec]:
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "student.pt", tmp)
        saved = torch.load(path, map_location="cpu", weights_only=True)
    spec = StudentSpec.from_dict(saved["spec"]) if "spec" in saved else _convnet_spec(saved)
    model = build_student(spec)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), spec


def _convnet_spec(saved: dict) -> StudentSpec:
    """The spec of a student saved before there were families (a convnet `Architecture` and its image size)."""
    arch = Architecture(**saved["arch"])
    shape = (arch.in_channels, saved["image_size"], saved["image_size"])
    knobs = {"base_width": arch.width, "width": 1.0, "depth": arch.depth, "convs_per_stage": arch.convs_per_stage}
    assert convnet(shape, arch.num_classes, **knobs).arch == arch
    return StudentSpec("convnet", shape, arch.num_classes, knobs)


def export_student(study: optuna.Study, trial: optuna.trial.FrozenTrial, client: MlflowClient, out_dir: Path
                   ) -> dict[str, Path]:
    """Write student.pt2, student.onnx and card.json under out_dir and log the model on the trial's run (or, for
    a refined student, on its best refined run, whose weights are exported)."""
    from kdsearch.refine import refined as refined_run

    refined = refined_run(study, trial.number)
    run_id = refined["run_id"] if refined else trial.user_attrs["mlflow_run_id"]
    student, spec = load_student(client, run_id)
    config = study.user_attrs["config"]
    data = study.user_attrs["data"]
    model = Deployable(student, data["mean"], data["std"]).eval()
    example = torch.rand(2, *data["input_shape"]) * 255  # batch 2: a batch of 1 would pin the ONNX batch size
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"export": out_dir / "student.pt2", "onnx": out_dir / "student.onnx", "card": out_dir / "card.json"}
    batch = {"x": {0: torch.export.Dim("batch")}}
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=batch)
        torch.export.save(program, str(paths["export"]))
        paths["onnx"].write_bytes(to_onnx(model, example))  # the graph that latency timing times
    except Exception as e:
        raise KdsearchError(f"trial {trial.number}'s student ({spec.family}) cannot be exported with torch.export "
                            f"({first_line(e)}): keep its forward free of data-dependent Python control flow") from None
    card = {
        "study": study.study_name, "trial": trial.number, "mlflow_run_id": run_id,
        "family": spec.family, "architecture": spec.to_dict(), "channels": channels_of(student),
        "params": trial.user_attrs["params"],
        "flops": trial.user_attrs.get("flops"), "size_bytes": trial.user_attrs.get("size_bytes"),
        "val_acc": refined["val_acc"] if refined else trial.values[0],
        "test_acc": refined["test_acc"] if refined else trial.user_attrs["test_acc"],
        "refined": refined and {**refined, "search_val_acc": trial.values[0],
                                "search_test_acc": trial.user_attrs["test_acc"]},
        "latency": {"median_ms": trial.user_attrs["latency_ms"], "iqr_ms": trial.user_attrs.get("latency_iqr_ms"),
                    **study_latency(study.user_attrs)},
        "distillation": {"method": trial.params.get("method", _single_method(config, trial)),
                         **distillation_knobs(trial),
                         "epochs": config["distill"]["epochs"],
                         **{k: v for k, v in trial.user_attrs.get("training", {}).items()}},
        "teacher": study.user_attrs.get("teacher"), "dataset": config["data"]["dataset"],
        "input": {"shape": ["N", *data["input_shape"]], "dtype": "float32", "range": "pixel values 0..255",
                  "normalisation": {"mean": data["mean"], "std": data["std"]}},
    }
    paths["card"].write_text(json.dumps(card, indent=1))
    _log_model(client, run_id, model, example, paths["card"])
    return paths


def _log_model(client: MlflowClient, run_id: str, model: nn.Module, example: torch.Tensor, card: Path) -> None:
    """An MLflow model on the trial's run (ready for `mlflow.register_model`), the run left as it was."""
    import mlflow.pytorch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    status = client.get_run(run_id).info.status
    # The fluent API logs to the global tracking URI (and mlflow.set_tracking_uri also sets the environment
    # variable); MLflow's own context manager points it at the client's store and restores both afterwards.
    with _use_tracking_uri(client.tracking_uri), warnings.catch_warnings(), mlflow.start_run(run_id=run_id):
        warnings.simplefilter("ignore")
        mlflow.pytorch.log_model(model, name="model", input_example=example.numpy())
        mlflow.log_artifact(str(card), artifact_path="export")
    client.set_terminated(run_id, status)


def export_study_student(study_name: str, storage: str, tracking_uri: str | None, out: Path, *,
                         trial: int | None = None, max_params: int | None = None,
                         max_latency_ms: float | None = None) -> dict[str, Path]:
    """The `export` command."""
    from kdsearch.report import load_existing_study
    from kdsearch.tracking import client_for

    study = load_existing_study(study_name, storage)
    chosen = choose_trial(study, trial, max_params, max_latency_ms)
    return export_student(study, chosen, client_for(tracking_uri), out / study_name / f"trial-{chosen.number}")


def _single_method(config: dict, trial: optuna.trial.FrozenTrial) -> str:
    method = config["distill"].get("method", "kd")
    if trial.user_attrs.get("baseline") == "no-kd" or not isinstance(method, str):
        return "kd"  # a plain baseline trains with kd at alpha 0 whatever the study's methods
    return method


def distillation_knobs(trial: optuna.trial.FrozenTrial) -> dict:
    """T, the method's knobs (alpha for kd) and lr, as the trial sampled them."""
    return {k: v for k, v in trial.params.items() if is_distillation_param(k) and k != "method"}
