"""The Pareto front of a study as a table: the trials frame, the report files under reports/<study>
(pareto.{csv,html,png}, search.{html,png}, kd_gain.json, importance.json), the study's summary metrics and report
logged to its MLflow run, and the front printed in the terminal.

The front is Optuna's own `study.best_trials` (validation accuracy up, parameters and latency down). The numbers
come from `scores` (hypervolume, KD gain) and `importance` (fANOVA), the figures from `charts`.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
from mlflow import MlflowClient

from kdsearch import charts
from kdsearch.charts import FIXED_COLUMNS
from kdsearch.importance import importance_line, param_importances
from kdsearch.measure import runtime_label, study_latency
from kdsearch.scores import hypervolume_history, hypervolume_reference, kd_gains, study_hypervolume

COMPLETE = optuna.trial.TrialState.COMPLETE

TABLE_COLUMNS = ["trial", "family", "val_acc", "test_acc", "params", "latency_ms"]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per complete trial: objectives, test accuracy, sampled params, run id, whether it is on the front, and
    what its latency was timed with (`latency_runtime`, ...)."""
    front = {t.number for t in study.best_trials}
    timed = {f"latency_{k}": v for k, v in study_latency(study.user_attrs).items()}
    rows = []
    for t in study.get_trials(deepcopy=False, states=[COMPLETE]):
        a = t.user_attrs
        rows.append({"trial": t.number, "family": a.get("family", "convnet"), "val_acc": t.values[0],
                     "test_acc": a.get("test_acc"),
                     "params": int(a["params"]), "latency_ms": a["latency_ms"], "flops": a.get("flops"),
                     **t.params, "channels": t.user_attrs.get("channels"),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), **timed, "pareto": t.number in front,
                     **_refined_columns(study, t.number)})
    return pd.DataFrame(rows)


def _refined_columns(study: optuna.Study, number: int) -> dict:
    from kdsearch.refine import refined

    best = refined(study, number)
    if not best:
        return {}
    return dict(zip(charts.REFINED_COLUMNS, (best["val_acc"], best["test_acc"], best["epochs"], best["run_id"])))


def _with_integer_knobs(df: pd.DataFrame, study: optuna.Study) -> pd.DataFrame:
    """Integer knobs as integers: where families mix, a knob is empty in the other families' rows, and pandas would
    write its whole column as floats (depth 3.0)."""
    ints = {name for t in study.get_trials(deepcopy=False) for name, d in t.distributions.items()
            if isinstance(d, optuna.distributions.IntDistribution)}
    return df.astype({c: "Int64" for c in df.columns if c in ints})


def write_report(study: optuna.Study, out_dir: Path, importance: dict | None = None
                 ) -> tuple[pd.DataFrame, list[Path]]:
    """Write pareto.{csv,html,png} (the front, and beside it what drives each objective), search.{html,png}
    (hypervolume against trials and wall time, parallel coordinates), kd_gain.json and importance.json under
    `out_dir`; return the front and the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df = trials_frame(study)
    front = df[df["pareto"]].sort_values("params") if len(df) else df
    teacher = study.user_attrs.get("teacher")
    importance = param_importances(study) if importance is None else importance
    paths = [out_dir / "pareto.csv", out_dir / "pareto.html", out_dir / "pareto.png", out_dir / "search.html",
             out_dir / "kd_gain.json", out_dir / "importance.json"]
    _with_integer_knobs(front.drop(columns=["pareto"], errors="ignore"), study).to_csv(paths[0], index=False)
    latency = study_latency(study.user_attrs)
    figures = [charts.plotly_figure(df, teacher, study.study_name, latency)]
    figures += [charts.importance_figure(importance)] if importance else []
    paths[1].write_text(charts.page(study.study_name, figures))
    charts.matplotlib_figure(df, teacher, study.study_name, paths[2], latency)
    history = hypervolume_history(study) if len(df) and len(study.directions) > 1 else None  # once, for both
    paths[3].write_text(charts.search_page(study, df, history))
    paths[4].write_text(json.dumps(kd_gains(study) or None, indent=1))
    paths[5].write_text(json.dumps(importance, indent=1))
    if history is not None:
        charts.hypervolume_png(study, history, out_dir / "search.png")
        paths.append(out_dir / "search.png")
    return front, paths


def report_study(study: optuna.Study, reports_dir: Path, client: MlflowClient | None = None) -> pd.DataFrame:
    """Write the report under reports_dir/<study>, log it and the study's summary metrics to the study's MLflow
    run, print the front."""
    importance = param_importances(study)
    front, paths = write_report(study, reports_dir / study.study_name, importance)
    summary = study_summary(study)
    run_id = study.user_attrs.get("mlflow_run_id")
    if client is not None and run_id:
        for path in paths:
            client.log_artifact(run_id, str(path), artifact_path="report")
        from kdsearch.tracking import log_values

        shares = {f"importance.{objective}.{knob}": v for objective, s in importance.items() for knob, v in s.items()}
        stale = [k for k in client.get_run(run_id).data.metrics if k.startswith("importance.") and k not in shares]
        shares.update(dict.fromkeys(stale, float("nan")))  # an earlier report's knob that no longer has a share
        log_values(client, run_id, metrics={**{k: v for k, v in summary.items() if v is not None}, **shares})
    print(f"Pareto front of '{study.study_name}': {len(front)} of {summary['complete_trials']} complete trials "
          f"({summary['pruned_trials']} pruned, {summary['failed_trials']} failed)")
    if len(front):
        knobs = [c for c in front.columns if c not in FIXED_COLUMNS and front[c].notna().any()]
        refined = [c for c in charts.REFINED_COLUMNS[:2] if c in front and front[c].notna().any()]
        table = front[TABLE_COLUMNS + refined + knobs]
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    if summary.get("hypervolume") is not None:
        ref = hypervolume_reference(study.user_attrs["teacher"])
        timed = runtime_label(study_latency(study.user_attrs))
        print(f"hypervolume {summary['hypervolume']:.4f} (val_acc, log10 params, latency_ms; reference: val_acc 0, "
              f"the teacher's {ref[1]:,.0f} params and {ref[2]:.4g} ms in {timed})")
        if summary["hypervolume"] == 0:
            print(nothing_beats_the_teacher(study))
    for gain in kd_gains(study).values():
        print(kd_gain_line(gain))
    if importance:
        print(f"what drives each objective (fANOVA importance over {summary['complete_trials']} complete trials; "
              f"few trials make it noisy): {importance_line(importance, study)}")
    print(f"report: {paths[1]} ({', '.join(p.name for p in paths if p != paths[1])})")
    return front


def nothing_beats_the_teacher(study: optuna.Study) -> str:
    """Why a study's hypervolume is 0: no complete student is both smaller and faster than its teacher."""
    teacher = study.user_attrs["teacher"]
    done = [t.user_attrs for t in study.get_trials(deepcopy=False, states=[COMPLETE])]
    slower = sum(a["latency_ms"] >= teacher["latency_ms"] for a in done)
    larger = sum(a["params"] >= teacher["params"] for a in done)
    fastest = min(a["latency_ms"] for a in done)
    eager = study_latency(study.user_attrs)["runtime"] == "torch"
    fix = ("search smaller students, or time latency in the runtime they are deployed with (latency.runtime = "
           "'onnxruntime')" if eager else "search smaller or shallower students")
    return (f"hypervolume 0: no student is both smaller and faster than the teacher ({slower} of {len(done)} as "
            f"slow or slower than its {teacher['latency_ms']:.4g} ms, the fastest {fastest:.4g} ms; {larger} as large "
            f"or larger): {fix}")


def kd_gain_line(gain: dict) -> str:
    def part(split: str) -> str:
        se = gain[f"{split}_gain_se"]
        return (f"{split}_acc {gain[f'{split}_acc'][0]:.4f} -> {gain[f'{split}_acc'][1]:.4f} "
                f"({gain[f'{split}_gain']:+.4f}{f' +/- {se:.4f}' if se is not None else ''})")
    trials = gain["trials"]
    source = f"{gain['pairs']} seed pairs" if gain["pairs"] > 1 else f"trials {trials[0]} -> {trials[1]}"
    name = "KD" if gain.get("method", "kd") == "kd" else gain["method"].upper()
    return (f"{name} gain of the {gain['family']} ({source}, {gain['params']:,} params; +/- one standard error over "
            f"the {gain['se_over']}): "
            f"{part('val')}, {part('test')}")


def study_summary(study: optuna.Study) -> dict:
    """Figures that let studies be compared side by side in MLflow's runs table."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    done = [t for t in study.get_trials(deepcopy=False, states=[COMPLETE])]
    pareto = len(study.directions) > 1
    return {"complete_trials": states.count(COMPLETE), "pruned_trials": states.count(optuna.trial.TrialState.PRUNED),
            "failed_trials": states.count(optuna.trial.TrialState.FAIL),
            "front_size": len(study.best_trials) if done else 0,
            "best_val_acc": max((t.values[0] for t in done), default=None),
            "hypervolume": study_hypervolume(study) if pareto and done and "teacher" in study.user_attrs else None}


def load_and_report(study_name: str, storage: str, tracking_uri: str | None, reports_dir: Path) -> pd.DataFrame:
    """The `report` command: load a finished (or running) study and write its report."""
    from kdsearch.tracking import client_for

    return report_study(load_existing_study(study_name, storage), reports_dir, client_for(tracking_uri))


def load_existing_study(study_name: str, storage: str) -> optuna.Study:
    from kdsearch import KdsearchError
    from kdsearch.credentials import masked
    from kdsearch.storage import open_storage

    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise KdsearchError(f"no study '{study_name}' in {masked(storage)}: pass --study-name and --storage of a study "
                            "made by run-study") from None
    except (ValueError, ImportError) as e:
        raise KdsearchError(f"cannot open Optuna storage {masked(storage)!r} ({masked(str(e))}): pass a valid "
                            "--storage URL") from None
