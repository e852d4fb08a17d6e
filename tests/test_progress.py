"""Progress on long work: the teacher's epochs and the running trials, in place on a terminal, at a steady rate in a
file or a pipe."""

import io

import pytest
from helpers import fast

import kdsearch.progress as progress
from kdsearch.cli import main


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    """perf_counter and monotonic read `now[0]`."""
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


def test_a_file_gets_a_line_at_most_every_interval_and_always_the_last(clock):
    out = io.StringIO()
    bar = progress.Progress("teacher epoch", 4, out, interval_s=10)
    for epoch, at in ((1, 104.0), (2, 108.0), (3, 115.0), (4, 116.0)):
        clock[0] = at
        bar.update(epoch, f"val_acc 0.{epoch}")
    # epoch 1 after 4 s: 4 s an epoch, 3 to go; epoch 2 is 4 s after the last line (skipped); epoch 3 after 15 s:
    # 5 s an epoch, 1 to go; the last always
    assert out.getvalue().splitlines() == ["teacher epoch: 1/4 val_acc 0.1 (4 s, about 12 s left)",
                                           "teacher epoch: 3/4 val_acc 0.3 (15 s, about 5 s left)",
                                           "teacher epoch: 4/4 val_acc 0.4 (16 s, done)"]


def test_a_terminal_keeps_the_line_in_place_and_prints_finished_work_above_it(clock):
    out = Terminal()
    status = progress.TrialStatus(out)
    status.started(3)
    clock[0] = 110.0
    status.epoch(3, 1, 4, 0.5)
    status.print("trial 2 finished")
    status.ended(3)
    assert out.getvalue() == (progress.CLEAR + "running: trial 3 epoch 1/4 val_acc 0.5000 (about 30 s left)"
                              + progress.CLEAR + "trial 2 finished\n"
                              + "running: trial 3 epoch 1/4 val_acc 0.5000 (about 30 s left)"
                              + progress.CLEAR)


def test_a_trial_that_ends_leaves_the_terminal_line_and_a_long_line_fits_the_terminal(clock, monkeypatch):
    import os

    monkeypatch.setattr(progress.shutil, "get_terminal_size", lambda: os.terminal_size((40, 24)))
    out = Terminal()
    status = progress.TrialStatus(out)
    for n in (3, 4):
        status.started(n)
        status.epoch(n, 1, 4, 0.5)
    status.ended(3)
    last = out.getvalue().split(progress.CLEAR)[-1]
    assert last == "running: trial 4 epoch 1/4 val_acc 0.50"  # 39 of 40 columns, and trial 3 is gone


def test_a_study_shows_the_teachers_epochs_and_its_running_trials(workdir, capsys):
    assert main(["run-study", *fast(distill_epochs=2, teacher_epochs=2), "--n-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "training the teacher, epoch: 1/2 val_acc" in out and "training the teacher, epoch: 2/2 val_acc" in out
    assert "running: trial " in out and " epoch 1/2 val_acc " in out
    # the last line leads to the study's runs table (MLflow 3's UI may open the experiment on its GenAI overview)
    from mlflow import MlflowClient

    exp = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_experiment_by_name("digits")
    assert out.strip().splitlines()[-1] == (f"MLflow runs: `mlflow ui` here, then "
                                            f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs")


def test_a_no_kd_baseline_below_the_alpha_range_prints_no_warning_between_the_lines(tmp_path):
    """The no-KD baseline trains at alpha 0 whatever the range: Optuna's out-of-range warning is not shown, and
    the report weighs the baseline's alpha with the others' (Optuna refused a copy of it outside its range)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", "kdsearch", "run-study", "--n-trials", "1", *fast(),
                           "--set", "distill.alpha=[0.3, 0.9]"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "alpha 0 lr" in done.stdout and "[baseline no-kd]" in done.stdout
    assert "Fixed parameter" not in done.stdout + done.stderr
    assert "what drives each objective (fANOVA importance over 3 complete trials" in done.stdout
    assert "alpha" in json.loads((tmp_path / "reports" / "digits" / "importance.json").read_text())["val_acc"]
