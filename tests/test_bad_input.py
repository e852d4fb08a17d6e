"""Bad input: one line naming the problem and the fix, exit status 2, no traceback, nothing half-made."""

import pytest
import torch
from helpers import fast

from kdsearch import KdsearchError
from kdsearch.cli import main
from kdsearch.config import StudyConfig
from kdsearch.study_file import load_study

GOOD = '''
name = "tiny"
[data]
dataset = "digits"
[distill]
temperature = [1.0, 10.0]
'''


def run_cli(capsys, *args):
    """Exit status and stderr of `run-study ARGS`, whether main returns or argparse exits."""
    try:
        code = main(["run-study", *args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("text, expected", [
    ("name = ", "not valid TOML"),
    (GOOD + "tempreature = 3\n", "unknown key 'distill.tempreature': did you mean 'distill.temperature'?"),
    (GOOD.replace("[1.0, 10.0]", "[10.0, 1.0]"),
     "distill.temperature = [10.0, 1.0]: low is above high; write [1.0, 10.0]"),
    (GOOD.replace("[1.0, 10.0]", "3"), "distill.temperature = 3: expected a range [low, high]"),
    (GOOD.replace("[1.0, 10.0]", "[]"), "distill.temperature = []: expected a range [low, high]"),
    (GOOD.replace('"digits"', '"svhn"'), "data.dataset = 'svhn' is unknown: use one of digits, mnist"),
    (GOOD + "[search]\nsampler = \"cmaes\"\n", "search.sampler = 'cmaes' is unknown: use one of tpe, nsga2, random"),
    (GOOD + "[search]\nn_trials = \"many\"\n", "search.n_trials = 'many': expected an integer"),
    (GOOD + "[search]\nn_trials = 0\n", "search.n_trials = 0 must be above 0"),
    (GOOD + "[distil]\nepochs = 3\n", "unknown key 'distil': did you mean 'distill'?"),
    (GOOD + "[student]\nconvs_per_stage = [1.5, 2]\n",
     "student.convs_per_stage = [1.5, 2]: expected an integer or an integer range [low, high], e.g. 2 or [1, 3]"),
    (GOOD + "[student]\nconvs_per_stage = [2]\n", "student.convs_per_stage = [2]: expected an integer or an integer"),
    (GOOD + "[student]\nconvs_per_stage = [3, 1]\n", "student.convs_per_stage = [3, 1]: low is above high"),
    (GOOD + "[student]\nconvs_per_stage = [0, 2]\n", "student.convs_per_stage = 0 must be above 0"),
    (GOOD + "[search]\nheartbeat_interval = 30\ngrace_period = 30\n",
     "search.grace_period = 30 must exceed search.heartbeat_interval = 30"),
])
def test_bad_study_file(workdir, capsys, text, expected):
    (workdir / "bad.toml").write_text(text)
    code, err = run_cli(capsys, "bad.toml")
    assert code == 2
    assert expected in err and "\n" not in err and err.startswith("kdsearch: error:")
    assert list(workdir.iterdir()) == [workdir / "bad.toml"]  # no study, no MLflow store, no cache


@pytest.mark.parametrize("args, expected", [
    (["missing.toml"], "study file missing.toml not found"),
    (["nosuchstudy"], "no study file 'nosuchstudy'"),
    (["--n-trials", "0"], "argument --n-trials: '0' is not a whole number of at least 1"),
    (["--timeout", "-5"], "argument --timeout: '-5' is not a number of seconds above 0"),
    (["--set", "distill.epochs"], "write it as section.key=value"),
    (["--set", "distill.epochs=-1"], "distill.epochs = -1 must be above 0"),
])
def test_bad_command_line(workdir, capsys, args, expected):
    code, err = run_cli(capsys, *args)
    assert code == 2 and expected in err and "\n" not in err
    assert list(workdir.iterdir()) == []


def test_overrides_reach_the_config(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(GOOD)
    cfg = load_study(path, ["distill.epochs=3", "search.sampler=random", "data.data_dir='/x y'"])
    assert (cfg.distill.epochs, cfg.search.sampler, cfg.data.data_dir) == (3, "random", "/x y")
    assert cfg.distill.temperature == (1.0, 10.0) and cfg.teacher == StudyConfig().teacher


def test_shipped_studies_are_valid():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parent.parent.glob("studies/*.toml"))
    assert files
    for path in files:
        assert load_study(path).name == path.stem


def test_errors_are_our_type(tmp_path):
    with pytest.raises(KdsearchError, match="not found"):
        load_study(tmp_path / "nope.toml")


FAST = fast()


@pytest.mark.parametrize("override, expected", [
    ("search.pruner='sometimes'", "search.pruner = 'sometimes' is unknown: use one of auto, none"),
    ("teacher.arch='resnet'", "teacher.arch = 'resnet' is unknown: use 'convnet' or 'torchvision:<model>'"),
    ("search.pruner='median'", "needs one objective: use search.mode = 'budget'"),
    ("latency.dtype='float16'", "latency.dtype = 'float16': use float32 or bfloat16"),
])
def test_unknown_pruner_architecture_and_mismatched_pruner(workdir, capsys, override, expected):
    code, err = run_cli(capsys, "--set", override)
    assert code == 2 and expected in err and "\n" not in err
    assert list(workdir.iterdir()) == []


def test_latency_on_a_missing_gpu(workdir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_cli(capsys, "--set", "latency.device='cuda'")
    assert code == 2 and "latency.device = 'cuda': no CUDA device is visible here" in err and "\n" not in err
    assert list(workdir.iterdir()) == []


def test_data_folder_without_the_files(workdir, capsys):
    code, err = run_cli(capsys, "mnist", "--data-dir", str(workdir))
    assert code == 2 and "expected" in err and "MNIST/raw/train-images-idx3-ubyte" in err and "\n" not in err
    assert sorted(p.name for p in workdir.iterdir()) == []


def _checkpoint_case(workdir, kind):
    import torch

    from kdsearch.models import Architecture, build_model

    path = workdir / "teacher.pt"
    if kind == "corrupt":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "classes":
        torch.jit.script(build_model(Architecture(1, 5, 8, 2), 8)).save(str(path))
    elif kind == "shape":
        torch.jit.script(build_model(Architecture(3, 10, 8, 2), 8)).save(str(path))
    elif kind == "state_dict":
        torch.save(build_model(Architecture(1, 5, 8, 2), 8).state_dict(), path)
    elif kind == "pt2-classes":
        path = workdir / "teacher.pt2"
        torch.export.save(torch.export.export(build_model(Architecture(1, 5, 8, 2), 8).eval(),
                                              (torch.zeros(3, 1, 8, 8),)), str(path))
    elif kind == "pt2-batch":
        path = workdir / "teacher.pt2"
        torch.export.save(torch.export.export(build_model(Architecture(1, 10, 8, 2), 8).eval(),
                                              (torch.zeros(2, 1, 8, 8),)), str(path))
    return path


@pytest.mark.parametrize("kind, expected", [
    ("missing", "not found: fix teacher.checkpoint"),
    ("corrupt", "is neither a torch.export program (.pt2), TorchScript nor a state_dict"),
    ("classes", "gives (5,) outputs, the data has 10 classes"),
    ("pt2-classes", "gives (5,) outputs, the data has 10 classes"),
    ("pt2-batch", "exported with a dynamic batch size"),
    ("shape", "does not accept images of shape (1, 8, 8)"),
    ("state_dict", "is neither a torch.export program (.pt2), TorchScript nor a state_dict of the [teacher] "
                   "architecture"),
])
def test_bad_teacher_checkpoint(workdir, capsys, kind, expected):
    path = workdir / "missing.pt" if kind == "missing" else _checkpoint_case(workdir, kind)
    code, err = run_cli(capsys, *FAST, "--set", "teacher.width=8", "--set", f"teacher.checkpoint='{path}'")
    assert code == 2 and expected in err and "\n" not in err
    assert not (workdir / "optuna.db").exists() and not (workdir / ".kdsearch-cache" / "teachers").exists()


@pytest.mark.parametrize("storage, expected", [
    ("not-a-url", "is not a storage URL"),
    ("postgresql+psycopg2://nobody@127.0.0.1:1/none", "check the --storage URL and that the database server is"),
    ("journal:", "needs a file"),
])
def test_bad_storage(workdir, capsys, storage, expected):
    code, err = run_cli(capsys, *FAST, "--n-trials", "1", "--storage", storage)
    assert code == 2 and expected in err and "\n" not in err
    assert not (workdir / "optuna.db").exists()


def test_unwritable_tracking_uri(workdir, capsys):
    code, err = run_cli(capsys, *FAST, "--n-trials", "1", "--tracking-uri", "sqlite:////proc/no/mlflow.db")
    assert code == 2 and "cannot write to the MLflow tracking store" in err and "\n" not in err
    assert not (workdir / "optuna.db").exists()


def test_unreachable_tracking_server(workdir, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    code, err = run_cli(capsys, *FAST, "--n-trials", "1", "--tracking-uri", "http://127.0.0.1:1")
    assert code == 2 and "cannot write to the MLflow tracking store" in err and "\n" not in err


def test_existing_study_with_other_directions(workdir, capsys):
    assert run_cli(capsys, *FAST, "--n-trials", "1", "--set", "search.baselines=false")[0] == 0
    code, err = run_cli(capsys, *FAST, "--n-trials", "1", "--set", "search.mode='budget'",
                        "--set", "search.baselines=false")
    assert code == 2 and "exists with other objectives: pass a new --study-name" in err


def test_a_study_name_with_a_slash_and_an_abbreviated_option_are_refused(workdir, capsys):
    code, err = run_cli(capsys, "--study-name", "studies/digits.toml")
    assert code == 2 and "use a name without slashes" in err and "\n" not in err.strip()
    code, err = run_cli(capsys, "--study", "digits")  # not taken for --study-name
    assert code == 2 and "unrecognized arguments: --study" in err
    assert not (workdir / "optuna.db").exists()
