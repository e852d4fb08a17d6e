"""The report's figures with numbers worked out by hand: hypervolume and the KD gain with its standard error."""

import optuna
import pytest

from kdsearch.scores import hypervolume, hypervolume_reference, kd_gain, paired_se, study_hypervolume
from kdsearch.trial import bits_of

TEACHER = {"params": 1000, "latency_ms": 2.0}


def test_hypervolume_by_hand():
    # box: accuracy 0..1, log10 params 0..3 (1 to the teacher's 1,000), latency 0..2 ms -> 6
    assert hypervolume_reference(TEACHER) == [0.0, 1000.0, 2.0]
    # (0.5, 10 params, 1 ms): 0.5 accuracy x (3 - 1) decades x (2 - 1) ms = 1.0 -> 1/6
    assert hypervolume([(0.5, 10, 1.0)], TEACHER) == pytest.approx(1 / 6)
    # a second point (0.8, 100, 1.5): 0.8 x 1 x 0.5 = 0.4, overlapping the first in 0.5 x 1 x 0.5 = 0.25
    assert hypervolume([(0.5, 10, 1.0), (0.8, 100, 1.5)], TEACHER) == pytest.approx((1.0 + 0.4 - 0.25) / 6)
    # larger or slower than the teacher adds nothing
    assert hypervolume([(0.99, 5000, 0.1), (0.99, 10, 3.0)], TEACHER) == 0.0


def test_study_hypervolume_uses_the_front_and_the_teacher():
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("teacher", TEACHER)
    for values in ([0.5, 10, 1.0], [0.4, 10, 1.0], [0.8, 100, 1.5]):  # the second is dominated
        study.add_trial(optuna.trial.create_trial(values=values))
    assert study_hypervolume(study) == pytest.approx((1.0 + 0.4 - 0.25) / 6)


def test_hypervolume_history_by_hand():
    from datetime import datetime, timedelta

    from kdsearch.scores import hypervolume_history

    t0 = datetime(2026, 1, 1)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("teacher", TEACHER)

    def add(values, start_s, end_s, state=optuna.trial.TrialState.COMPLETE):
        trial = optuna.trial.create_trial(values=values, state=state)
        trial.datetime_start, trial.datetime_complete = t0 + timedelta(seconds=start_s), t0 + timedelta(seconds=end_s)
        study.add_trial(trial)
    add(None, 0, 3, optuna.trial.TrialState.FAIL)  # the study's first start; adds no point
    add([0.8, 100, 1.5], 1, 9)   # trial 1 ends last
    add([0.5, 10, 1.0], 2, 5)    # trial 2 ends first
    add([0.4, 10, 1.0], 4, 7)    # dominated by trial 2: the front does not grow
    history = hypervolume_history(study)
    assert history["trial"].tolist() == [2, 3, 1] and history["trials"].tolist() == [1, 2, 3]
    assert history["seconds"].tolist() == [5.0, 7.0, 9.0]  # since the first trial started, failed or not
    assert history["hypervolume"].tolist() == pytest.approx([1 / 6, 1 / 6, (1.0 + 0.4 - 0.25) / 6])
    # scored on other figures: every student at twice the latency, against a teacher of 4 ms (the same box, doubled)
    slower = {"params": 1000, "latency_ms": 4.0}
    doubled = hypervolume_history(study, slower, lambda t: (*t.values[:2], 2 * t.values[2]))
    assert doubled["hypervolume"].tolist() == pytest.approx(history["hypervolume"].tolist())


def test_paired_standard_error_by_hand():
    # 10 images; kd right where plain is wrong on 3, the reverse on 1: d = +1 x3, -1 x1, 0 x6
    plain = [0, 0, 0, 1, 1, 1, 0, 1, 0, 1]
    kd = [1, 1, 1, 0, 1, 1, 0, 1, 0, 1]
    # mean d = 0.2; sample variance = (3 * 0.8^2 + 1.2^2 + 6 * 0.2^2) / 9 = 0.4; se = sqrt(0.4 / 10) = 0.2
    assert paired_se(bits_of(plain), bits_of(kd)) == pytest.approx(0.2)
    assert paired_se(None, bits_of(kd)) is None


def baseline(pair: int, kind: str, val: float, test: float, **attrs) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(values=[val, 500, 0.1], user_attrs={
        "baseline": kind, "baseline_pair": pair, "test_acc": test, "params": 500, **attrs})


def test_kd_gain_of_one_pair_has_the_images_standard_error():
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    plain, kd = [0, 0, 0, 1, 1, 1, 0, 1, 0, 1], [1, 1, 1, 0, 1, 1, 0, 1, 0, 1]
    study.add_trial(baseline(0, "no-kd", 0.5, 0.5, val_correct=bits_of(plain), test_correct=bits_of(plain)))
    study.add_trial(baseline(0, "kd", 0.7, 0.7, val_correct=bits_of(kd), test_correct=bits_of(kd)))
    gain = kd_gain(study)
    assert gain["trials"] == [0, 1] and gain["se_over"] == "images"
    assert gain["val_gain"] == pytest.approx(0.2) and gain["val_gain_se"] == pytest.approx(0.2)


def test_kd_gain_over_repeated_pairs_has_the_seeds_standard_error():
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for pair, (p, k) in enumerate([(0.90, 0.92), (0.91, 0.95), (0.89, 0.95)]):  # gains 0.02, 0.04, 0.06
        study.add_trial(baseline(pair, "no-kd", p, p))
        study.add_trial(baseline(pair, "kd", k, k))
    gain = kd_gain(study)
    assert gain["pairs"] == 3 and gain["se_over"] == "seeds"
    # mean 0.04; sd of (0.02, 0.04, 0.06) = 0.02; se = 0.02 / sqrt(3)
    assert gain["val_gain"] == pytest.approx(0.04) and gain["val_gain_se"] == pytest.approx(0.02 / 3**0.5)
    assert gain["val_acc"] == pytest.approx([0.90, 0.94])


def test_importance_weighs_a_baseline_outside_the_alpha_range_in_a_widened_space():
    """A no-KD baseline (alpha 0) in a study searching alpha in [0.3, 0.9] is copied with the others into one
    space, alpha [0, 0.9]; only a value off a stepped range (no simple widening) leaves its trial out."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from kdsearch.importance import _within_one_space

    wide = FloatDistribution(0.0, 1.0)

    space = {"alpha": FloatDistribution(0.3, 0.9), "depth": IntDistribution(1, 3),
             "method": CategoricalDistribution(["kd", "dkd"]), "lr": FloatDistribution(0.01, 0.3, log=True)}
    rows = [(0.0, 2, "kd", 0.05), (0.5, 1, "dkd", 0.1), (0.7, 3, "kd", 0.2)]
    trials = [optuna.trial.create_trial(params=dict(zip(space, row)), distributions=space | {"alpha": wide},
                                        value=0.5) for row in rows]
    for t in trials:  # as a study records an enqueued trial: its value, the searched range
        t.distributions = space
    copies = _within_one_space(trials)
    assert [t.params for t in copies] == [t.params for t in trials]
    assert copies[0].distributions["alpha"] == FloatDistribution(0.0, 0.9)
    assert copies[0].distributions["lr"] == space["lr"] and copies[0].distributions["depth"] == space["depth"]
    optuna.create_study().add_trials(copies)  # Optuna takes every copy
    stepped = {"alpha": FloatDistribution(0.3, 0.9, step=0.3)}
    off = [optuna.trial.create_trial(params={"alpha": a}, distributions={"alpha": wide}, value=0.5) for a in (0, 0.6)]
    for t in off:
        t.distributions = stepped
    assert [t.params["alpha"] for t in _within_one_space(off)] == [0.6]
