"""A database password in a storage URL is shown nowhere: not in messages, files, MLflow records or any process's
command line; workers get their stores through their environment."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import fast
from services import start_postgres

from kdsearch import KdsearchError
from kdsearch.cli import main
from kdsearch.credentials import masked
from kdsearch.storage import open_storage

SECRET = "S3cretPW-kd"


@pytest.mark.parametrize("text, shown", [
    ("postgresql+psycopg2://alice:S3cretPW@127.0.0.1:1/db", "postgresql+psycopg2://alice:***@127.0.0.1:1/db"),
    ("http://bob:pa%40ss@mlflow:5000", "http://bob:***@mlflow:5000"),
    ("cannot open 'mysql://u:p@h/d' nor 'postgresql://v:q@i/e'", "cannot open 'mysql://u:***@h/d' nor "
                                                                  "'postgresql://v:***@i/e'"),
    ("postgresql+psycopg2://alice:se/cret@127.0.0.1:1/db", "postgresql+psycopg2://alice:***@127.0.0.1:1/db"),
    ("postgresql://alice:p@ss@h/db", "postgresql://alice:***@h/db"),
    ("postgresql://alice@h/db?sslmode=require&password=s3cret", "postgresql://alice@h/db?sslmode=require&password=***"),
    ("postgresql://alice@host:5432/db", "postgresql://alice@host:5432/db"),
    ("sqlite:///optuna.db", "sqlite:///optuna.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_passwords_are_masked_and_nothing_else(text, shown):
    assert masked(text) == shown


@pytest.mark.parametrize("where", ["option", "environment"])
def test_an_unreachable_database_is_named_without_its_password(workdir, capsys, monkeypatch, where):
    url = f"postgresql+psycopg2://alice:{SECRET}@127.0.0.1:1/db"
    if where == "environment":
        monkeypatch.setenv("KDSEARCH_STORAGE", url)
    assert main(["run-study", *fast(), *(["--storage", url] if where == "option" else [])]) == 2
    out, err = capsys.readouterr()
    assert "cannot open Optuna storage 'postgresql+psycopg2://alice:***@127.0.0.1:1/db'" in err
    assert SECRET not in out + err


def command_lines() -> list[str]:
    lines = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return lines


@pytest.fixture(scope="module")
def protected_postgres():
    started = start_postgres(password=SECRET)
    if started is None:
        pytest.skip("no PostgreSQL here: install Debian's postgresql package")
    url, stop = started
    yield url
    stop()


def test_workers_on_a_password_protected_database_leak_it_nowhere(tmp_path, protected_postgres):
    url = protected_postgres
    with pytest.raises(KdsearchError, match="password authentication failed"):  # the server does ask for it
        open_storage(url.replace(SECRET, "wrong"))
    cmd = [sys.executable, "-m", "kdsearch", "run-study", "--workers", "2", "--n-trials", "3", "--study-name", "pw",
           *fast(distill_epochs=2), "--set", "search.baselines=false"]
    env = {**os.environ, "KDSEARCH_STORAGE": url}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    while proc.poll() is None:
        seen += [line for line in command_lines() if "kdsearch" in line]
        time.sleep(0.2)
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    assert any("--until-complete" in line for line in seen), "no worker was seen running"
    assert not [line for line in seen if SECRET in line], "a command line held the password"
    assert SECRET not in out
    for path in tmp_path.rglob("*"):  # optuna.db (none: the study is on the server), mlflow.db, mlruns/, reports/
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    study = optuna.load_study(study_name="pw", storage=open_storage(url))
    records = [study.user_attrs] + [[t.user_attrs, t.system_attrs, t.params] for t in study.trials]
    assert SECRET not in json.dumps(records, default=str)
    # exactly: two workers whose trials end at the same moment may each ask for one more, and the later is pruned
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 3
