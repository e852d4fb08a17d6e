"""Each logit-based distillation method's loss against numbers worked out by hand: scalar Python over a batch of two
images and three classes, written from the papers' formulas, and identities a reader can check in their head."""

import dataclasses
import json
import math
from dataclasses import replace

import optuna
import pytest
import torch
from helpers import fast

from kdsearch.cli import main
from kdsearch.config import StudyConfig
from kdsearch.distill import TrainSettings, kd_loss
from kdsearch.kd_losses import METHOD_SPACE, dist_loss, dkd_loss, ls_loss, method_loss, training_loss
from kdsearch.students import (
    family_params,
    middle_params,
    params_in_space,
    sample_student,
    search_space,
    train_settings,
    translated_params,
)
from kdsearch.study import baseline_params, make_sampler

S = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
T = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
Y = [0, 1]


def softmax(row, temperature=1.0):
    e = [math.exp(v / temperature) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ce(rows, labels):
    return sum(-math.log(softmax(r)[y]) for r, y in zip(rows, labels)) / len(rows)


def tensors():
    return torch.tensor(S), torch.tensor(T), torch.tensor(Y)


def test_dkd_is_ce_plus_weighted_target_and_non_target_kl():
    temp, alpha, beta = 2.0, 1.0, 8.0
    tckd = nckd = 0.0
    for s, t, y in zip(S, T, Y):
        ps, pt = softmax(s, temp), softmax(t, temp)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others_s = softmax([v for i, v in enumerate(s) if i != y], temp)
        others_t = softmax([v for i, v in enumerate(t) if i != y], temp)
        nckd += kl(others_t, others_s)
    by_hand = ce(S, Y) + temp**2 * (alpha * tckd + beta * nckd) / 2
    assert dkd_loss(*tensors(), epoch=5, alpha=alpha, beta=beta, temperature=temp, warmup=5).item() == \
        pytest.approx(by_hand, rel=1e-5)
    # half-way through the warm-up, half the distillation term
    half = ce(S, Y) + 0.5 * (by_hand - ce(S, Y))
    assert dkd_loss(*tensors(), epoch=2, alpha=alpha, beta=beta, temperature=temp, warmup=4).item() == \
        pytest.approx(half, rel=1e-5)


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_dist_is_ce_plus_one_minus_correlation_per_image_and_per_class():
    tau, beta, gamma = 2.0, 1.0, 3.0
    ys, yt = [softmax(r, tau) for r in S], [softmax(r, tau) for r in T]
    inter = sum(1 - pearson(a, b) for a, b in zip(ys, yt)) / 2
    columns = lambda rows: [list(c) for c in zip(*rows)]  # noqa: E731
    intra = sum(1 - pearson(a, b) for a, b in zip(columns(ys), columns(yt))) / 3
    by_hand = ce(S, Y) + tau**2 * (beta * inter + gamma * intra)
    assert dist_loss(*tensors(), epoch=1, beta=beta, gamma=gamma, tau=tau).item() == pytest.approx(by_hand, rel=1e-5)


def standardise(row):
    mean = sum(row) / len(row)
    sd = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / sd for v in row]


def test_ls_is_kd_on_z_scored_logits():
    temp, kd_w, ce_w = 2.0, 9.0, 0.1
    soft = sum(kl(softmax(standardise(t), temp), softmax(standardise(s), temp)) for s, t in zip(S, T)) / 2
    by_hand = ce_w * ce(S, Y) + kd_w * temp**2 * soft
    got = ls_loss(*tensors(), epoch=1, temperature=temp, kd_weight=kd_w, ce_weight=ce_w).item()
    assert got == pytest.approx(by_hand, rel=1e-4)


def test_identities_a_reader_can_check():
    s, _, y = tensors()
    plain = ce(S, Y)
    # a student that predicts as the teacher does owes only its cross-entropy
    assert dkd_loss(s, s, y, 9, alpha=1.0, beta=8.0, temperature=4.0, warmup=1).item() == pytest.approx(plain)
    assert dist_loss(s, s, y, 1, beta=1.0, gamma=1.0, tau=1.0).item() == pytest.approx(plain)
    # standardising forgets scale and shift: a teacher 3x the student's logits plus 5 teaches it nothing new (up to
    # the 1e-7 that pads the standard deviation, times kd_weight * T^2 = 36)
    assert ls_loss(s, 3 * s + 5, y, 1, temperature=2.0, kd_weight=9.0, ce_weight=0.1).item() == \
        pytest.approx(0.1 * plain, abs=1e-5)


def test_method_loss_names_the_method_and_defaults_to_the_papers_knobs():
    s, t, y = tensors()
    assert method_loss("kd", s, t, y, 1, temperature=4.0, alpha=0.5).item() == kd_loss(s, t, y, 4.0, 0.5).item()
    assert method_loss("dkd", s, t, y, 40).item() == pytest.approx(
        dkd_loss(s, t, y, 40, alpha=1.0, beta=8.0, temperature=4.0, warmup=20).item())
    assert method_loss("dist", s, t, y, 1, tau=2.0).item() == pytest.approx(
        dist_loss(s, t, y, 1, beta=1.0, gamma=1.0, tau=2.0).item())


def test_a_trial_trains_with_its_methods_loss_at_its_temperature():
    """The sampled T is each method's temperature (DIST's tau); DKD warms up over its paper's share of the
    epochs (20 of 240: 2 of 24 epochs, so epoch 1 carries half the distillation term)."""
    s, t, y = tensors()
    base = TrainSettings(epochs=24, lr=0.1, batch_size=2, temperature=3.0)
    dkd = replace(base, method="dkd", method_knobs=(("beta", 2.0),))
    assert training_loss(dkd, s, t, y, 1).item() == pytest.approx(
        dkd_loss(s, t, y, 1, alpha=1.0, beta=2.0, temperature=3.0, warmup=2).item())
    dkd_half = ce(S, Y) + 0.5 * (training_loss(dkd, s, t, y, 2).item() - ce(S, Y))
    assert training_loss(dkd, s, t, y, 1).item() == pytest.approx(dkd_half, rel=1e-5)
    dist = replace(base, method="dist", method_knobs=(("beta", 2.0), ("gamma", 0.5)))
    assert training_loss(dist, s, t, y, 1).item() == pytest.approx(
        dist_loss(s, t, y, 1, beta=2.0, gamma=0.5, tau=3.0).item())
    ls = replace(base, method="ls", method_knobs=(("kd_weight", 4.0),))
    assert training_loss(ls, s, t, y, 1).item() == pytest.approx(
        ls_loss(s, t, y, 1, temperature=3.0, kd_weight=4.0, ce_weight=0.1).item())
    kd = replace(base, alpha=0.25, label_smoothing=0.1)  # kd as it always trained, label smoothing included
    assert training_loss(kd, s, t, y, 1).item() == kd_loss(s, t, y, 3.0, 0.25, 0.1).item()
    assert not base.distils and dkd.distils and replace(base, alpha=0.1).distils


def methods_config(methods) -> StudyConfig:
    cfg = StudyConfig()
    return cfg.replace(distill=dataclasses.replace(cfg.distill, method=methods))


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_the_categorical_method_samples_only_its_own_knobs(sampler):
    cfg = methods_config(("kd", "dkd", "dist", "ls"))
    cfg = cfg.replace(search=dataclasses.replace(cfg.search, sampler=sampler))
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=make_sampler(cfg))
    seen = set()
    for i in range(24):
        trial = study.ask()
        family, knobs, hp = sample_student(trial, cfg)
        method = trial.params["method"]
        seen.add(method)
        assert sorted(trial.params) == sorted(family_params(cfg, family, method))
        own = {k.split(".")[1]: v for k, v in trial.params.items() if k.startswith(f"{method}.")}
        assert set(own) == set(METHOD_SPACE[method]) and ("alpha" in trial.params) == (method == "kd")
        settings = train_settings(cfg, family, hp, seed=0)
        assert settings.method == method and dict(settings.method_knobs) == own
        assert settings.temperature == trial.params["temperature"]
        assert params_in_space(cfg, trial.params)
        study.tell(trial, [0.5 + 0.01 * i, 1000 + i, 1.0])
    assert seen == {"kd", "dkd", "dist", "ls"}
    assert search_space(cfg)["method"] == ["kd", "dkd", "dist", "ls"]


def test_a_study_naming_one_method_samples_as_before():
    """kd alone: T, alpha and lr, no `method` parameter, the same baselines; another method alone: its knobs, no
    `method` parameter either."""
    assert sorted(search_space(StudyConfig())) == ["alpha", "depth", "lr", "temperature", "width"]
    assert baseline_params(StudyConfig()) == {"no-kd": {"temperature": 4.0, "lr": math.sqrt(0.01 * 0.3), "alpha": 0.0},
                                              "kd": {"temperature": 4.0, "lr": math.sqrt(0.01 * 0.3), "alpha": 0.5}}
    trial = optuna.create_study().ask()
    _, _, hp = sample_student(trial, StudyConfig())
    assert sorted(trial.params) == ["alpha", "depth", "lr", "temperature", "width"]
    assert train_settings(StudyConfig(), "convnet", hp, 0).method == "kd"
    dkd = methods_config("dkd")
    assert sorted(search_space(dkd)) == ["depth", "dkd.beta", "lr", "temperature", "width"]
    assert baseline_params(dkd)["dkd"]["dkd.beta"] == 8.0 and "method" not in baseline_params(dkd)["dkd"]


def test_a_plain_baseline_needs_no_kd_among_the_methods():
    """With methods that leave out kd, the undistilled twin samples no method and trains with kd at alpha 0;
    each method's twin takes its paper's values (DIST's tau 1, LS's T 2) within the study's ranges."""
    cfg = methods_config(("dkd", "dist"))
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=make_sampler(cfg))
    params = baseline_params(cfg)
    assert params["dist"]["temperature"] == 1.0 and params["dist"]["method"] == "dist"
    study.enqueue_trial({**middle_params(cfg, "convnet"), **params["no-kd"]}, user_attrs={"baseline": "no-kd"})
    trial = study.ask()
    _, _, hp = sample_student(trial, cfg)
    assert "method" not in trial.params and "alpha" not in trial.params
    settings = train_settings(cfg, "convnet", hp, 0)
    assert settings.method == "kd" and not settings.distils


@pytest.mark.parametrize("value, says", [("'hinton'", "'hinton'"), ("['kd', 'kd']", "['kd', 'kd']"),
                                         ("[]", "[]")])
def test_an_unknown_or_repeated_method_is_one_line_naming_the_choices(workdir, capsys, value, says):
    assert main(["run-study", "--set", f"distill.method={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"distill.method = {says}: expected a KD method from kd, dkd, dist, ls" in err and "\n" not in err


def test_a_study_over_every_method_reports_each_methods_gain_and_exports_its_knobs(workdir, capsys):
    """Each method's twin is the plain baseline's student, lr and seed distilled at the paper's values; the report
    gives each method's gain, MLflow and the card record the method and its knobs."""
    from mlflow import MlflowClient

    args = ["run-study", *fast(), "--n-trials", "6", "--set", "distill.method=['kd', 'dkd', 'dist', 'ls']"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in ("KD", "DKD", "DIST", "LS"):
        assert f"{name} gain of the convnet (trials 0 -> " in out
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    gains = json.loads((workdir / "reports" / "digits" / "kd_gain.json").read_text())
    assert sorted(gains) == ["convnet dist", "convnet dkd", "convnet kd", "convnet ls"]
    for name, gain in gains.items():
        plain, twin = (study.trials[n] for n in gain["trials"])
        assert plain.number == 0 and twin.user_attrs["baseline"] == gain["method"] == name.split()[1]
        assert twin.params["method"] == gain["method"] and plain.user_attrs["seed"] == twin.user_attrs["seed"]
        assert {k: v for k, v in plain.params.items() if k not in ("method", "alpha", "temperature")} == \
            {k: v for k, v in twin.params.items() if k not in ("method", "temperature") and "." not in k
             and k != "alpha"}
    dkd = next(t for t in study.trials if t.params.get("method") == "dkd")
    assert dkd.params["dkd.beta"] == 8.0 and "alpha" not in dkd.params
    params = MlflowClient(f"sqlite:///{workdir}/mlflow.db").get_run(dkd.user_attrs["mlflow_run_id"]).data.params
    assert params["method"] == "dkd" and float(params["dkd.beta"]) == 8.0
    assert main(["export", "--study-name", "digits", "--trial", str(dkd.number)]) == 0
    card = json.loads((workdir / "exports" / "digits" / f"trial-{dkd.number}" / "card.json").read_text())
    assert card["distillation"]["method"] == "dkd" and card["distillation"]["dkd.beta"] == 8.0
    assert card["distillation"]["temperature"] == 4.0 and "alpha" not in card["distillation"]


def test_dkd_stays_finite_for_a_teacher_sure_of_its_answer():
    """A logit margin of 80 at T 1 rounds the teacher's other classes to probability 0 in float32: the target part
    is then -log p_s(target) of the two bins and must not read 0 * log 0 = NaN."""
    s, _, y = tensors()
    sure = torch.tensor([[80.0, 0.0, 0.0], [0.0, 80.0, 0.0]])
    got = dkd_loss(s, sure, y, 1, alpha=1.0, beta=8.0, temperature=1.0, warmup=1).item()
    by_hand_tckd = sum(-math.log(softmax(r)[t]) for r, t in zip(S, Y)) / 2  # KL from (1, 0) to (p, 1 - p)
    nckd = sum(kl(softmax([v for i, v in enumerate(t) if i != c]), softmax([v for i, v in enumerate(r) if i != c]))
               for r, t, c in zip(S, sure.tolist(), Y)) / 2
    assert got == pytest.approx(ce(S, Y) + by_hand_tckd + 8.0 * nckd, rel=1e-5)


def test_a_warm_start_carries_students_between_kd_alone_and_a_method_list():
    kd_only, several = StudyConfig(), methods_config(("kd", "dkd"))
    kd_trial = {"width": 1.0, "depth": 2, "temperature": 4.0, "alpha": 0.5, "lr": 0.05}
    into_several = translated_params(several, kd_trial, "convnet")
    assert into_several == {**kd_trial, "method": "kd"} and params_in_space(several, into_several)
    back = translated_params(kd_only, into_several, "convnet")
    assert back == kd_trial and params_in_space(kd_only, back)
    dkd_trial = {"width": 1.0, "depth": 2, "temperature": 4.0, "dkd.beta": 2.0, "lr": 0.05}
    assert translated_params(several, dkd_trial, "convnet")["method"] == "dkd"
    assert not params_in_space(kd_only, translated_params(kd_only, {**dkd_trial, "method": "dkd"}, "convnet"))


def test_a_method_name_cannot_be_a_builders_knob(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[student]\narch = 'pkg.mod:build'\n[student.custom]\ndkd = [1, 4]\n")
    from kdsearch import KdsearchError
    from kdsearch.study_file import load_study
    with pytest.raises(KdsearchError, match="student.custom.dkd: this name is taken"):
        load_study(path)
