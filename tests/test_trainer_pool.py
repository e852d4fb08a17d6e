"""Students trained in forked processes (`engine.parallel_trials`): the same students as in one process, every
epoch seen by the parent, and a pruned, failed or killed trial that leaves the pool usable."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from helpers import fast
from mlflow import MlflowClient

from kdsearch.config import DataConfig
from kdsearch.data import load_dataset
from kdsearch.distill import DivergedError, Normalizer, TrainSettings
from kdsearch.engine import PhaseTimer
from kdsearch.execution import InProcess, Workload, processes_for
from kdsearch.models import convnet
from kdsearch.study_file import load_study
from kdsearch.trainer_pool import TrainerPool

State = optuna.trial.TrialState
DIGITS = Path(__file__).resolve().parents[1] / "studies" / "digits.toml"


@pytest.fixture(scope="module")
def ctx():
    data = load_dataset(DataConfig(), seed=0)
    logits = torch.randn(len(data.train), 10, generator=torch.Generator().manual_seed(0)) * 3
    return SimpleNamespace(cfg=load_study(DIGITS), data=data, normalize=Normalizer(data.mean, data.std, "cpu"),
                           teacher=SimpleNamespace(targets=lambda augment: logits))


def test_a_backward_pass_here_does_not_stop_the_processes_training(ctx):
    """torch refuses autograd in a process forked after a backward pass (the teacher's): the pool's processes
    come from a fork server."""
    loss = student()(torch.zeros(2, 1, 8, 8)).sum()
    loss.backward()
    pool = TrainerPool(Workload.of(ctx), size=1)
    try:
        assert pool.train(student(), SETTINGS, lambda *a: None, PhaseTimer(torch.device("cpu"))) > 0.5
    finally:
        pool.close()


@pytest.fixture
def pool(ctx):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainers train
    pool = TrainerPool(Workload.of(ctx), size=1)
    yield pool
    pool.close()
    torch.set_num_threads(threads)


def student(seed=0):
    torch.manual_seed(seed)
    return convnet((1, 8, 8), 10, base_width=8, width=1.0, depth=2).to(memory_format=torch.channels_last)


SETTINGS = TrainSettings(epochs=3, lr=0.05, batch_size=64, temperature=4.0, alpha=0.5, seed=3)


def recorder():
    seen = []

    def on_epoch(epoch, loss, val_acc):
        seen.append((epoch, loss, val_acc))
    return seen, on_epoch


def test_a_pooled_student_is_the_student_trained_here(ctx, pool):
    here, pooled = student(), student()
    seen_here, on_epoch_here = recorder()
    seen_pooled, on_epoch_pooled = recorder()
    val_here = InProcess(Workload.of(ctx)).train(here, SETTINGS, on_epoch_here, PhaseTimer(torch.device("cpu")))
    timer = PhaseTimer(torch.device("cpu"))
    started = time.perf_counter()
    with timer("train"):
        val_pooled = pool.train(pooled, SETTINGS, on_epoch_pooled, timer)
    wall = time.perf_counter() - started
    assert val_pooled == val_here and seen_pooled == seen_here and [e for e, _, _ in seen_here] == [1, 2, 3]
    for name, tensor in here.state_dict().items():
        assert torch.equal(pooled.state_dict()[name], tensor), name
    # the pool's evaluation seconds are taken out of the phase they ran in: the phases add up to no more than the
    # wall time around them (were they counted twice, they would exceed it by the evaluation's seconds)
    assert timer.seconds["evaluate"] > 0 and timer.seconds["train"] > 0
    assert timer.seconds["train"] + timer.seconds["evaluate"] <= wall + 1e-9


class Pruned(Exception):
    pass


def test_a_stopped_or_failed_trial_leaves_its_process_ready_for_the_next(ctx, pool):
    def stop_after_first(epoch, loss, val_acc):
        raise Pruned(f"epoch {epoch}")

    for _ in range(3):  # a process that never came back would block the fourth call for ever
        with pytest.raises(Pruned, match="epoch 1"):
            pool.train(student(), SETTINGS, stop_after_first, PhaseTimer(torch.device("cpu")))
    diverging = TrainSettings(epochs=2, lr=1e9, batch_size=64, alpha=0.5, temperature=4.0)
    with pytest.raises(DivergedError, match="training loss became"):  # the trial's fail_reason names the type
        pool.train(student(), diverging, lambda *a: None, PhaseTimer(torch.device("cpu")))
    seen, on_epoch = recorder()
    assert pool.train(student(), SETTINGS, on_epoch, PhaseTimer(torch.device("cpu"))) > 0.5
    assert len(seen) == 3


def test_a_killed_process_fails_its_trial_and_the_next_trains_here(ctx, pool):
    def kill_it(epoch, loss, val_acc):
        for proc in pool._procs:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()

    with pytest.raises(RuntimeError, match="the process training this student died"):
        pool.train(student(), SETTINGS, kill_it, PhaseTimer(torch.device("cpu")))
    seen, on_epoch = recorder()
    assert pool.train(student(), SETTINGS, on_epoch, PhaseTimer(torch.device("cpu"))) > 0.5
    assert len(seen) == 3


def test_processes_per_session():
    cfg = load_study(DIGITS)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cores = len(os.sched_getaffinity(0))
    engine = cfg.engine.__class__
    assert processes_for(cfg, cpu, 20) == min(cores, 8)
    assert processes_for(cfg.replace(engine=engine(parallel_trials=1, threads=4)), cpu, 20) == 1
    assert processes_for(cfg.replace(engine=engine(threads=3)), cpu, 20) == 3
    assert processes_for(cfg.replace(engine=engine(parallel_trials=3)), cpu, 1) == 1
    assert processes_for(cfg.replace(engine=engine(parallel_trials=3)), cuda, 20) == 1


class Reveal(torch.nn.Module):
    """A model whose forward pass tells which process runs it."""

    def forward(self, x):
        raise RuntimeError(f"pid {os.getpid()}")


def test_latency_is_timed_in_the_timing_process_not_beside_the_trial_threads(pool):
    from kdsearch.config import LatencyConfig

    with pytest.raises(RuntimeError, match=r"pid \d+") as raised:
        pool.time_latency(Reveal(), (1, 8, 8), LatencyConfig(min_run_time=0.01))
    assert str(raised.value) != f"pid {os.getpid()}"
    latency = pool.time_latency(student(), (1, 8, 8), LatencyConfig(min_run_time=0.01))
    assert latency.median_ms > 0 and latency.threads == 1
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()}$"):  # several threads: timed here (see the docstring)
        pool.time_latency(Reveal(), (1, 8, 8), LatencyConfig(min_run_time=0.01, threads=2))


def test_a_student_that_cannot_be_pickled_trains_here(ctx, pool):
    class Local(torch.nn.Module):  # defined in a function, as a user's builder may: pickle cannot name it
        def __init__(self):
            super().__init__()
            self.net = student()

        def forward(self, x):
            return self.net(x)

    seen, on_epoch = recorder()
    assert pool.train(Local(), SETTINGS, on_epoch, PhaseTimer(torch.device("cpu"))) > 0.5 and len(seen) == 3


def test_a_fresh_process_is_started_only_where_it_would_not_run_a_script_again(monkeypatch):
    from kdsearch.trainer_pool import _main_is_importable

    script = SimpleNamespace(__file__="/home/me/study.py", __spec__=None)
    package = SimpleNamespace(__file__="/x/kdsearch/__main__.py", __spec__=SimpleNamespace(name="kdsearch.__main__"))
    for main, importable in ((script, False), (package, True), (SimpleNamespace(), True)):  # the last: a notebook
        monkeypatch.setitem(sys.modules, "__main__", main)
        assert _main_is_importable() is importable


def test_a_study_runs_from_a_thread_and_with_several_training_threads_asked_for(workdir):
    """From a thread (a notebook's or a job runner's) no SIGINT handler can be set; and however many threads
    `engine.threads` offers, each process trains with one (a forked process using several OpenMP threads hung)."""
    import threading

    from kdsearch.cli import main

    codes = []
    args = ["--n-trials", "2", *fast(distill_epochs=2), "--set", "engine.parallel_trials=2",
            "--set", "engine.threads=4"]
    thread = threading.Thread(target=lambda: codes.append(main(["run-study", *args])))
    thread.start()
    thread.join(timeout=300)
    assert codes == [0]
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    assert [t.state for t in study.trials] == [State.COMPLETE] * 4  # the two baselines, then 2 trials


def test_ctrl_c_stops_parallel_trials_as_interrupted_and_the_study_resumes(workdir):
    """SIGINT to the process group, as a terminal's Ctrl-C sends it, while two trials train in two processes."""
    args = ["--n-trials", "4", *fast(distill_epochs=150), "--set", "engine.parallel_trials=2"]
    proc = subprocess.Popen([sys.executable, "-m", "kdsearch", "run-study", *args], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    storage = f"sqlite:///{workdir}/optuna.db"
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name="digits", storage=storage).trials
        except Exception:  # noqa: BLE001 - not made yet
            continue
        if sum("mlflow_run_id" in t.user_attrs for t in trials) >= 2:
            break
    time.sleep(0.5)  # both training (a trial takes several seconds)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Run the same command again to resume" in err, err
    study = optuna.load_study(study_name="digits", storage=storage)
    states = [t.state for t in study.trials]
    assert states == [State.FAIL, State.FAIL], (states, out, err)  # the two trials under way, nothing RUNNING
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    for t in study.trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["kdsearch.reason"] == "interrupted (Ctrl-C)"
    assert client.get_run(study.user_attrs["mlflow_run_id"]).info.status == "KILLED"

    resumed = subprocess.run([sys.executable, "-m", "kdsearch", "run-study", *args[:1], "2", *args[2:]],
                             cwd=workdir, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    trials = optuna.load_study(study_name="digits", storage=storage).trials
    assert [t.state for t in trials] == [State.FAIL, State.FAIL] + [State.COMPLETE] * 4
    # the two interrupted trials were the baselines: queued again on top of the 2 trials, so the KD gain has its pair
    again = [(t.user_attrs["baseline"], t.params) for t in trials[2:4]]
    assert sorted(again, key=str) == sorted([(t.user_attrs["baseline"], t.params) for t in trials[:2]], key=str)


def test_parallel_trials_each_train_once_and_are_recorded_like_sequential_ones(workdir, capsys):
    """Two trials at a time in this process's threads: the enqueued baselines are taken by one thread each (on
    SQLite two threads could both take one), and every trial has one finished MLflow run with its epochs."""
    from kdsearch.cli import main

    # the two baselines, then two trials
    assert main(["run-study", "--n-trials", "2", *fast(distill_epochs=3), "--set", "engine.parallel_trials=2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert sorted(int(line.split()[1]) for line in lines) == [0, 1, 2, 3]
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    assert [t.state for t in study.trials] == [State.COMPLETE] * 4
    assert sorted(t.user_attrs.get("baseline", "") for t in study.trials)[-2:] == ["kd", "no-kd"]
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("digits")
    runs = client.search_runs([exp.experiment_id], "tags.`kdsearch.role` = 'trial'")
    assert sorted(r.data.tags["optuna.trial_number"] for r in runs) == ["0", "1", "2", "3"]
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == [1, 2, 3]  # every epoch, written in batches


def test_an_image_folder_streamed_from_disk_trains_in_the_main_process(workdir):
    """Streamed images come from DataLoader workers, which a pooled process may not start: such a study trains its
    trials in the main process, whatever engine.parallel_trials says."""
    from test_own_data import images

    from kdsearch.cli import main

    images(workdir / "pics", per_class=12)
    args = ["--set", "data.dataset='imagefolder'", "--set", f"data.data_dir='{workdir / 'pics'}'",
            "--set", "data.image_size=8", "--set", "data.memory_gb=1e-9", "--set", "search.baselines=false",
            "--set", "engine.parallel_trials=2", "--n-trials", "2", *fast()]
    assert main(["run-study", *args]) == 0
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db")
    assert [t.state for t in study.trials] == [State.COMPLETE] * 2


def test_a_trial_keeps_its_own_seeded_sampler_while_another_begins():
    """Parallel trials interleave: trial 0 draws the same values whether or not trial 1 began in the meantime."""
    from kdsearch.study import make_sampler

    def first_draws(interleaved: bool) -> list[float]:
        study = optuna.create_study(sampler=make_sampler(load_study(DIGITS)))
        first = study.ask()
        if interleaved:
            study.ask().suggest_float("x", 0.0, 1.0)
        return [first.suggest_float("x", 0.0, 1.0), first.suggest_float("y", 0.0, 1.0)]

    assert first_draws(True) == first_draws(False)


def test_ctrl_c_stops_a_student_trained_here_after_its_epoch(ctx, pool):
    class Local(torch.nn.Module):  # cannot be pickled, so it trains in this process
        def __init__(self):
            super().__init__()
            self.net = student()

        def forward(self, x):
            return self.net(x)

    seen = []

    def on_epoch(epoch, loss, val_acc):
        seen.append(epoch)
        pool.close()  # what Ctrl-C does

    with pytest.raises(KeyboardInterrupt):
        pool.train(Local(), SETTINGS, on_epoch, PhaseTimer(torch.device("cpu")))
    assert seen == [1]


def test_students_built_in_parallel_threads_get_the_weights_of_their_seeds():
    import threading

    from kdsearch.models import StudentSpec
    from kdsearch.trial import seeded_student

    spec = StudentSpec("convnet", (1, 8, 8), 10, {"base_width": 8, "width": 1.0, "depth": 2})
    expected = {seed: seeded_student(spec, seed).state_dict() for seed in range(40)}
    wrong = []

    def build(seeds):
        for seed in seeds:
            state = seeded_student(spec, seed).state_dict()
            wrong.extend(seed for k, v in state.items() if not torch.equal(v, expected[seed][k]))

    threads = [threading.Thread(target=build, args=(range(i, 40, 2),)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_ctrl_c_waits_for_the_trials_to_end_before_the_study_stops(monkeypatch):
    """Ctrl-C reaches the main thread while it waits for the trial threads: it waits again until each trial has
    ended (recorded), however the interrupted wait left the threads (CPython gh-90882: an interrupted
    Thread.join marked a running thread ended, and its trial stayed RUNNING)."""
    import threading

    from kdsearch import scheduling

    ended, first_started = [], threading.Event()
    main_thread = threading.main_thread().ident

    def slow_objective(ctx, trial):  # still ending its trial when the Ctrl-C arrives; the first thread longest
        first = threading.current_thread().name.endswith("-0")
        if first:
            first_started.set()
        else:  # both trials are under way and the main thread waits for them: Ctrl-C then, not after a set delay
            first_started.wait(10)
            time.sleep(0.2)
            signal.pthread_kill(main_thread, signal.SIGINT)
        time.sleep(2.5 if first else 1.0)
        ended.append(trial.number)
        raise KeyboardInterrupt

    monkeypatch.setattr(scheduling, "objective", slow_objective)
    study = optuna.create_study(directions=["maximize"])
    cfg = SimpleNamespace(search=SimpleNamespace(timeout=0))
    session = SimpleNamespace(study=study, ctx=SimpleNamespace(cfg=cfg, executor=InProcess()))
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever an earlier test left
    try:
        with pytest.raises(KeyboardInterrupt):
            scheduling.run_trials(session, 2, [], SimpleNamespace(reason=None), 2)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert sorted(ended) == [0, 1]
    assert [t.state for t in study.trials] == [State.FAIL, State.FAIL]


def test_a_pool_that_cannot_start_says_why_and_trains_here(ctx, monkeypatch, capsys):
    import multiprocessing.context as contexts

    def refuse(self):
        raise OSError("no more processes")

    for kind in ("ForkProcess", "ForkServerProcess"):
        monkeypatch.setattr(getattr(contexts, kind), "start", refuse)
    pool = TrainerPool(Workload.of(ctx), size=2)
    try:
        out = capsys.readouterr().out
        assert "its training processes could not start (forkserver: OSError: no more processes)" in out
        assert pool.size == 1  # one trial at a time, trained here
        assert pool.train(student(), SETTINGS, lambda *a: None, PhaseTimer(torch.device("cpu"))) > 0.5
    finally:
        pool.close()
