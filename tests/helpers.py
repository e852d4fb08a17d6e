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
