"""Shared by the benchmarks: run a study quietly in a throwaway folder and time it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
import time
from pathlib import Path

import optuna

from kdsearch.config import StudyConfig
from kdsearch.search import run_study
from kdsearch.study_file import load_study

ROOT = Path(__file__).resolve().parent.parent
CACHE = str(ROOT / ".kdsearch-cache")


def study_config(name: str, overrides: list[str]) -> StudyConfig:
    return load_study(ROOT / "studies" / f"{name}.toml", overrides)


def cpu_distillation(study: str, overrides: list[str]):
    """A study's config, checked data, cached teacher and normalizer on the CPU, set up as a session sets them up
    (without the study and its MLflow runs), and the executor a session trains its students with."""
    import torch

    from kdsearch.distill import Normalizer
    from kdsearch.execution import InProcess, Workload
    from kdsearch.session import checked_data
    from kdsearch.teacher import get_teacher

    cfg = study_config(study, overrides)
    data = checked_data(cfg)
    teacher = get_teacher(cfg, data, torch.device("cpu"), Path(CACHE))
    normalize = Normalizer(data.mean, data.std, "cpu")
    work = Workload(data.train, data.val, normalize, teacher.targets(cfg.data.augment), cfg.engine.compile)
    return cfg, data, teacher, normalize, InProcess(work)


def quiet() -> None:
    import logging

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def timed_study(cfg: StudyConfig) -> tuple[optuna.Study, float]:
    """Run `cfg` in a temporary folder (own Optuna and MLflow stores, shared teacher cache); return the study
    and its wall seconds, the teacher excluded (it is cached before the clock starts)."""
    quiet()
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        os.chdir(tmp)
        try:
            quick = cfg.replace(search=dataclasses.replace(cfg.search, n_trials=1))
            run_study(quick, study_name="warm-up", cache_dir=CACHE)  # teacher into the cache, imports warm
            start = time.perf_counter()
            study = run_study(cfg, cache_dir=CACHE)
            return study, time.perf_counter() - start
        finally:
            os.chdir(here)
