"""Export: the files give the trained student's predictions, the card says what it is, MLflow holds the model."""

import json
import os

import numpy as np
import onnxruntime
import optuna
import pytest
import torch
from helpers import fast, study_in_new_folder
from mlflow import MlflowClient

from kdsearch import KdsearchError
from kdsearch.cli import main
from kdsearch.config import DataConfig
from kdsearch.data import load_dataset
from kdsearch.distill import Normalizer, predict_logits
from kdsearch.export import choose_trial, load_student


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory):
    with study_in_new_folder(tmp_path_factory, "export", ["--n-trials", "4", *fast(distill_epochs=2)]) as folder:
        yield folder


def test_choose_trial_picks_the_most_accurate_within_the_bound(study_folder):
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{study_folder}/optuna.db")
    bound = sorted(t.user_attrs["params"] for t in study.trials)[1]
    chosen = choose_trial(study, max_params=bound)
    fits = [t for t in study.trials if t.user_attrs["params"] <= bound]
    assert chosen.values[0] == max(t.values[0] for t in fits) and chosen.user_attrs["params"] <= bound
    with pytest.raises(KdsearchError, match="no complete trial"):
        choose_trial(study, max_params=1)
    with pytest.raises(KdsearchError, match="is not complete"):
        choose_trial(study, trial=99)


def test_exported_files_predict_like_the_student(study_folder, monkeypatch, capsys):
    monkeypatch.chdir(study_folder)
    assert main(["export", "--study-name", "digits", "--trial", "2"]) == 0
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the export left MLflow's global tracking URI alone
    out = study_folder / "exports" / "digits" / "trial-2"
    client = MlflowClient(f"sqlite:///{study_folder}/mlflow.db")
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{study_folder}/optuna.db")
    trial = study.trials[2]
    student, _ = load_student(client, trial.user_attrs["mlflow_run_id"])

    data = load_dataset(DataConfig(), seed=0)
    images = data.test.x[:50]
    expected = predict_logits(student, images, Normalizer(data.mean, data.std, "cpu")).numpy()
    scripted = torch.jit.load(str(out / "student.ts"))(images.float()).detach().numpy()
    session = onnxruntime.InferenceSession(str(out / "student.onnx"))
    onnx_out = session.run(None, {"images": images.float().numpy()})[0]
    np.testing.assert_allclose(scripted, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(onnx_out, expected, atol=1e-4, rtol=1e-4)

    card = json.loads((out / "card.json").read_text())
    assert (card["trial"], card["params"], card["val_acc"]) == (2, trial.user_attrs["params"], trial.values[0])
    assert card["distillation"]["temperature"] == trial.params["temperature"]
    assert card["latency"]["threads"] == 1 and card["latency"]["batch_size"] == 1 and card["teacher"]["params"] > 0
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    logged = client.search_logged_models([run.info.experiment_id])
    assert any(m.source_run_id == run.info.run_id for m in logged)
