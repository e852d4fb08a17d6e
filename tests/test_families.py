"""Student families: counted by hand, sampled as a conditional space, trained, measured, exported; a user's own
builder alike."""

from __future__ import annotations

import json
import math

import optuna
import pandas as pd
import pytest
import torch
from helpers import export_matches_student, fast, study_in_new_folder

from kdsearch import KdsearchError
from kdsearch.config import StudyConfig
from kdsearch.distill import TrainSettings, kd_loss, make_optimizer
from kdsearch.importance import importance_line
from kdsearch.measure import count_flops, count_params
from kdsearch.models import StudentSpec, build_student, resnet, separable
from kdsearch.students import SHARED, family_params, middle_params, params_in_space, sample_student, search_space
from kdsearch.study import make_sampler
from kdsearch.study_file import load_study


def test_separable_counted_by_hand():
    # channels: stem 8, stage 0 8, stage 1 16, each stage starting with stride 2; plain separable blocks
    model = separable((1, 8, 8), 10, base_width=8, width=1.0, depth=2, channel_multiple=8)
    stem = 1 * 8 * 9 + 2 * 8                      # 88
    stage0 = 8 * 9 + 2 * 8 + 8 * 8 + 2 * 8        # depthwise, BN, pointwise, BN: 168
    stage1 = 8 * 9 + 2 * 8 + 8 * 16 + 2 * 16      # 248
    head = 16 * 10 + 10                           # 170
    assert count_params(model) == stem + stage0 + stage1 + head == 674
    # multiply-adds: stem at 8x8, stage 0 at 4x4 and stage 1 at 2x2 after their stride-2 depthwise convs
    macs = 64 * 8 * 9 + 16 * 8 * 9 + 16 * 8 * 8 + 4 * 8 * 9 + 4 * 8 * 16 + 16 * 10
    assert count_flops(model, (1, 8, 8)) == 2 * macs == 15_488


def test_inverted_residuals_counted_by_hand_and_add_their_input():
    model = separable((1, 8, 8), 10, base_width=8, width=1.0, depth=1, blocks=2, expand=2, channel_multiple=8)
    block = (8 * 16 + 2 * 16) + (16 * 9 + 2 * 16) + (16 * 8 + 2 * 8)  # expand, depthwise, project: 480
    assert count_params(model) == 88 + 2 * block + (8 * 10 + 10) == 1138
    blocks = [m for m in model.modules() if type(m).__name__ == "SeparableBlock"]
    assert [b.residual for b in blocks] == [False, True]  # the second block keeps size and channels


def test_resnet_counted_by_hand():
    # channels 8, 16, 32 (base 8 x width 1); one basic block per stage; 1x1 projections where the shape changes
    model = resnet((1, 4, 4), 2, base_width=8, width=1.0, blocks=1, channel_multiple=8)
    stem = 9 * 8 + 16
    stage1 = 2 * (8 * 8 * 9 + 16)
    stage2 = 8 * 16 * 9 + 32 + 16 * 16 * 9 + 32 + (8 * 16 + 32)
    stage3 = 16 * 32 * 9 + 64 + 32 * 32 * 9 + 64 + (16 * 32 + 64)
    assert count_params(model) == stem + stage1 + stage2 + stage3 + 32 * 2 + 2 == 19_546
    macs = (16 * 8 * 9                                           # stem at 4x4
            + 2 * 16 * 8 * 72                                    # stage 1 at 4x4
            + 4 * 16 * 72 + 4 * 16 * 144 + 4 * 16 * 8            # stage 2 at 2x2, with its projection
            + 1 * 32 * 144 + 1 * 32 * 288 + 1 * 32 * 16          # stage 3 at 1x1
            + 32 * 2)
    assert count_flops(model, (1, 4, 4)) == 2 * macs == 96_640


def test_resnet_depths_are_the_cifar_family():
    for blocks, layers in ((1, 8), (2, 14), (3, 20)):
        model = resnet((3, 32, 32), 10, base_width=16, width=1.0, blocks=blocks)
        weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                    and getattr(m, "kernel_size", (3, 3)) != (1, 1)]
        assert len(weighted) == layers  # 6n + 2: the 1x1 projections are not counted as layers


def test_user_builder_counted_by_hand():
    model = build_student(StudentSpec("own_students:tiny_mlp", (1, 8, 8), 10, {"hidden": 16}))
    assert count_params(model) == 64 * 16 + 16 + 16 * 10 + 10 == 1210
    assert count_flops(model, (1, 8, 8)) == 2 * (64 * 16 + 16 * 10)


def test_channel_multiple_rounds_every_built_in_family():
    for build in (separable, resnet):
        knobs = {"base_width": 8, "width": 1.3, "channel_multiple": 8}
        model = build((1, 8, 8), 10, depth=2, **knobs) if build is separable else build((1, 8, 8), 10, blocks=1,
                                                                                             **knobs)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(c.out_channels % 8 == 0 for c in convs)


def test_widths_that_build_the_same_network_share_one_cost():
    from kdsearch.costs import cost_key

    def key(width):
        spec = StudentSpec("separable", (1, 8, 8), 10, {"base_width": 8, "width": width, "depth": 2,
                                                        "channel_multiple": 8})
        return cost_key(spec, build_student(spec))

    assert key(1.0) == key(1.2)  # both 8 channels in the stem: one architecture, one latency
    assert key(1.0) != key(2.0)


def test_a_user_builders_knobs_and_tensor_shapes_are_part_of_its_cost_key():
    from kdsearch.costs import cost_key

    def key(**knobs):
        spec = StudentSpec("own_students:raw_parameters", (1, 8, 8), 10, knobs)
        return cost_key(spec, build_student(spec))

    assert key(hidden=4) != key(hidden=64)  # its repr is the same for both
    assert key(hidden=4, passes=1) != key(hidden=4, passes=3)  # a knob only its forward uses


def test_a_study_made_before_channel_rounding_resumes_as_it_was_made():
    from kdsearch.study import _comparable, _older_defaults_filled, as_it_was_made

    cfg = StudyConfig()
    stored = _comparable(cfg.replace(student=cfg.student.__class__(channel_multiple=1)))
    del stored["student"]["channel_multiple"]
    for k in ("separable", "resnet", "custom"):
        del stored["student"][k]
    resumed = as_it_was_made(cfg, stored)
    assert resumed.student.channel_multiple == 1 and _older_defaults_filled(stored) == _comparable(resumed)
    assert as_it_was_made(cfg, _comparable(cfg)).student.channel_multiple == 1  # a study made now keeps 1


def test_a_study_made_when_channels_were_rounded_to_4_resumes_with_4():
    from kdsearch.study import _comparable, _older_defaults_filled, as_it_was_made

    cfg = StudyConfig()
    made = _comparable(cfg.replace(student=cfg.student.__class__(channel_multiple=4)))
    resumed = as_it_was_made(cfg, made)
    assert resumed.student.channel_multiple == 4 and _older_defaults_filled(made) == _comparable(resumed)
    assert as_it_was_made(cfg.replace(student=cfg.student.__class__(channel_multiple=2)), made
                          ).student.channel_multiple == 2  # a file that names the key is taken at its word


def test_a_builder_that_does_not_import_stops_the_session_before_the_teacher(workdir, capsys):
    from kdsearch.cli import main

    assert main(["run-study", *fast(), "--set", "student.arch='nomod.nets:tiny'"]) == 2
    err = capsys.readouterr().err
    assert "cannot import nomod.nets" in err and "\n" not in err.strip()
    assert not (workdir / "optuna.db").exists() and not (workdir / ".kdsearch-cache").exists()


def mixed_config(**student) -> StudyConfig:
    cfg = StudyConfig()
    return cfg.replace(student=cfg.student.__class__(arch=("convnet", "separable", "resnet"), **student))


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random", "gp"])
def test_categorical_space_samples_each_familys_own_knobs_only(sampler):
    cfg = mixed_config()
    cfg = cfg.replace(search=cfg.search.__class__(sampler=sampler))
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=make_sampler(cfg))
    seen = set()
    for i in range(24):
        trial = study.ask()
        family, knobs, hp = sample_student(trial, cfg)
        seen.add(family)
        assert sorted(trial.params) == sorted(family_params(cfg, family))
        assert all(name.startswith(f"{family}.") for name in trial.params if name not in ("arch", *hp))
        model = build_student(StudentSpec(family, (1, 8, 8), 10, knobs))
        study.tell(trial, [0.5 + 0.01 * i, count_params(model), 1.0])
    assert seen == {"convnet", "separable", "resnet"}


def test_a_single_family_keeps_its_plain_knob_names():
    assert sorted(search_space(StudyConfig())) == ["alpha", "depth", "lr", "temperature", "width"]


def test_convs_per_stage_is_searched_when_given_a_range(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[student]\nconvs_per_stage = [1, 3]\n")
    cfg = load_study(path)
    assert search_space(cfg)["convs_per_stage"] == (1, 3)
    assert middle_params(cfg, "convnet")["convs_per_stage"] == 2
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        _, knobs, _ = sample_student(study.ask(), cfg)
        model = build_student(StudentSpec("convnet", (1, 8, 8), 10, knobs))
        assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == knobs["depth"] * knobs["convs_per_stage"]
        seen.add(knobs["convs_per_stage"])
    assert seen == {1, 2, 3}
    fixed = load_study(path, ["student.convs_per_stage=2"])  # a plain integer stays fixed, as before
    assert "convs_per_stage" not in search_space(fixed)


def test_warm_start_accepts_only_a_familys_own_knobs_within_range():
    cfg = mixed_config()
    good = {**middle_params(cfg, "resnet"), "temperature": 4.0, "alpha": 0.5, "lr": 0.05}
    assert params_in_space(cfg, good)
    assert not params_in_space(cfg, {**good, "separable.depth": 2})  # a knob of another family
    assert not params_in_space(cfg, {**good, "resnet.blocks": 9})  # outside the range


def test_warm_start_names_knobs_as_the_new_study_does():
    from kdsearch.students import translated_params

    single, mixed = StudyConfig(), mixed_config()
    plain = {"width": 1.0, "depth": 2, "temperature": 4.0, "alpha": 0.5, "lr": 0.05}
    named = translated_params(mixed, plain, "convnet")
    assert named == {"arch": "convnet", "convnet.width": 1.0, "convnet.depth": 2, "temperature": 4.0,
                     "alpha": 0.5, "lr": 0.05} and params_in_space(mixed, named)
    assert translated_params(single, named, "convnet") == plain
    resnet = {"arch": "resnet", "resnet.width": 0.5, "resnet.blocks": 2, "temperature": 4.0, "alpha": 0.5, "lr": 0.05}
    assert not params_in_space(single, translated_params(single, resnet, "resnet"))  # not a family of this study


def test_study_file_errors_name_the_key(tmp_path):
    path = tmp_path / "s.toml"
    for text, expected in [
        ('[student]\narch = ["convnet", "mlp"]', "student.arch"),
        ('[student]\narch = "transformer"', "student.arch = 'transformer' is unknown"),
        ('[student.custom]\nhidden = [4, 8]', "[student.custom] holds a user builder's knobs"),
        ('[teacher]\narch = "resnet18"', "teacher.arch = 'resnet18' is unknown"),
        ('[distill]\nlabel_smoothing = 1.5', "distill.label_smoothing"),
        ('[student]\narch = "own_students:tiny_mlp"\n[student.custom]\nhidden = {a = 1}', "student.custom.hidden"),
        ('[student]\narch = "own_students:tiny_mlp"\n[student.custom]\nlr = [0.1, 0.2]',
         "student.custom.lr: this name is taken"),
    ]:
        path.write_text(text)
        with pytest.raises(KdsearchError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            load_study(path)


def test_builder_problems_are_one_line_errors():
    with pytest.raises(KdsearchError, match="cannot import no_such_pkg"):
        build_student(StudentSpec("no_such_pkg.nets:tiny", (1, 8, 8), 10, {}))
    with pytest.raises(KdsearchError, match="has no function 'missing'"):
        build_student(StudentSpec("own_students:missing", (1, 8, 8), 10, {}))
    with pytest.raises(KdsearchError, match="must return an nn.Module"):
        build_student(StudentSpec("own_students:not_a_module", (1, 8, 8), 10, {}))
    with pytest.raises(KdsearchError, match="failed with knobs"):
        build_student(StudentSpec("own_students:tiny_mlp", (1, 8, 8), 10, {"activation": "gelu"}))


def test_warmup_then_cosine_by_hand():
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, TrainSettings(epochs=3, lr=1.0, batch_size=1), total_steps=12, warmup_steps=4)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])


def test_norms_and_biases_are_not_decayed_unless_asked():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    opt, _ = make_optimizer(model, TrainSettings(epochs=1, lr=0.1, batch_size=1, decay_norms=False), 10)
    decayed = [p.shape for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed == [torch.Size([4, 1, 3, 3])]
    opt, _ = make_optimizer(model, TrainSettings(epochs=1, lr=0.1, batch_size=1, decay_norms=True), 10)
    assert sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] > 0) == 4


def test_label_smoothing_smooths_the_hard_term_only_by_hand():
    s = torch.tensor([[2.0, 0.0]])
    y = torch.tensor([0])
    log_p = [2 - math.log(math.exp(2) + 1), -math.log(math.exp(2) + 1)]
    # CE with smoothing 0.2 over 2 classes: target (0.9, 0.1)
    assert kd_loss(s, None, y, 1.0, 0.0, 0.2).item() == pytest.approx(-(0.9 * log_p[0] + 0.1 * log_p[1]))
    # with alpha 1 the soft term alone remains: smoothing does not touch it
    t = torch.tensor([[0.0, 1.0]])
    assert kd_loss(s, t, y, 2.0, 1.0, 0.2).item() == pytest.approx(kd_loss(s, t, y, 2.0, 1.0, 0.0).item())


def test_a_student_saved_before_families_loads_as_a_convnet():
    from kdsearch.export import _convnet_spec
    from kdsearch.models import Architecture, build_model

    old = build_model(Architecture(1, 10, 6, 2), 8).eval()  # 6 channels: saved before channel counts were rounded
    spec = _convnet_spec({"arch": Architecture(1, 10, 6, 2).to_dict(), "image_size": 8})
    new = build_student(spec).eval()
    new.load_state_dict(old.state_dict())
    x = torch.randn(3, 1, 8, 8)
    assert spec.family == "convnet" and torch.equal(new(x), old(x))


@pytest.fixture(scope="module")
def mixed_study(tmp_path_factory):
    args = ["--n-trials", "9", *fast(), "--set", "student.arch=['convnet', 'separable', 'resnet']",
            "--set", "student.resnet.width=[0.25, 0.5]"]
    with study_in_new_folder(tmp_path_factory, "families", args) as folder:
        yield folder


def test_every_family_trains_reports_and_exports(mixed_study):
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{mixed_study}/optuna.db")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.user_attrs["family"] for t in done} == {"convnet", "separable", "resnet"}
    for t in done:
        assert t.user_attrs["family"] == t.params["arch"]
        assert t.user_attrs["params"] > 0 and t.user_attrs["latency_ms"] > 0 and 0 <= t.values[0] <= 1
    front = pd.read_csv(mixed_study / "reports" / "digits" / "pareto.csv")
    assert set(front["family"]) <= {"convnet", "separable", "resnet"} and len(front)
    written = pd.read_csv(mixed_study / "reports" / "digits" / "pareto.csv", dtype=str, keep_default_na=False)
    depths = [v for c in written if c.endswith(".depth") or c.endswith(".blocks") for v in written[c] if v]
    assert depths and all(v.isdigit() for v in depths), depths  # not 3.0: the other families' rows are empty
    importance = json.loads((mixed_study / "reports" / "digits" / "importance.json").read_text())
    for shares in importance.values():  # the families' split of the variance, then each family weighed alone
        assert 0 <= shares["arch"] <= 1
        assert all(k.split(".")[0] in {"convnet", "separable", "resnet"} for k in shares if k != "arch")
    assert not [k for o in ("params", "latency_ms") for k in importance[o] if k != "arch" and k.split(".")[1] in SHARED]
    line = importance_line(importance, study)  # every family named, with its trials, even one left out
    assert all(f"{f} ({sum(t.params['arch'] == f for t in done)} trials)" in line for f in ("convnet", "resnet"))
    gains = json.loads((mixed_study / "reports" / "digits" / "kd_gain.json").read_text())
    assert sorted(gains) == ["convnet", "resnet", "separable"]
    for family, gain in gains.items():
        plain, kd = (study.trials[n] for n in gain["trials"])
        assert plain.user_attrs["baseline_family"] == kd.user_attrs["baseline_family"] == family
        assert plain.params == {**kd.params, "alpha": 0.0} and plain.user_attrs["seed"] == kd.user_attrs["seed"]
    for family in ("separable", "resnet"):
        first = min(t.number for t in done if t.user_attrs["family"] == family)
        card = export_matches_student(mixed_study, "digits", first)
        assert card["family"] == family
        assert card["distillation"]["schedule"] == {"separable": "cosine", "resnet": "warmup-cosine"}[family]
        assert card["architecture"]["knobs"]["channel_multiple"] == StudyConfig().student.channel_multiple


def test_a_user_builder_behaves_like_a_built_in(tmp_path_factory):
    args = ["--n-trials", "4", *fast(), "--set", "student.arch='own_students:tiny_mlp'",
            "--set", "student.custom.hidden=[4, 32]", "--set", "student.custom.activation=['relu', 'tanh']",
            "--set", "search.baselines=false"]
    with study_in_new_folder(tmp_path_factory, "own", args) as folder:
        study = optuna.load_study(study_name="digits", storage=f"sqlite:///{folder}/optuna.db")
        trial = study.trials[0]
        assert sorted(trial.params) == ["activation", "alpha", "hidden", "lr", "temperature"]
        assert trial.user_attrs["params"] == 64 * trial.params["hidden"] + trial.params["hidden"] + \
            trial.params["hidden"] * 10 + 10
        card = export_matches_student(folder, "digits", 0)
        assert card["family"] == "own_students:tiny_mlp" and card["architecture"]["knobs"]["hidden"] == \
            trial.params["hidden"]


def test_a_torch_export_teacher_checkpoint_distils(tmp_path_factory, tmp_path):
    from kdsearch.models import Architecture, build_model

    teacher = build_model(Architecture(1, 10, 8, 2), 8).eval()
    path = tmp_path / "teacher.pt2"
    batch = {"x": {0: torch.export.Dim("batch")}}
    torch.export.save(torch.export.export(teacher, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=batch), str(path))
    args = ["--n-trials", "2", *fast(), "--set", f"teacher.checkpoint='{path}'", "--set", "search.baselines=false"]
    with study_in_new_folder(tmp_path_factory, "pt2", args) as folder:
        study = optuna.load_study(study_name="digits", storage=f"sqlite:///{folder}/optuna.db")
        assert study.user_attrs["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_a_torchvision_teacher_is_fitted_to_the_data_and_trained(tmp_path_factory):
    from kdsearch.teacher_network import torchvision_model

    model = torchvision_model("squeezenet1_1", (1, 8, 8), 10)  # too small for its pooling: upsampled
    assert model.size == 32 and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(KdsearchError, match="resnet18"):
        torchvision_model("resnet181", (1, 8, 8), 10)
    args = ["--n-trials", "1", *fast(teacher_epochs=3), "--set", "teacher.arch='torchvision:resnet18'", "--set",
            "search.baselines=false"]
    with study_in_new_folder(tmp_path_factory, "tv", args) as folder:
        study = optuna.load_study(study_name="digits", storage=f"sqlite:///{folder}/optuna.db")
        figures = study.user_attrs["teacher"]
        assert figures["params"] > 11_000_000 and figures["val_acc"] > 0.2  # it learns (chance: 0.1)
