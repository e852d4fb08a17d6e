"""Latency in the runtime a student is deployed with: ONNX Runtime over the graph `export` writes, checked against
PyTorch first, recorded with its settings everywhere a figure is shown."""

import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from helpers import fast, study_in_new_folder
from torch import nn

from kdsearch import KdsearchError
from kdsearch.cli import main
from kdsearch.config import LatencyConfig, StudyConfig
from kdsearch.measure import measure_latency, time_forward
from kdsearch.models import Architecture, build_model
from kdsearch.onnx_graph import deployed_graph, mismatch, to_onnx


def scale(weight: float) -> nn.Module:
    """y = weight * x for a 1x1x1 image: outputs worked out by hand."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 1, bias=False))
    model[1].weight.data.fill_(weight)
    return model.eval()


def test_the_graph_must_match_pytorch_within_the_stated_tolerance():
    """At x = 1 PyTorch's output is 2.0; the tolerance there is 1e-4 + 1e-3 * 2 = 0.0021. A graph of weight 2.001
    is off by 0.001 (0.476 of the tolerance: accepted), one of weight 2.01 by 0.01 (4.76: refused)."""
    one = torch.ones(1, 1, 1, 1)
    graph = lambda w: to_onnx(scale(w), one)  # noqa: E731
    assert mismatch(graph(2.0), scale(2.0), one) == 0
    assert mismatch(graph(2.001), scale(2.0), one) == pytest.approx(0.001 / 0.0021, rel=1e-3)
    assert mismatch(graph(2.01), scale(2.0), one) == pytest.approx(0.01 / 0.0021, rel=1e-3)


def test_a_graph_whose_outputs_are_nan_is_refused():
    with pytest.raises(KdsearchError, match="does not match PyTorch"):
        deployed_graph(scale(float("nan")), (1, 1, 1), "the student")


def test_a_graph_that_does_not_match_is_refused_naming_the_fix(monkeypatch):
    import kdsearch.onnx_graph as onnx_graph

    monkeypatch.setattr(onnx_graph, "to_onnx", lambda model, example: to_onnx(scale(2.01), example))
    with pytest.raises(KdsearchError, match=r"the student's ONNX graph does not match PyTorch .* set latency.runtime"):
        deployed_graph(scale(2.0), (1, 1, 1), "the student")


@pytest.mark.parametrize("family, knobs", [
    ("convnet", {"base_width": 6, "width": 1.0, "depth": 2, "convs_per_stage": 2}),
    ("separable", {"base_width": 4, "width": 1.0, "depth": 2, "blocks": 2, "expand": 2}),  # residual blocks
    ("resnet", {"base_width": 4, "width": 1.0, "blocks": 1}),
])
def test_each_built_in_family_is_exported_by_tracing_with_a_free_batch_size(family, knobs):
    """kdsearch's own families take the tracing exporter (TorchScript's; torch.export for anything else): the graph
    runs any batch size and matches PyTorch, the max-pool's inference shortcut included (batches of 64 and more)."""
    from kdsearch import onnx_graph
    from kdsearch.models import StudentSpec, build_student

    student = build_student(StudentSpec(family, (1, 8, 8), 10, knobs)).eval()
    assert onnx_graph._built_in(onnx_graph.Deployable(student, [0.5], [0.25]))
    assert not onnx_graph._built_in(scale(1.0))
    graph = deployed_graph(student, (1, 8, 8), "the student", ([0.5], [0.25]))
    model = onnx_graph.Deployable(student, [0.5], [0.25]).eval()
    for batch in (1, 5, 64):
        x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch)) * 255
        assert mismatch(graph, model, x.contiguous(memory_format=torch.channels_last)) <= 1


def test_onnx_runtime_is_the_default_and_says_what_it_timed():
    import onnxruntime

    lat = measure_latency(build_model(Architecture(1, 10, 4, 2), 8), (1, 8, 8), LatencyConfig(min_run_time=0.05))
    assert (lat.runtime, lat.runtime_version) == ("onnxruntime", onnxruntime.__version__)
    assert (lat.device, lat.threads, lat.batch_size, lat.dtype) == ("cpu", 1, 1, "float32")
    eager = measure_latency(build_model(Architecture(1, 10, 4, 2), 8), (1, 8, 8),
                            LatencyConfig(min_run_time=0.05, runtime="torch"))
    assert (eager.runtime, eager.runtime_version) == ("torch", torch.__version__)


@pytest.mark.parametrize("setting, message", [
    ("latency.runtime='tvm'", "latency.runtime = 'tvm' is unknown: use one of onnxruntime, torch"),
    ("latency.dtype='bfloat16'", "set latency.runtime = 'torch' to time other dtypes"),
])
def test_a_runtime_it_cannot_use_is_one_line(workdir, capsys, setting, message):
    assert main(["run-study", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_study_made_before_runtimes_resumes_timed_in_eager_pytorch():
    """Its stored config has no latency.runtime and was made with channel counts rounded to 8."""
    from kdsearch.study import _comparable, _older_defaults_filled, as_it_was_made

    cfg = StudyConfig()
    made = _comparable(cfg.replace(student=cfg.student.__class__(channel_multiple=8)))
    del made["latency"]["runtime"]
    resumed = as_it_was_made(cfg, made)
    assert (resumed.latency.runtime, resumed.student.channel_multiple) == ("torch", 8)
    assert _older_defaults_filled(made) == _comparable(resumed)


def test_a_builder_onnx_cannot_export_fails_its_trials_with_the_reason_and_the_fix(workdir, capsys):
    args = ["run-study", *fast(), "--n-trials", "3", "--set", "student.arch='own_students:data_dependent'",
            "--set", "student.custom.hidden=[4, 16]", "--set", "search.baselines=false"]
    assert main(args) == 2  # three trials failed the same way: the study stops, saying why
    out, err = capsys.readouterr()
    reason = "cannot be exported to ONNX for latency timing"
    assert out.count(reason) == 3 and "FAIL: the own_students:data_dependent student cannot" in out
    assert "set latency.runtime = 'torch'" in out and "data-dependent" in out
    assert reason in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    assert all(reason in t.user_attrs["fail_reason"] for t in study.trials)
    from mlflow import MlflowClient  # and each failed trial has a FAILED run that says why

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = [client.get_run(t.user_attrs["mlflow_run_id"]) for t in study.trials]
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all(reason in r.data.tags["kdsearch.reason"] and r.data.params["hidden"] for r in runs)
    # timed in eager PyTorch instead, as the message says, the same builder trains
    assert main([*args, "--study-name", "eager", "--n-trials", "1", "--set", "latency.runtime='torch'"]) == 0


def own_timing_ms(path, input_shape: tuple[int, ...]) -> float:
    """student.onnx timed here without kdsearch: one thread, all graph optimisations, warm-up, the median of 15
    blocks of 200 runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": np.random.default_rng(0).uniform(0, 255, (1, *input_shape)).astype(np.float32)}
    for _ in range(200):
        session.run(None, feed)
    blocks = []
    for _ in range(15):
        start = time.perf_counter()
        for _ in range(200):
            session.run(None, feed)
        blocks.append((time.perf_counter() - start) / 200 * 1e3)
    return statistics.median(blocks)


BAND = 2.5  # see the test below
EAGER = LatencyConfig(runtime="torch", min_run_time=0.2)


def quiet_timing_ms(path, input_shape: tuple[int, ...], trial) -> float:
    """The own timing nearest the trial's figure, of up to six taken a second apart, stopping at the first within
    the band of it. This host's speed drifts for seconds at a time (one graph read 0.047 ms and 0.080 ms in
    successive timings, no other work running), so one timing can fall in a slow spell that the trial's missed."""
    import subprocess
    import sys

    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_latency_runtime import own_timing_ms; print(own_timing_ms({str(path)!r}, {input_shape!r}))")
    timings = []
    for _ in range(6):  # in a process of its own: torch's threads in this one may still spin after the export
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        timings.append(float(done.stdout.strip().splitlines()[-1]))
        if 1 / BAND <= trial.user_attrs["latency_ms"] / timings[-1] <= BAND:
            break
        time.sleep(1)
    return min(timings, key=lambda ms: abs(math.log(trial.user_attrs["latency_ms"] / ms)))


def graph_layers(graph) -> list[tuple]:
    """An ONNX graph's operators in order, each with its attributes (strides, pads, groups; a tensor's shape only)
    and its initializers' shapes: what timing it costs, not its weights. Identity nodes are read through: the
    exporter's optimiser shares an untrained model's equal tensors (BatchNorm's ones and zeros) between layers
    through them, and ONNX Runtime removes them."""
    import onnx

    def attribute(a):
        value = onnx.helper.get_attribute_value(a)
        return a.name, tuple(value.dims) if a.type == onnx.AttributeProto.TENSOR else repr(value)

    model = onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(str(graph))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    layers = []
    for n in model.graph.node:
        if n.op_type == "Identity":
            shapes[n.output[0]] = shapes.get(n.input[0])
        else:
            attrs = tuple(sorted(attribute(a) for a in n.attribute))
            layers.append((n.op_type, tuple(shapes.get(i) for i in n.input), attrs))
    return layers


@pytest.fixture(scope="module")
def families_study(tmp_path_factory):
    """The digits families study with its defaults' runtime: its six baselines, a complete pair per family."""
    args = ["digits-families", *fast(), "--n-trials", "6", "--set", "latency.min_run_time=0.5"]
    with study_in_new_folder(tmp_path_factory, "families", args) as folder:
        yield folder


def test_each_family_exported_and_timed_independently_matches_its_trial(families_study):
    """The study's latency is what the deployed student.onnx costs. Exactly: the graph a trial's architecture is
    timed as has the exported file's operators, their attributes and tensor shapes. As timed: here on its own,
    the exported file of one student per family reads nearer the trial's figure than eager PyTorch does, and
    within 2.5x of it. Not tighter: this host's speed drifts between timings (three runs of the study: a
    convnet's trial 0.0093-0.0134 ms, its own timings 0.0109-0.0155 ms; CI runs read a resnet's trial at 1.41x
    and a separable's at 1.65x the nearest of six own timings taken after it). Eager PyTorch costs 6x (convnet),
    15x (resnet) and 38x (separable) the ONNX graph of these students."""
    from kdsearch.models import StudentSpec, build_student

    study = optuna.load_study(study_name="digits-families", storage=f"sqlite:///{families_study}/optuna.db")
    assert study.user_attrs["latency"]["runtime"] == "onnxruntime"
    per_family = {}
    for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        per_family.setdefault(t.user_attrs["family"], t)
    assert sorted(per_family) == ["convnet", "resnet", "separable"]
    data = study.user_attrs["data"]
    for family, trial in per_family.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(families_study)
            assert main(["export", "--study-name", "digits-families", "--trial", str(trial.number)]) == 0
        out = families_study / "exports" / "digits-families" / f"trial-{trial.number}"
        card = json.loads((out / "card.json").read_text())
        assert card["latency"]["runtime"] == "onnxruntime" and card["latency"]["threads"] == 1
        untrained = build_student(StudentSpec.from_dict(card["architecture"]))
        timed = deployed_graph(untrained, (1, 8, 8), "the student", (data["mean"], data["std"]))
        assert graph_layers(timed) == graph_layers(out / "student.onnx"), family
        ratio = trial.user_attrs["latency_ms"] / quiet_timing_ms(out / "student.onnx", (1, 8, 8), trial)
        eager = trial.user_attrs["latency_ms"] / time_forward(untrained, (1, 8, 8), EAGER).median_ms
        ours = trial.user_attrs["latency_ms"] / ratio
        print(f"{family}: trial {trial.user_attrs['latency_ms']:.4f} ms, own timing {ours:.4f} ms ({ratio:.2f}x), "
              f"eager PyTorch {trial.user_attrs['latency_ms'] / eager:.4f} ms")
        assert abs(math.log(ratio)) < abs(math.log(eager)), f"{family}: the trial's figure is eager PyTorch's"
        assert 1 / BAND <= ratio <= BAND, f"{family}: the trial's latency is {ratio:.2f}x the exported graph's"


def test_the_runtime_is_named_on_every_record_of_a_figure(families_study):
    import pandas as pd
    from mlflow import MlflowClient

    study = optuna.load_study(study_name="digits-families", storage=f"sqlite:///{families_study}/optuna.db")
    front = pd.read_csv(families_study / "reports" / "digits-families" / "pareto.csv")
    assert set(front["latency_runtime"]) == {"onnxruntime"} and set(front["latency_threads"]) == {1}
    assert set(front["latency_batch_size"]) == {1} and set(front["latency_dtype"]) == {"float32"}
    html = (families_study / "reports" / "digits-families" / "pareto.html").read_text()
    assert "latency (ms): onnxruntime" in html
    client = MlflowClient(f"sqlite:///{families_study}/mlflow.db")
    params = client.get_run(study.trials[0].user_attrs["mlflow_run_id"]).data.params
    assert params["latency_runtime"] == "onnxruntime" and params["latency_runtime_version"]


def test_a_study_whose_students_are_all_slower_than_its_teacher_says_why(tmp_path, capsys):
    from kdsearch.report import report_study

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("teacher", {"val_acc": 0.99, "params": 100_000, "latency_ms": 0.1})
    for params, latency in ((1_000, 0.2), (200_000, 0.05)):
        attrs = {"params": params, "latency_ms": latency, "test_acc": 0.9}
        study.add_trial(optuna.trial.create_trial(values=[0.9, params, latency], user_attrs=attrs))
    report_study(study, tmp_path)
    out = capsys.readouterr().out
    assert "hypervolume 0.0000" in out
    assert ("hypervolume 0: no student is both smaller and faster than the teacher (1 of 2 as slow or slower than "
            "its 0.1 ms, the fastest 0.05 ms; 1 as large or larger)") in out


def test_a_torchscript_teacher_checkpoint_is_timed_in_onnx_runtime(workdir, capsys):
    """torch.export cannot trace TorchScript: the TorchScript-based exporter makes its graph."""
    torch.manual_seed(0)
    torch.jit.script(build_model(Architecture(1, 10, 8, 2, 2), 8)).save(str(workdir / "teacher.ts"))
    checkpoint = f"teacher.checkpoint='{workdir / 'teacher.ts'}'"
    assert main(["run-study", *fast(), "--n-trials", "1", "--set", checkpoint]) == 0
    assert "latency: timed in onnxruntime" in capsys.readouterr().out
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    assert study.user_attrs["teacher"]["latency_ms"] > 0 and study.user_attrs["latency"]["runtime"] == "onnxruntime"


def test_a_host_that_would_time_in_another_runtime_is_refused(workdir, capsys, monkeypatch):
    """A CUDA host without ORT's CUDA provider times eager PyTorch: it must not add those figures to a study timed in
    ONNX Runtime (one study, one latency axis)."""
    import kdsearch.session

    assert main(["run-study", *fast(), "--n-trials", "1"]) == 0
    monkeypatch.setattr(kdsearch.session, "runtime_of", lambda cfg: ("torch", "no CUDAExecutionProvider"))
    assert main(["run-study", *fast(), "--n-trials", "1"]) == 2
    assert ("study 'digits' times latency in onnxruntime, and this host would time it in torch (no "
            "CUDAExecutionProvider)") in capsys.readouterr().err
