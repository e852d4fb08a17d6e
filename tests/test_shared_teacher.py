"""One teacher per study across machines: the first host trains it and logs it to the study's MLflow teacher run;
every other host loads it from there (or from its own cache, checked against it) instead of training its own.
Hosts are simulated as working folders with caches of their own on one study store and one MLflow store."""

import os
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import torch
from helpers import fast
from mlflow import MlflowClient
from services import new_database, start_mlflow_server, start_postgres

import kdsearch.teacher
from kdsearch.cli import main
from kdsearch.shared_teacher import HEARTBEAT, STATE, TeacherRun
from kdsearch.storage import open_storage

FAST = [*fast(distill_epochs=1, teacher_epochs=2), "--set", "search.baselines=false"]


def host(tmp_path, name: str, monkeypatch, *args: str) -> tuple[int, str]:
    """`run-study ARGS` as host `name`: its own working folder and teacher cache, the study's shared stores."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    return main(["run-study", "--storage", f"journal:{tmp_path}/study.journal", "--tracking-uri",
                 f"sqlite:///{tmp_path}/mlflow.db", "--study-name", "shared", "--n-trials", "1", *FAST, *args])


def teacher_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("teacher "))


def cached_logits(tmp_path, name: str) -> torch.Tensor:
    (entry,) = (tmp_path / name / ".kdsearch-cache" / "teachers").iterdir()
    return torch.load(entry / "train_logits.pt", weights_only=True)


def test_a_second_host_loads_the_study_teacher_and_a_different_one_is_refused(tmp_path, monkeypatch, capsys):
    assert host(tmp_path, "a", monkeypatch) == 0
    assert "(trained here)" in teacher_line(capsys.readouterr().out)
    monkeypatch.setattr(kdsearch.teacher, "train_teacher", lambda *a, **k: pytest.fail("the teacher was trained again"))
    assert host(tmp_path, "b", monkeypatch) == 0
    assert "(the study's MLflow run " in teacher_line(capsys.readouterr().out)
    assert torch.equal(cached_logits(tmp_path, "a"), cached_logits(tmp_path, "b"))
    assert host(tmp_path, "b", monkeypatch) == 0  # now in b's own cache, checked against the study's
    assert "(this host's cache (the study's teacher))" in teacher_line(capsys.readouterr().out)

    (entry,) = (tmp_path / "b" / ".kdsearch-cache" / "teachers").iterdir()
    torch.save(cached_logits(tmp_path, "b") + 1, entry / "train_logits.pt")  # another machine's teacher, say
    meta = (entry / "meta.json").read_text()
    (entry / "meta.json").write_text(meta.replace('"digest"', '"old_digest"'))  # as cached before digests
    assert host(tmp_path, "b", monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from the study's teacher" in err
    assert f"delete {entry.relative_to(tmp_path / 'b')} so that" in err
    study = optuna.load_study(study_name="shared", storage=open_storage(f"journal:{tmp_path}/study.journal"))
    assert len(study.trials) == 3  # the refused host added no trial
    (entry / "train_logits.pt").write_bytes(b"damaged")  # a damaged entry is replaced by the study's
    assert host(tmp_path, "b", monkeypatch) == 0
    assert "(the study's MLflow run " in teacher_line(capsys.readouterr().out)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("shared")
    assert len(client.search_runs([exp.experiment_id], "tags.`kdsearch.role` = 'teacher'")) == 1


def test_a_cpu_host_joins_a_study_whose_teacher_trained_in_bf16(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as gpu:  # a host whose device computes bf16: the teacher key says so
        gpu.setattr(kdsearch.teacher, "uses_bf16", lambda device: True)
        assert host(tmp_path, "gpu", monkeypatch) == 0
    key = teacher_line(capsys.readouterr().out).split()[1]
    # the CPU host computes in fp32 (this machine's own CPU may have native bf16, and would key its teacher bf16 too)
    monkeypatch.setattr(kdsearch.teacher, "uses_bf16", lambda device: False)
    monkeypatch.setattr(kdsearch.teacher, "train_teacher", lambda *a, **k: pytest.fail("the teacher was trained again"))
    assert host(tmp_path, "cpu", monkeypatch) == 0
    line = teacher_line(capsys.readouterr().out)
    assert line.split()[1] == key and "(the study's MLflow run " in line  # the study's teacher, not its own
    # a CPU host that starts before the study exists (the GPU host still training its teacher) takes that teacher
    # too, not one of its own: hosts claim it by its key in fp32
    monkeypatch.chdir(tmp_path / "cpu")
    early = ["run-study", "--storage", f"journal:{tmp_path}/not-yet.journal", "--tracking-uri",
             f"sqlite:///{tmp_path}/mlflow.db", "--study-name", "shared", "--n-trials", "1", "--cache-dir", "early",
             *FAST]
    assert main(early) == 0
    line = teacher_line(capsys.readouterr().out)
    assert line.split()[1] == key and "(the study's MLflow run " in line
    # without the study's tracking store, a CPU host cannot make that teacher: refused, not trained in fp32
    monkeypatch.chdir(tmp_path / "cpu")
    args = ["run-study", "--storage", f"journal:{tmp_path}/study.journal", "--tracking-uri",
            f"sqlite:///{tmp_path}/other.db", "--study-name", "shared", "--n-trials", "1", "--cache-dir", "empty",
            *FAST]
    assert main(args) == 2
    assert "trains in another precision (bf16 on a GPU host" in capsys.readouterr().err


def test_the_oldest_live_claim_provides_the_teacher(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = client.create_experiment("claims")
    hosts = [TeacherRun(client, exp_id, "digits-abc", heartbeat_s=0.05, grace_s=60, poll_s=0.01) for _ in range(3)]
    first = hosts[0].claim()
    assert first is not None and hosts[1].claim() is None  # the second host waits
    assert [r.info.run_id for r in hosts[1].runs()] == [first]  # and its own claim is gone
    with pytest.raises(KeyboardInterrupt), hosts[0].providing(first):
        time.sleep(0.2)
        assert float(client.get_run(first).data.tags[HEARTBEAT]) > time.time() - 1  # it beats while it trains
        raise KeyboardInterrupt  # the provider is stopped: the others must not wait for it
    assert client.get_run(first).data.tags[STATE] == "abandoned" and client.get_run(first).info.status == "FAILED"
    second = hosts[1].claim()
    assert second is not None and hosts[2].claim() is None
    client.set_tag(second, HEARTBEAT, str(time.time() - 120))  # its host died without a word
    hosts[2].wait()  # returns at once: nobody live is training
    third = hosts[2].claim()
    assert third not in (None, second) and client.get_run(second).info.status == "FAILED"
    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "meta.json").write_text("{}")
    assert not hosts[1].publish(second, folder, "late", "digits-abc")  # taken over: its late teacher is not the study's
    assert hosts[2].publish(third, folder, "d1g357", "digits-abc")
    assert hosts[0].ready().info.run_id == third and hosts[0].claim() is None
    hosts[0].download(hosts[0].ready(), tmp_path / "cache" / "entry")
    assert (tmp_path / "cache" / "entry" / "meta.json").read_text() == "{}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """PostgreSQL for the Optuna study and for an `mlflow server` (artifacts served by the server)."""
    url = os.environ.get("KDSEARCH_TEST_POSTGRES")
    stop_pg = None
    if not url:
        started = start_postgres()
        if started is None:
            pytest.skip("no PostgreSQL here: install Debian's postgresql package or set KDSEARCH_TEST_POSTGRES")
        url, stop_pg = started
    optuna_db, mlflow_db = new_database(url, "kdsearch_hosts"), new_database(url, "kdsearch_hosts_mlflow")
    tracking, stop_mlflow = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), mlflow_db)
    yield optuna_db, tracking
    stop_mlflow()
    if stop_pg:
        stop_pg()


def test_two_hosts_on_real_servers_share_one_teacher_and_one_study(tmp_path, servers):
    storage, tracking = servers
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "kdsearch", "run-study", "--storage", storage, "--tracking-uri", tracking,
           "--study-name", "hosts", "--n-trials", "3", *fast(distill_epochs=1, teacher_epochs=4),
           "--set", "engine.threads=1"]
    hosts = []
    for name in ("a", "b"):  # started at the same moment: both find no teacher and no study
        (tmp_path / name).mkdir()
        hosts.append(subprocess.Popen(cmd, cwd=tmp_path / name, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in hosts]
    assert [p.returncode for p in hosts] == [0, 0], outs
    sources = sorted(teacher_line(out).split("(", 1)[1] for out in outs)
    assert sources[0].startswith("the study's MLflow run ") and sources[1].startswith("trained here"), sources

    study = optuna.load_study(study_name="hosts", storage=open_storage(storage))
    students = [tuple(sorted(t.params.items())) for t in study.trials]
    # 3 trials a host, and the baseline pair on top for the host that made the study: none repeated
    assert len(students) == len(set(students)) == 8
    assert len([t for t in study.trials if "baseline" in t.user_attrs]) == 2  # one baseline pair, enqueued once
    assert len({t.user_attrs["worker"].rsplit(":", 1)[-1] for t in study.trials}) == 2
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("hosts")
    (study_run,) = client.search_runs([exp.experiment_id], "tags.`kdsearch.role` = 'study'")
    (teacher_run,) = client.search_runs([exp.experiment_id], "tags.`kdsearch.role` = 'teacher'")
    trial_runs = client.search_runs([exp.experiment_id], "tags.`kdsearch.role` = 'trial'")
    assert len(trial_runs) == 8 and {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {study_run.info.run_id}
    assert study.user_attrs["teacher"]["mlflow_run_id"] == teacher_run.info.run_id
    assert {a.path for a in client.list_artifacts(teacher_run.info.run_id, "teacher")} >= {"teacher/teacher.pt"}
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "kdsearch", "report", "--storage", storage, "--tracking-uri", tracking,
                        "--study-name", "hosts"], cwd=tmp_path / name, env=env, check=True, capture_output=True)
    fronts = [pd.read_csv(tmp_path / name / "reports" / "hosts" / "pareto.csv") for name in ("a", "b")]
    pd.testing.assert_frame_equal(*fronts)
