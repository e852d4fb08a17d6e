"""The Pareto front of a study: an interactive HTML chart, a static PNG, a CSV, and a table in the terminal.

The front is Optuna's own `study.best_trials` (validation accuracy up, parameters and latency down).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import plotly.io as pio
from mlflow import MlflowClient

COMPLETE = optuna.trial.TrialState.COMPLETE

PANELS = [("params", "parameters (log scale)", True), ("latency_ms", "latency (ms)", False)]
TABLE_COLUMNS = ["trial", "val_acc", "test_acc", "params", "latency_ms", "width", "depth", "temperature", "alpha"]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per complete trial: objectives, test accuracy, sampled params, run id, and whether it is on the front."""
    front = {t.number for t in study.best_trials}
    rows = []
    for t in study.get_trials(deepcopy=False, states=[COMPLETE]):
        a = t.user_attrs
        rows.append({"trial": t.number, "val_acc": t.values[0], "test_acc": a.get("test_acc"),
                     "params": int(a["params"]), "latency_ms": a["latency_ms"], "flops": a.get("flops"),
                     **t.params, "channels": t.user_attrs.get("channels"),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "pareto": t.number in front})
    return pd.DataFrame(rows)


def front_2d(df: pd.DataFrame, x: str) -> pd.DataFrame:
    """Rows that no other row beats on both val_acc (higher) and `x` (lower): the staircase drawn in each panel."""
    d = df.sort_values([x, "val_acc"], ascending=[True, False])
    best_before = d["val_acc"].cummax().shift(fill_value=float("-inf"))
    return d[d["val_acc"] > best_before]


def kd_gain(study: optuna.Study) -> dict | None:
    """Accuracy of the distilled baseline minus that of its undistilled twin (same student, lr and seed)."""
    base = {t.user_attrs.get("baseline"): t for t in study.get_trials(deepcopy=False, states=[COMPLETE])}
    if "kd" not in base or "no-kd" not in base:
        return None
    kd, plain = base["kd"], base["no-kd"]
    return {"trials": [plain.number, kd.number], "params": kd.user_attrs["params"],
            "val_acc": [plain.values[0], kd.values[0]], "val_gain": kd.values[0] - plain.values[0],
            "test_acc": [plain.user_attrs["test_acc"], kd.user_attrs["test_acc"]],
            "test_gain": kd.user_attrs["test_acc"] - plain.user_attrs["test_acc"]}


def write_report(study: optuna.Study, out_dir: Path) -> tuple[pd.DataFrame, list[Path]]:
    """Write pareto.{csv,html,png}, search.html (hypervolume history, parallel coordinates) and kd_gain.json under
    `out_dir`; return the front and the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df = trials_frame(study)
    front = df[df["pareto"]].sort_values("params") if len(df) else df
    teacher = study.user_attrs.get("teacher")
    paths = [out_dir / "pareto.csv", out_dir / "pareto.html", out_dir / "pareto.png", out_dir / "search.html",
             out_dir / "kd_gain.json"]
    front.drop(columns=["pareto"], errors="ignore").to_csv(paths[0], index=False)
    _plotly_figure(df, teacher, study.study_name).write_html(paths[1], include_plotlyjs=True)
    _matplotlib_figure(df, teacher, study.study_name, paths[2])
    paths[3].write_text(_search_page(study, df))
    paths[4].write_text(json.dumps(kd_gain(study), indent=1))
    return front, paths


def _search_page(study: optuna.Study, df: pd.DataFrame) -> str:
    """Hypervolume history (Optuna's plot; optimisation history in budget mode) and parallel coordinates."""
    import plotly.express as px

    figures = []
    if len(df):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if len(study.directions) > 1:
                figures.append(optuna.visualization.plot_hypervolume_history(study, reference_point(df)))
            else:
                figures.append(optuna.visualization.plot_optimization_history(study))
        dims = [c for c in ["width", "depth", "temperature", "alpha", "lr", "params", "latency_ms", "val_acc"]
                if c in df.columns]
        figures.append(px.parallel_coordinates(df[dims].assign(params=np.log10(df["params"])).rename(
            columns={"params": "log10 params"}), color="val_acc", title="trials: parameters to objectives"))
    html = [pio.to_html(f, full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures)]
    return f"<html><head><title>{study.study_name}</title></head><body>{''.join(html)}</body></html>"


def reference_point(df: pd.DataFrame) -> list[float]:
    """Hypervolume reference: zero accuracy, and 10% beyond the largest and slowest student seen."""
    return [0.0, float(df["params"].max()) * 1.1, float(df["latency_ms"].max()) * 1.1]


def report_study(study: optuna.Study, reports_dir: Path, client: MlflowClient | None = None) -> pd.DataFrame:
    """Write the report under reports_dir/<study>, log it to the study's MLflow run, print the front."""
    front, paths = write_report(study, reports_dir / study.study_name)
    run_id = study.user_attrs.get("mlflow_run_id")
    if client is not None and run_id:
        for path in paths:
            client.log_artifact(run_id, str(path), artifact_path="report")
    print(f"Pareto front of '{study.study_name}': {len(front)} of "
          f"{len(study.get_trials(deepcopy=False, states=[COMPLETE]))} complete trials")
    if len(front):
        print(front[TABLE_COLUMNS].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    gain = kd_gain(study)
    if gain:
        print(f"KD gain (trials {gain['trials'][0]} -> {gain['trials'][1]}, {gain['params']:,} params): val_acc "
              f"{gain['val_acc'][0]:.4f} -> {gain['val_acc'][1]:.4f} ({gain['val_gain']:+.4f}), test_acc "
              f"{gain['test_acc'][0]:.4f} -> {gain['test_acc'][1]:.4f} ({gain['test_gain']:+.4f})")
    print(f"report: {paths[1]} ({', '.join(p.name for p in paths if p != paths[1])})")
    return front


def _hover(df: pd.DataFrame) -> list[str]:
    fixed = {"trial", "val_acc", "test_acc", "params", "latency_ms", "flops", "mlflow_run_id", "pareto"}
    knobs = [c for c in df.columns if c not in fixed]
    return [f"trial {r['trial']}<br>val_acc {r['val_acc']:.4f} test_acc {r['test_acc']:.4f}<br>"
            f"params {r['params']:,} latency {r['latency_ms']:.3f} ms<br>"
            + " ".join(f"{k} {r[k]:.4g}" if isinstance(r[k], float) else f"{k} {r[k]}" for k in knobs)
            + f"<br>MLflow run {r['mlflow_run_id']}" for r in df.to_dict("records")]


def _plotly_figure(df: pd.DataFrame, teacher: dict | None, name: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, shared_yaxes=True,
                        subplot_titles=["accuracy vs parameters", "accuracy vs latency"])
    for col, (x, title, log) in enumerate(PANELS, start=1):
        first = col == 1
        if len(df):
            dominated, front = df[~df["pareto"]], df[df["pareto"]]
            fig.add_trace(go.Scatter(x=dominated[x], y=dominated["val_acc"], mode="markers", name="dominated",
                                     marker={"color": "grey", "opacity": 0.35}, hovertext=_hover(dominated),
                                     hoverinfo="text", showlegend=first, legendgroup="d"), row=1, col=col)
            fig.add_trace(go.Scatter(x=front[x], y=front["val_acc"], mode="markers", name="Pareto-optimal",
                                     marker={"color": "crimson", "size": 10}, hovertext=_hover(front),
                                     hoverinfo="text", showlegend=first, legendgroup="p"), row=1, col=col)
            stairs = front_2d(df, x)
            fig.add_trace(go.Scatter(x=stairs[x], y=stairs["val_acc"], mode="lines", line={"shape": "hv",
                                     "color": "crimson"}, name="front", showlegend=False, hoverinfo="skip"),
                          row=1, col=col)
        if teacher:
            fig.add_trace(go.Scatter(x=[teacher[x]], y=[teacher["val_acc"]], mode="markers+text", text=["teacher"],
                                     textposition="bottom center", name="teacher", showlegend=first,
                                     marker={"symbol": "star", "size": 14, "color": "black"}), row=1, col=col)
        fig.update_xaxes(title_text=title, type="log" if log else "linear", row=1, col=col)
    fig.update_yaxes(title_text="validation accuracy", row=1, col=1)
    fig.update_layout(title=f"kdsearch study '{name}'", template="plotly_white", height=520, width=1100)
    return fig


def _matplotlib_figure(df: pd.DataFrame, teacher: dict | None, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (x, title, log) in zip(axes, PANELS):
        if len(df):
            dominated, front, stairs = df[~df["pareto"]], df[df["pareto"]], front_2d(df, x)
            ax.scatter(dominated[x], dominated["val_acc"], color="grey", alpha=0.35, label="dominated")
            ax.scatter(front[x], front["val_acc"], color="crimson", label="Pareto-optimal", zorder=3)
            ax.step(stairs[x], stairs["val_acc"], where="post", color="crimson")
        if teacher:
            ax.scatter([teacher[x]], [teacher["val_acc"]], marker="*", s=200, color="black", label="teacher")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(loc="lower right")
    fig.suptitle(f"kdsearch study '{name}'")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_and_report(study_name: str, storage: str, tracking_uri: str | None, reports_dir: Path) -> pd.DataFrame:
    """The `report` command: load a finished (or running) study and write its report."""
    from kdsearch.tracking import client_for

    return report_study(load_existing_study(study_name, storage), reports_dir, client_for(tracking_uri))


def load_existing_study(study_name: str, storage: str) -> optuna.Study:
    from kdsearch import KdsearchError
    from kdsearch.storage import open_storage

    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise KdsearchError(f"no study '{study_name}' in {storage}: pass --study-name and --storage of a study "
                            "made by run-study") from None
    except (ValueError, ImportError) as e:
        raise KdsearchError(f"cannot open Optuna storage {storage!r} ({e}): pass a valid --storage URL") from None


def hypervolume(study: optuna.Study, reference: tuple[float, float, float] = (0.0, 1e5, 1.0)) -> float:
    """Hypervolume of the Pareto-mode front in (val_acc, log10 params, latency_ms), between it and `reference`
    (accuracy, parameters, ms). Log parameters so that no one objective's scale swamps the others."""
    from optuna._hypervolume import compute_hypervolume  # what plot_hypervolume_history uses; not yet public

    points = np.array([[-t.values[0], np.log10(t.values[1]), t.values[2]] for t in study.best_trials])
    ref = np.array([-reference[0], np.log10(reference[1]), reference[2]])
    points = points[(points < ref).all(axis=1)]
    return float(compute_hypervolume(points, ref)) if len(points) else 0.0
