"""Accuracy that proves the engine is real, on the real MNIST in ../shared/data (slow: about 10 minutes on 2 cores).

    python -m pytest -m slow
"""

from pathlib import Path

import optuna
import pytest

from kdsearch.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STUDY = Path(__file__).resolve().parents[1] / "studies" / "mnist.toml"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(), reason=f"no MNIST in {DATA}")]


def test_mnist_teacher_and_a_small_student_reach_their_marks(workdir):
    assert main(["run-study", str(STUDY), "--data-dir", str(DATA), "--n-trials", "20"]) == 0
    study = optuna.load_study(study_name="mnist", storage=f"sqlite:///{workdir}/optuna.db")
    assert study.user_attrs["teacher"]["test_acc"] >= 0.993
    assert study.user_attrs["latency"]["runtime"] == "onnxruntime"  # the default: the deployed graph is timed
    small = [t for t in study.best_trials if t.user_attrs["params"] <= 30_000]
    chosen = max(small, key=lambda t: t.values[0])  # picked by validation accuracy, as a user would pick it
    print(f"trial {chosen.number}: {chosen.user_attrs['params']:,} params, val_acc {chosen.values[0]:.4f}, "
          f"test_acc {chosen.user_attrs['test_acc']:.4f}")
    assert chosen.user_attrs["test_acc"] >= 0.99, "the best-validated student of <= 30,000 parameters is under 99.0%"
