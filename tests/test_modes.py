"""Budget and Pareto modes: limits, pruning, baselines, as recorded by Optuna and MLflow."""

import optuna
import pytest
from helpers import fast
from mlflow import MlflowClient

from kdsearch.cli import main
from kdsearch.config import SearchConfig
from kdsearch.pruning import DominatedPruner, Pruned, limit_reason, limit_violations

FAST = fast(distill_epochs=2, pruner=None)
State = optuna.trial.TrialState


def load(folder):
    return optuna.load_study(study_name="digits", storage=f"sqlite:///{folder}/optuna.db")


def test_limits_as_constraint_values_and_reasons():
    search = SearchConfig(max_params=1000, max_latency_ms=0.5)
    assert limit_violations({"params": 1200, "latency_ms": 0.25}, search) == {"params_over_limit": 200,
                                                                              "latency_ms_over_limit": -0.25}
    assert limit_violations({"params": 5, "latency_ms": 9.0}, SearchConfig()) == {}
    assert "1,200 parameters above max_params 1,000" in limit_reason({"params": 1200, "latency_ms": 0.1}, search)
    assert "latency 0.600 ms above max_latency_ms 0.5" in limit_reason({"params": 10, "latency_ms": 0.6}, search)
    assert limit_reason({"params": 1000, "latency_ms": 0.5}, search) is None


class FakeTrial:
    def __init__(self, study):
        self.study = study


def front_study(histories):
    """A study whose front holds trials with (val_acc, params, latency) and per-epoch histories."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for values, history in histories:
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs={"val_acc_history": history}))
    return study


def test_dominated_pruner_stops_a_costlier_trial_that_trails():
    study = front_study([([0.90, 1000, 0.2], [0.70, 0.90]), ([0.95, 5000, 0.5], [0.80, 0.95])])
    pruner = DominatedPruner(margin=0.05)
    pruner.before_training(FakeTrial(study), {"params": 2000, "latency_ms": 0.3})  # only trial 0 is cheaper
    assert [t.number for t in pruner.rivals] == [0]
    pruner.after_epoch(None, 1, 0.66)  # trails by 0.04: within the margin, goes on
    with pytest.raises(Pruned, match="trails trial 0") as info:
        pruner.after_epoch(None, 2, 0.84)  # trails 0.90 by 0.06
    assert info.value.by_trial == 0


@pytest.mark.parametrize("params, latency_ms, rival", [
    (1000, 0.100, True),  # the same cost: must beat the rival's accuracy to earn a place
    (1000, 0.104, True),  # slower (the old 10% tolerance aside, plainly dominated)
    (2000, 0.100, True),  # larger
    (1000, 0.0999, False),  # 0.1% faster: the front would keep it, so the pruner must too
    (999, 0.100, False),  # one parameter smaller
    (999, 0.200, False),  # smaller but slower: a trade-off, not dominated
])
def test_the_pruner_stops_only_trials_whose_cost_is_no_better(params, latency_ms, rival):
    study = front_study([([0.90, 1000, 0.100], [0.70, 0.90])])
    pruner = DominatedPruner(margin=0.0)
    pruner.before_training(FakeTrial(study), {"params": params, "latency_ms": latency_ms})
    assert bool(pruner.rivals) == rival
    if rival:
        with pytest.raises(Pruned):
            pruner.after_epoch(None, 1, 0.69)
    else:
        pruner.after_epoch(None, 1, 0.0)  # far behind, but strictly better in a cost: goes on


def test_dominated_pruner_spares_a_cheaper_trial():
    study = front_study([([0.90, 1000, 0.2], [0.70, 0.90])])
    pruner = DominatedPruner(margin=0.0)
    pruner.before_training(FakeTrial(study), {"params": 999, "latency_ms": 0.3})  # smaller: may be on the front
    pruner.after_epoch(None, 1, 0.10)
    assert pruner.rivals == []


def test_budget_mode_rejects_big_students_before_training(workdir):
    args = ["run-study", "--n-trials", "6", *FAST, "--set", "search.mode=budget", "--set", "search.max_params=1500",
            "--set", "search.pruner=none", "--set", "student.depth=[2, 3]"]
    assert main(args) == 0
    study = load(workdir)
    assert len(study.directions) == 1
    for t in study.trials:
        if t.user_attrs["params"] > 1500:
            assert t.state == State.PRUNED and "above max_params 1,500" in t.user_attrs["prune_reason"]
            assert "val_acc_history" not in t.user_attrs  # no training happened
        else:
            assert t.state == State.COMPLETE and len(t.user_attrs["val_acc_history"]) == 2
        constraint = [v for k, v in t.system_attrs.items() if k.endswith(":params_over_limit")]
        assert constraint == [t.user_attrs["params"] - 1500]  # set with trial.set_constraint
    assert {t.state for t in study.trials} == {State.PRUNED, State.COMPLETE}
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna.trial_state"] == t.state.name
        assert run.info.status == ("FINISHED" if t.state == State.COMPLETE else "KILLED")


def test_baselines_run_first_on_top_of_the_trials_asked_for_and_differ_only_in_alpha(workdir):
    assert main(["run-study", "--n-trials", "2", *FAST, "--set", "search.pruner=none"]) == 0
    first, second, *searched = load(workdir).trials
    assert len(searched) == 2 and not any("baseline" in t.user_attrs for t in searched)
    assert (first.user_attrs["baseline"], second.user_attrs["baseline"]) == ("no-kd", "kd")
    assert (first.params["alpha"], second.params["alpha"]) == (0.0, 0.5)
    assert {k: v for k, v in first.params.items() if k != "alpha"} == \
        {k: v for k, v in second.params.items() if k != "alpha"}


def test_auto_prunes_nothing_in_pareto_mode_and_takes_the_median_pruner_in_budget_mode(workdir):
    from kdsearch.pruning import NoPruner, OptunaPruner, epoch_pruner

    assert type(epoch_pruner(SearchConfig(), 15)) is NoPruner
    assert type(epoch_pruner(SearchConfig(mode="budget", max_params=1500), 15)) is OptunaPruner
    # the study below, where the dominated pruner stops trials (next test), with the default pruner stops none
    assert main(["run-study", "--n-trials", "6", *FAST, "--set", "student.width=[1.0, 1.0]", "--set",
                 "student.depth=[2, 2]", "--set", "search.prune_margin=0.0", "--set", "search.sampler=random"]) == 0
    assert {t.state for t in load(workdir).trials} == {State.COMPLETE}


def test_pareto_pruning_stops_trials_a_front_trial_dominates(workdir):
    # one architecture for all: every later trial's cost is dominated by the first complete one's
    args = ["run-study", "--n-trials", "6", *FAST, "--set", "student.width=[1.0, 1.0]", "--set", "student.depth=[2, 2]",
            "--set", "search.prune_margin=0.0", "--set", "search.sampler=random",
            "--set", "search.pruner=dominated"]
    assert main(args) == 0
    study = load(workdir)
    pruned = [t for t in study.trials if t.state == State.PRUNED]
    assert pruned, "expected at least one pruned trial"
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    for t in pruned:
        rival = study.trials[t.user_attrs["pruned_by"]]
        epoch = len(t.user_attrs["val_acc_history"])
        assert rival.state == State.COMPLETE and epoch == 1  # never after the last epoch
        assert rival.user_attrs["val_acc_history"][epoch - 1] > t.user_attrs["val_acc_history"][-1]
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna.trial_state"] == "PRUNED" and "trails trial" in run.data.tags["kdsearch.reason"]


@pytest.mark.parametrize("name, cls", [("tpe", optuna.samplers.TPESampler), ("nsga2", optuna.samplers.NSGAIISampler),
                                       ("random", optuna.samplers.RandomSampler), ("gp", optuna.samplers.GPSampler)])
def test_every_sampler_name_gives_optunas_sampler(name, cls):
    from kdsearch.config import StudyConfig
    from kdsearch.study import make_sampler

    cfg = StudyConfig()
    cfg = cfg.replace(search=SearchConfig(sampler=name))
    sampler = make_sampler(cfg)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.ask()
    assert isinstance(sampler._inner, cls)


def test_gp_sampler_runs_a_pareto_study(workdir):
    args = ["run-study", "--n-trials", "3", *FAST, "--set", "search.sampler='gp'", "--set", "search.pruner='none'"]
    assert main(args) == 0
    assert [t.state for t in load(workdir).trials] == [State.COMPLETE] * 5  # 2 baselines, 3 trials


def test_two_hosts_opening_a_new_study_at_once_enqueue_one_baseline_pair(tmp_path, monkeypatch):
    """Both open the study before either has enqueued anything (a barrier holds the first enqueue until the second
    gets there, or 5 s): only the one that made the study enqueues its pair."""
    import threading

    import kdsearch.study
    from kdsearch.config import StudyConfig
    from kdsearch.storage import open_storage

    barrier = threading.Barrier(2, timeout=5)
    enqueue = kdsearch.study.enqueue_baselines

    def held(study, cfg):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:  # the other host never came to enqueue
            pass
        enqueue(study, cfg)

    monkeypatch.setattr(kdsearch.study, "enqueue_baselines", held)
    storage = open_storage(f"journal:{tmp_path}/study.journal")
    hosts = [threading.Thread(target=kdsearch.study.open_study, args=(StudyConfig(), "shared", storage))
             for _ in range(2)]
    for host in hosts:
        host.start()
    for host in hosts:
        host.join()
    study = optuna.load_study(study_name="shared", storage=storage)
    assert sorted(t.user_attrs["baseline"] for t in study.trials) == ["kd", "no-kd"]
