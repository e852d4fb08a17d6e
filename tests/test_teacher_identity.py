"""A study keeps the teacher it was made with: a resumed session whose teacher would differ is refused in one line,
before anything is trained; the training precision is part of a teacher's identity."""

import optuna
import torch
from helpers import fast

import kdsearch.teacher
from kdsearch.cli import main
from kdsearch.config import StudyConfig
from kdsearch.data import load_dataset
from kdsearch.models import Architecture, build_model

REFUSED = "was made with teacher"


def trials(folder) -> int:
    return len(optuna.load_study(study_name="digits", storage=f"sqlite:///{folder}/optuna.db").trials)


def test_a_bumped_teacher_family_is_refused_on_resume(workdir, capsys, monkeypatch):
    assert main(["run-study", *fast(), "--n-trials", "1"]) == 0
    before = trials(workdir)
    monkeypatch.setattr(kdsearch.teacher, "FAMILY_VERSION", kdsearch.teacher.FAMILY_VERSION + 1)
    assert main(["run-study", *fast(), "--n-trials", "1"]) == 2
    err = capsys.readouterr().err
    assert REFUSED in err and "pass a new --study-name" in err and len(err.strip().splitlines()) == 1
    assert trials(workdir) == before


def test_a_checkpoint_overwritten_at_the_same_path_is_refused_on_resume(workdir, capsys):
    path = workdir / "teacher.pt"
    torch.manual_seed(0)
    torch.save(build_model(Architecture(1, 10, 8, 2, 2), 8).state_dict(), path)
    args = ["run-study", *fast(), "--n-trials", "1", "--set", f"teacher.checkpoint='{path}'"]
    assert main(args) == 0
    before = trials(workdir)
    torch.manual_seed(1)
    torch.save(build_model(Architecture(1, 10, 8, 2, 2), 8).state_dict(), path)  # other weights, same path
    assert main(args) == 2
    assert REFUSED in capsys.readouterr().err
    assert trials(workdir) == before


def test_the_training_precision_is_part_of_the_teachers_key(monkeypatch):
    cfg, data = StudyConfig(), load_dataset(StudyConfig().data, 0)
    cpu = torch.device("cpu")
    keys = {}
    for bf16 in (True, False):
        monkeypatch.setattr(kdsearch.teacher, "uses_bf16", lambda device, bf16=bf16: bf16)
        keys[bf16] = kdsearch.teacher.teacher_key(cfg, data, cpu)
    assert keys[True] != keys[False]
    assert keys[False] == kdsearch.teacher.teacher_key(cfg, data)  # fp32 keys are as they were: caches stay valid
