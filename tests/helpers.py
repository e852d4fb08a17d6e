"""Shared by the tests: small, fast study settings and a study run once per test module."""

from __future__ import annotations

import contextlib

import pytest

from kdsearch.cli import main


def fast(distill_epochs: int = 1, teacher_epochs: int = 1, pruner: str | None = "none") -> list[str]:
    """--set overrides for a tiny teacher and short trials on the digits."""
    args = ["--set", f"teacher.epochs={teacher_epochs}", "--set", "teacher.width=8", "--set", "teacher.depth=2",
            "--set", f"distill.epochs={distill_epochs}", "--set", "latency.min_run_time=0.02"]
    return args + (["--set", f"search.pruner='{pruner}'"] if pruner else [])


@contextlib.contextmanager
def study_in_new_folder(tmp_path_factory, name: str, args: list[str]):
    """Run `run-study ARGS` in a fresh folder (MLflow's and Optuna's defaults land there); yield the folder."""
    folder = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["run-study", *args]) == 0
        yield folder


def export_matches_student(folder, study_name: str, trial_number: int, data_cfg=None) -> dict:
    """Export trial N with the CLI from `folder`: the .pt2 program and the ONNX file (run by onnxruntime) give the
    student's logits on 50 test images (its refined weights where it was refined), and the MLflow model is logged on
    the run those weights came from; return the card."""
    import json
    import os

    import numpy as np
    import onnxruntime
    import optuna
    import torch
    from mlflow import MlflowClient

    from kdsearch.config import DataConfig
    from kdsearch.data import load_dataset
    from kdsearch.distill import Normalizer, predict_logits
    from kdsearch.export import load_student

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert main(["export", "--study-name", study_name, "--trial", str(trial_number)]) == 0
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the export left MLflow's global tracking URI alone
    out = folder / "exports" / study_name / f"trial-{trial_number}"
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{folder}/optuna.db")
    refined = (study.user_attrs.get(f"refined:{trial_number}") or {}).get("best")  # its weights are exported
    run_id = refined["run_id"] if refined else study.trials[trial_number].user_attrs["mlflow_run_id"]
    student, _ = load_student(client, run_id)
    data = load_dataset(data_cfg or DataConfig(), seed=0)
    images = data.test.x[:50]
    expected = predict_logits(student, images, Normalizer(data.mean, data.std, "cpu")).numpy()
    program = torch.export.load(str(out / "student.pt2")).module()
    onnx_out = onnxruntime.InferenceSession(str(out / "student.onnx")).run(None, {"images": images.float().numpy()})
    np.testing.assert_allclose(program(images.float()).detach().numpy(), expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(onnx_out[0], expected, atol=1e-4, rtol=1e-4)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert any(m.source_run_id == run.info.run_id for m in client.search_logged_models([run.info.experiment_id]))
    return json.loads((out / "card.json").read_text())
