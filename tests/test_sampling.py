"""Workers and machines on one study never propose the same student; one process replays its study exactly."""

import optuna
import pytest

from kdsearch.config import StudyConfig
from kdsearch.storage import open_storage
from kdsearch.study import open_study

SAMPLERS = ["tpe", "random", "nsga2", "gp"]


def config(sampler: str) -> StudyConfig:
    cfg = StudyConfig()
    return cfg.replace(search=cfg.search.__class__(sampler=sampler, baselines=False))


def ask_together(study_a: optuna.Study, study_b: optuna.Study, rounds: int) -> list[dict]:
    """Two processes' views of one study asking for a trial at the same moment, round after round."""
    params = []
    for _ in range(rounds):
        trials = [s.ask() for s in (study_a, study_b)]
        for t in trials:
            t.suggest_float("width", 0.25, 2.0, log=True)
            t.suggest_int("depth", 1, 3)
            t.suggest_float("alpha", 0.0, 1.0)
        for t in trials:
            params.append(t.params)
            t.study.tell(t, [t.params["alpha"], t.params["width"], t.params["depth"]])
    return params


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_two_workers_opening_a_study_together_sample_different_students(tmp_path, sampler):
    url = f"journal:{tmp_path}/j.log"
    cfg = config(sampler)
    a, b = open_study(cfg, "shared", open_storage(url)), open_study(cfg, "shared", open_storage(url))
    params = ask_together(a, b, rounds=4)
    assert len({tuple(sorted(p.items())) for p in params}) == len(params) == 8


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_one_process_replays_its_study_for_the_same_seed(tmp_path, sampler):
    runs = []
    for name in ("first", "second"):
        study = open_study(config(sampler), name, open_storage(f"sqlite:///{tmp_path}/{name}.db"))
        runs.append(ask_together(study, study, rounds=3))
    assert runs[0] == runs[1]


def test_a_study_made_before_a_key_existed_resumes(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    study = open_study(config("tpe"), "old", open_storage(url))
    stored = study.user_attrs["config"]
    del stored["search"]["baseline_repeats"]  # as kdsearch stored it before that key existed
    study.set_user_attr("config", stored)
    assert open_study(config("tpe"), "old", open_storage(url)).study_name == "old"


def test_dead_workers_are_judged_only_in_their_own_pid_space(tmp_path):
    """A RUNNING trial of a pid that no longer exists is failed when it ran in this host's pid space, and left to
    heartbeats when it ran in another (a container or machine sharing the host name)."""
    from mlflow import MlflowClient

    from kdsearch.storage import fail_dead_local_trials, worker_identity

    study = open_study(config("random"), "dead", open_storage(f"sqlite:///{tmp_path}/dead.db"))
    me = worker_identity()
    host = me["worker"].rpartition(":")[0]
    for space in (me["worker_process"]["space"], "another-boot:pid:[1]"):
        gone = {"worker": f"{host}:999999", "worker_process": {"start": "1", "space": space}}  # no such pid
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, user_attrs=gone))
    assert fail_dead_local_trials(study, MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")) == [0]
    states = [t.state for t in study.trials]
    assert states[:2] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING]


def test_metric_names_are_set_on_a_study_made_without_them(tmp_path):
    url = f"sqlite:///{tmp_path}/named.db"
    study = open_study(config("tpe"), "named", open_storage(url))
    study._storage.set_study_system_attr(study._study_id, "study:metric_names", None)
    assert optuna.load_study(study_name="named", storage=url).metric_names is None
    assert open_study(config("tpe"), "named", open_storage(url)).metric_names == ["val_acc", "params", "latency_ms"]
