"""Export: the files give the trained student's predictions, the card says what it is, MLflow holds the model."""


import optuna
import pytest
from helpers import export_matches_student, fast, study_in_new_folder

from kdsearch import KdsearchError
from kdsearch.export import choose_trial


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


def test_exported_files_predict_like_the_student(study_folder, capsys):
    card = export_matches_student(study_folder, "digits", 2)
    assert "[torch.onnx]" not in capsys.readouterr().out  # the exporter's progress lines are not the user's concern
    trial = optuna.load_study(study_name="digits", storage=f"sqlite:///{study_folder}/optuna.db").trials[2]
    assert (card["trial"], card["params"], card["val_acc"]) == (2, trial.user_attrs["params"], trial.values[0])
    assert card["family"] == "convnet" and card["channels"] == trial.user_attrs["channels"]
    assert card["distillation"]["temperature"] == trial.params["temperature"]
    assert card["distillation"]["schedule"] == "cosine"
    assert card["latency"]["threads"] == 1 and card["latency"]["batch_size"] == 1 and card["teacher"]["params"] > 0


def test_export_help_names_what_it_writes(capsys):
    from kdsearch.cli import main

    for args in (["--help"], ["export", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "torch.export" in out and "ONNX" in out and "TorchScript" not in out
