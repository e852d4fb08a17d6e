"""kdsearch against the script a user would write by hand for the same study, end to end, one job at a time.

    python benchmarks/bench_vs_glue.py                                  # digits, 20 trials, seeds 0-4
    python benchmarks/bench_vs_glue.py --study mnist --data-dir ../shared/data --n-trials 4 --seeds 0 \\
        --set distill.epochs=8

The hand-written script (`glue` below, run as its own process, as a user would run theirs) is Optuna's
multi-objective example (the objective returns val_acc, params and latency_ms; `study.best_trials` is the front)
with `MLflowCallback` for tracking and a torch DataLoader loop that runs the teacher on every batch. It is fair:
same data split, same student networks (`kdsearch.models.convnet`) and search space, TPE seeded alike, same epochs,
batch size, optimiser (SGD with Nesterov momentum, cosine decay per step) and KD loss; the teacher is trained once
(read from a file in the cached arm); the script writes its channel counts as integers (no rounding), as a user
would. Optuna cannot prune a multi-objective study, so the script trains every trial to the end.

Four arms per seed, each a fresh process in an empty folder, timed end to end (imports included): the script and
`kdsearch run-study`, each with its teacher trained afresh and with it cached. Both arms are scored on the same
latency figures: every architecture either arm trained is timed once here, as kdsearch times its students. Both
fronts' hypervolumes use the one definition (`kdsearch.scores.hypervolume`) with the study teacher's parameters
and latency (timed here once) as reference, and again with latency left out (accuracy against parameters). For
kdsearch, the wall time from its start until its hypervolume history first reaches the script's final hypervolume.
The gaps to the script are paired by seed, and given again with kdsearch's front scored without its baseline pair
(the sampler's own picks, as many as the script's trials).

To compare several kdsearch settings against one set of script runs, save the script's runs and read them back:

    python benchmarks/bench_vs_glue.py --arms "glue fresh" --save script.json
    python benchmarks/bench_vs_glue.py --arms "kdsearch fresh" --script-from script.json \\
        --set student.channel_multiple=1

(the saved file keeps each seed's script front and every latency figure, so both arms stay on the same figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("glue fresh", "glue cached", "kdsearch fresh", "kdsearch cached")


def glue(study_file: str, overrides: list[str], n_trials: int, teacher_file: str, out: str) -> None:
    """The hand-written study. Writes the complete trials' (val_acc, params, latency_ms) to `out`."""
    import optuna
    import torch
    import torch.nn.functional as F
    from optuna.integration.mlflow import MLflowCallback
    from torch.utils import benchmark
    from torch.utils.data import DataLoader, TensorDataset

    from kdsearch.data import load_dataset
    from kdsearch.models import Architecture, build_model, convnet
    from kdsearch.study_file import load_study

    cfg = load_study(study_file, overrides)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed)
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)

    def loader(split, shuffle, batch_size):
        x = (split.x.float() / 255 - mean) / std
        return DataLoader(TensorDataset(x, split.y), batch_size=batch_size, shuffle=shuffle, drop_last=shuffle)

    val = loader(data.val, False, 512)

    def fit(model, epochs, lr, batch_size, wd, teacher=None, T=1.0, alpha=0.0):
        train = loader(data.train, True, batch_size)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
        total = epochs * len(train)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        for _ in range(epochs):
            model.train()
            for x, y in train:
                out = model(x)
                loss = F.cross_entropy(out, y)
                if teacher is not None and alpha > 0:
                    with torch.no_grad():
                        t = teacher(x)
                    soft = F.kl_div(F.log_softmax(out / T, 1), F.softmax(t / T, 1), reduction="batchmean")
                    loss = alpha * T * T * soft + (1 - alpha) * loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            return sum((model(x).argmax(1) == y).sum().item() for x, y in val) / len(data.val)

    t = cfg.teacher
    teacher = build_model(Architecture(data.input_shape[0], data.num_classes, t.width, t.depth, t.convs_per_stage),
                          data.input_shape[1])
    if os.path.exists(teacher_file):
        teacher.load_state_dict(torch.load(teacher_file))
    else:
        fit(teacher, t.epochs, t.lr, t.batch_size, t.weight_decay)
        torch.save(teacher.state_dict(), teacher_file)
    teacher.eval()

    span = []  # when the first trial started and the last one ended

    def objective(trial):
        span[:] = [span[0] if span else time.time()]
        s, d = cfg.student, cfg.distill
        width = trial.suggest_float("width", *s.width, log=True)
        depth = trial.suggest_int("depth", *s.depth)
        T = trial.suggest_float("temperature", *d.temperature, log=True)
        alpha = trial.suggest_float("alpha", *d.alpha)
        lr = trial.suggest_float("lr", *d.lr, log=True)
        model = convnet(data.input_shape, data.num_classes, base_width=s.base_width, width=width, depth=depth,
                        convs_per_stage=s.convs_per_stage)  # integer channels, as a user writes it
        val_acc = fit(model, d.epochs, lr, d.batch_size, d.weight_decay, teacher, T, alpha)
        x = torch.randn(cfg.latency.batch_size, *data.input_shape)
        with torch.inference_mode():
            timer = benchmark.Timer("model(x)", globals={"model": model, "x": x}, num_threads=cfg.latency.threads)
            latency_ms = timer.blocked_autorange(min_run_time=cfg.latency.min_run_time).median * 1e3
        span.append(time.time())
        return val_acc, sum(p.numel() for p in model.parameters()), latency_ms

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    tracking = MLflowCallback(tracking_uri="sqlite:///mlflow.db", metric_name=["val_acc", "params", "latency_ms"])
    study.optimize(objective, n_trials=n_trials, callbacks=[tracking])
    Path(out).write_text(json.dumps({"points": [t.values for t in study.trials if t.values],
                                     "knobs": [[t.params["width"], t.params["depth"], 1] for t in study.trials
                                               if t.values],
                                     "trials_s": span[-1] - span[0]}))


def timed(command: list[str], folder: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


_LATENCY: dict[str, float] = {}  # each architecture (its channels, as JSON) timed once, the same way, for both arms
_DATA: dict[str, tuple] = {}  # the study data's input shape and classes, read once


def retimed(cfg, width: float, depth: int, multiple: int) -> float:
    """The latency of a convnet of the study, timed here as kdsearch times its students (its runtime and settings)."""
    from kdsearch.models import convnet

    shape, classes = _shape(cfg)
    s = cfg.student
    return _timed_once(cfg, convnet(shape, classes, base_width=s.base_width, width=width, depth=depth,
                                    convs_per_stage=s.convs_per_stage, channel_multiple=multiple))


def reference(cfg) -> dict:
    """The hypervolume's reference point: the study's teacher's parameters and latency, timed here once. One point
    for every arm and run: each kdsearch run times its own teacher, and its figure moved by up to 15% between runs,
    which moved the script's hypervolume of the same students by up to 0.025."""
    from kdsearch.measure import count_params
    from kdsearch.models import Architecture, build_model

    shape, classes = _shape(cfg)
    t = cfg.teacher
    teacher = build_model(Architecture(shape[0], classes, t.width, t.depth, t.convs_per_stage), shape[1])
    return {"params": count_params(teacher), "latency_ms": _timed_once(cfg, teacher)}


def _shape(cfg) -> tuple:
    from kdsearch.data import load_dataset

    if not _DATA:
        data = load_dataset(cfg.data, cfg.seed)
        _DATA["shape"] = (tuple(data.input_shape), data.num_classes)
    return _DATA["shape"]


def _timed_once(cfg, model) -> float:
    from kdsearch.measure import deployable, measure_latency
    from kdsearch.models import channels_of

    shape = _shape(cfg)[0]
    key = json.dumps(channels_of(model.eval()))
    if key not in _LATENCY:
        _LATENCY[key] = measure_latency(deployable(model, shape, cfg.latency), shape, cfg.latency).median_ms
    return _LATENCY[key]


def scores(points: list, teacher: dict) -> dict:
    """The hypervolume of (val_acc, params, latency_ms) points, and the same with latency left out."""
    from kdsearch.scores import hypervolume

    return {"hypervolume": hypervolume(points, teacher),
            "hypervolume_2d": hypervolume([(a, p, 0.0) for a, p, _ in points], {**teacher, "latency_ms": 1.0})}


def one_seed(args, seed: int, teachers: Path, shared_cache: Path, script_runs: dict) -> dict:
    from kdsearch.scores import hypervolume_history
    from kdsearch.study_file import load_study

    sets = [f"seed={seed}", *args.set] + ([f"data.data_dir={args.data_dir!r}"] if args.data_dir else [])
    cfg = load_study(args.study, sets)
    name = cfg.name
    result, studies = dict(script_runs.get(str(seed), {})), {}
    result["teacher"] = reference(cfg)
    for arm in args.arms:
        folder = Path(tempfile.mkdtemp(prefix="vs-glue-"))
        started = time.time()
        if arm.startswith("glue"):
            teacher = teachers / f"teacher-{seed}.pt"
            if arm == "glue fresh" and teacher.exists():
                teacher.unlink()
            code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from bench_vs_glue import glue; "
                    f"glue({args.study!r}, {sets!r}, {args.n_trials}, {str(teacher)!r}, 'front.json')")
            seconds = timed([sys.executable, "-c", code], folder)
            front = json.loads((folder / "front.json").read_text())
            points = [(a, p, retimed(cfg, *k)) for (a, p, _), k in zip(front["points"], front["knobs"])]
            trials_s = front["trials_s"]
        else:
            cache = shared_cache  # the teacher's key holds the seed: the fresh arm trains it, the cached one reads it
            cmd = [sys.executable, "-m", "kdsearch", "run-study", args.study, "--n-trials", str(args.n_trials),
                   "--cache-dir", str(cache), *[a for s in sets for a in ("--set", s)]]
            seconds = timed(cmd, folder)
            import optuna

            study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/optuna.db")
            multiple = study.user_attrs["config"]["student"]["channel_multiple"]
            studies[arm] = (study, started, multiple)
            complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
            points = [(t.values[0], t.values[1], retimed(cfg, t.params["width"], t.params["depth"], multiple))
                      for t in complete]
            sampled = [p for p, t in zip(points, complete) if "baseline" not in t.user_attrs]
            finished = [t for t in study.trials if t.datetime_complete]
            trials_s = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
                        ).total_seconds()
        result[arm] = {"seconds": seconds, "points": points, "trials_s": trials_s}
        if arm.startswith("kdsearch"):  # its front without the baseline pair: the sampler's picks against the script's
            result[arm]["sampled"] = scores(sampled, result["teacher"])
    for arm in arms_of(result):
        result[arm].update(scores(result[arm]["points"], result["teacher"]))
    for arm, (study, started, multiple) in studies.items():
        script = result.get(arm.replace("kdsearch", "glue"))
        if script is None:
            continue
        def point(t, multiple=multiple):
            return t.values[0], t.values[1], retimed(cfg, t.params["width"], t.params["depth"], multiple)

        history = hypervolume_history(study, result["teacher"], point)
        first_start = min(t.datetime_start for t in study.trials if t.datetime_start).timestamp()
        reached = history[history["hypervolume"] >= script["hypervolume"]]
        result[arm]["to_script_front_s"] = (float(reached["seconds"].iloc[0]) + first_start - started
                                            if len(reached) else None)
    return result


def arms_of(result: dict) -> list[str]:
    return [arm for arm in ARMS if arm in result]


def _reach(r: dict) -> str:
    if "to_script_front_s" not in r:
        return ""
    t = r["to_script_front_s"]
    return ", the script's front not reached" if t is None else f", the script's front after {t:.1f} s"


def _line(arm: str, r: dict) -> str:
    hv = f" (hv {r['hypervolume']:.4f}, 2-D {r['hypervolume_2d']:.4f}{_reach(r)})" if "hypervolume" in r else ""
    return f"{arm} {r['seconds']:.1f} s, trials {r['trials_s']:.1f} s{hv}"


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} +/- {sd:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default=str(ROOT / "studies" / "digits.toml"))
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="which arms to run (a cached arm without its fresh one trains the teacher itself)")
    parser.add_argument("--save", metavar="FILE", help="write each seed's results and the latency figures here")
    parser.add_argument("--script-from", metavar="FILE", help="read the script's arms from a file --save wrote")
    args = parser.parse_args()
    saved = json.loads(Path(args.script_from).read_text()) if args.script_from else {"seeds": {}, "latency": {}}
    _LATENCY.update(saved["latency"])
    script_runs = {seed: {arm: r for arm, r in arms.items() if arm.startswith("glue")}
                   for seed, arms in saved["seeds"].items()}
    args.study = str(Path(args.study).resolve()) if Path(args.study).exists() else str(ROOT / "studies" /
                                                                                        f"{args.study}.toml")
    args.data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    results = []
    with tempfile.TemporaryDirectory() as teachers, tempfile.TemporaryDirectory() as cache:
        for seed in args.seeds:
            results.append(one_seed(args, seed, Path(teachers), Path(cache), script_runs))
            if args.save:
                Path(args.save).write_text(json.dumps({"seeds": dict(zip(map(str, args.seeds), results)),
                                                       "latency": _LATENCY}))
            print(f"seed {seed}: " + ", ".join(_line(arm, results[-1][arm]) for arm in arms_of(results[-1])),
                  flush=True)
    print(f"{args.n_trials} trials a study, seeds {args.seeds}; mean +/- sd over the seeds:")
    for arm in arms_of(results[0]):
        secs = [r[arm]["seconds"] for r in results]
        per_trial = statistics.mean(r[arm]["trials_s"] / len(r[arm]["points"]) for r in results)  # baselines too
        print(f"  {arm:>15}: {spread(secs)} s end to end, {per_trial:.2f} s a trial (first trial's start to last "
              f"one's end, over the trials); hypervolume {spread([r[arm]['hypervolume'] for r in results])}, "
              f"2-D (accuracy against parameters) {spread([r[arm]['hypervolume_2d'] for r in results])}")
        reach = [r[arm].get("to_script_front_s", False) for r in results]
        if arm.startswith("kdsearch") and all(v is not False for v in reach):
            got = [v for v in reach if v is not None]
            script = [r[arm.replace("kdsearch", "glue")]["seconds"] for r, v in zip(results, reach) if v is not None]
            share = statistics.mean(g / s for g, s in zip(got, script)) if got else 0.0
            print(f"  {'':>15}  reached the script's final hypervolume in {len(got)} of {len(reach)} seeds"
                  + (f", after {statistics.mean(got):.1f} s on average ({share:.2f}x the script's end-to-end time)"
                     if got else ""))
    for kind in ("fresh", "cached"):
        if f"glue {kind}" in results[0] and f"kdsearch {kind}" in results[0]:
            pairs = [(r[f"glue {kind}"], r[f"kdsearch {kind}"]) for r in results]
            ratio = statistics.mean(g["seconds"] / k["seconds"] for g, k in pairs)
            per_trial = statistics.mean(g["trials_s"] / len(g["points"]) / (k["trials_s"] / len(k["points"]))
                                        for g, k in pairs)
            print(f"teacher {kind}: kdsearch {ratio:.2f}x faster end to end than the script, {per_trial:.2f}x per "
                  "trial; gaps kdsearch - script, paired by seed: "
                  + ", ".join(f"{name} {paired_gap([k[key] - g[key] for g, k in pairs])}"
                              for name, key in (("hv", "hypervolume"), ("2-D", "hypervolume_2d")))
                  + "; without kdsearch's baseline pair: "
                  + ", ".join(f"{name} {paired_gap([k['sampled'][key] - g[key] for g, k in pairs])}"
                              for name, key in (("hv", "hypervolume"), ("2-D", "hypervolume_2d"))))


def paired_gap(gaps: list[float]) -> str:
    """Mean of per-seed differences +/- one standard error over the seeds."""
    se = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else 0.0
    return f"{statistics.mean(gaps):+.4f} +/- {se:.4f}"


if __name__ == "__main__":
    main()
