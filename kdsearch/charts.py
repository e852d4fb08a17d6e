"""The report's charts: the front in two panels (accuracy against parameters and against latency; an interactive
plotly figure and a static matplotlib PNG), the front's hypervolume as the study ran, parallel coordinates of the
trials, and the importance bars.

Rendering only: each function takes the trials frame (`report.trials_frame`), a study or numbers already worked
out (`scores`, `importance`) and returns a figure or an HTML page, or writes one PNG at the path it is given. It
scores nothing, reads no MLflow run and prints nothing; `report` decides which files are written where.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import plotly.io as pio

from kdsearch.measure import runtime_label
from kdsearch.scores import hypervolume_reference

PANELS = [("params", "parameters (log scale)", True), ("latency_ms", "latency (ms)", False)]
FAMILY_COLOURS = {"convnet": "crimson", "separable": "royalblue", "resnet": "seagreen"}  # a user builder: orange
# the trials frame's columns that are not sampled knobs: every other column is a knob, in the charts and in the
# terminal table alike
REFINED_COLUMNS = ["refined_val_acc", "refined_test_acc", "refined_epochs", "refined_run_id"]
FIXED_COLUMNS = {"trial", "family", "val_acc", "test_acc", "params", "latency_ms", "flops", "mlflow_run_id", "pareto",
                 "channels", "arch", *REFINED_COLUMNS,
                 *(f"latency_{k}" for k in ("device", "threads", "batch_size", "dtype", "runtime", "runtime_version"))}


def panels(latency: dict) -> list[tuple[str, str, bool]]:
    """The two panels, the latency axis naming what its figures were timed with."""
    return [(x, f"{title}: {runtime_label(latency)}" if x == "latency_ms" else title, log) for x, title, log in PANELS]


def front_2d(df: pd.DataFrame, x: str) -> pd.DataFrame:
    """Rows that no other row beats on both val_acc (higher) and `x` (lower): the staircase drawn in each panel."""
    d = df.sort_values([x, "val_acc"], ascending=[True, False])
    best_before = d["val_acc"].cummax().shift(fill_value=float("-inf"))
    return d[d["val_acc"] > best_before]


def _hover(df: pd.DataFrame) -> list[str]:
    knobs = [c for c in df.columns if c not in FIXED_COLUMNS] + ["channels"]
    return [f"trial {r['trial']} ({r['family']})<br>val_acc {r['val_acc']:.4f} test_acc {r['test_acc']:.4f}<br>"
            f"params {r['params']:,} latency {r['latency_ms']:.3f} ms<br>"
            + " ".join(f"{k} {r[k]:.4g}" if isinstance(r[k], float) else f"{k} {r[k]}" for k in knobs
                       if not (isinstance(r[k], float) and np.isnan(r[k])))
            + f"<br>MLflow run {r['mlflow_run_id']}" for r in df.to_dict("records")]


def plotly_figure(df: pd.DataFrame, teacher: dict | None, name: str, latency: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, shared_yaxes=True,
                        subplot_titles=["accuracy vs parameters", "accuracy vs latency"])
    for col, (x, title, log) in enumerate(panels(latency), start=1):
        first = col == 1
        if len(df):
            dominated, front = df[~df["pareto"]], df[df["pareto"]]
            fig.add_trace(go.Scatter(x=dominated[x], y=dominated["val_acc"], mode="markers", name="dominated",
                                     marker={"color": "grey", "opacity": 0.35}, hovertext=_hover(dominated),
                                     hoverinfo="text", showlegend=first, legendgroup="d"), row=1, col=col)
            for family, colour, rows in _by_family(front):
                fig.add_trace(go.Scatter(x=rows[x], y=rows["val_acc"], mode="markers", name=f"Pareto-optimal {family}",
                                         marker={"color": colour, "size": 10}, hovertext=_hover(rows),
                                         hoverinfo="text", showlegend=first, legendgroup=family), row=1, col=col)
            stairs = front_2d(df, x)
            fig.add_trace(go.Scatter(x=stairs[x], y=stairs["val_acc"], mode="lines", line={"shape": "hv",
                                     "color": "dimgrey"}, name="front", showlegend=False, hoverinfo="skip"),
                          row=1, col=col)
            after = refined_rows(df)
            if len(after):
                fig.add_trace(go.Scatter(x=after[x], y=after["refined_val_acc"], mode="markers", name="refined",
                                         marker={"symbol": "diamond", "size": 11, "color": "crimson"},
                                         hovertext=[f"trial {t}: refined val_acc {v:.4f}, test_acc {a:.4f}" for t, v, a
                                                    in zip(after["trial"], after["refined_val_acc"],
                                                           after["refined_test_acc"])],
                                         hoverinfo="text", showlegend=first, legendgroup="r"), row=1, col=col)
        if teacher:
            fig.add_trace(go.Scatter(x=[teacher[x]], y=[teacher["val_acc"]], mode="markers+text", text=["teacher"],
                                     textposition="bottom center", name="teacher", showlegend=first,
                                     marker={"symbol": "star", "size": 14, "color": "black"}), row=1, col=col)
        fig.update_xaxes(title_text=title, type="log" if log else "linear", row=1, col=col)
    fig.update_yaxes(title_text="validation accuracy", row=1, col=1)
    fig.update_layout(title=f"kdsearch study '{name}'", template="plotly_white", height=520, width=1100)
    return fig


def refined_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The trials refined after the search (see `refine.py`): drawn beside the front they were picked from."""
    return df[df["refined_val_acc"].notna()] if "refined_val_acc" in df else df.iloc[:0]


def _by_family(front: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """The front's rows per student family, each with its colour (the same in every figure of a study)."""
    return [(f, FAMILY_COLOURS.get(f, "darkorange"), front[front["family"] == f])
            for f in sorted(front["family"].unique())]


def matplotlib_figure(df: pd.DataFrame, teacher: dict | None, name: str, path: Path, latency: dict) -> None:
    fig, axes = _two_panels(height=4.5)
    for ax, (x, title, log) in zip(axes, panels(latency)):
        if len(df):
            dominated, front, stairs = df[~df["pareto"]], df[df["pareto"]], front_2d(df, x)
            ax.scatter(dominated[x], dominated["val_acc"], color="grey", alpha=0.35, label="dominated")
            for family, colour, rows in _by_family(front):
                ax.scatter(rows[x], rows["val_acc"], color=colour, label=f"Pareto-optimal {family}", zorder=3)
            ax.step(stairs[x], stairs["val_acc"], where="post", color="dimgrey")
            after = refined_rows(df)
            if len(after):
                ax.scatter(after[x], after["refined_val_acc"], marker="D", color="crimson", label="refined", zorder=4)
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


def _hypervolume_figure(study: optuna.Study, history: pd.DataFrame):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ref = hypervolume_reference(study.user_attrs["teacher"])
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=["against trials", "against wall time"])
    for col, x in ((1, "trials"), (2, "seconds")):
        fig.add_trace(go.Scatter(x=history[x], y=history["hypervolume"], mode="lines+markers", line={"shape": "hv"},
                                 hovertext=[f"trial {n}" for n in history["trial"]], showlegend=False), row=1, col=col)
    fig.update_xaxes(title_text="complete trials", row=1, col=1)
    fig.update_xaxes(title_text="seconds since the study's first trial started", row=1, col=2)
    fig.update_yaxes(title_text="hypervolume", row=1, col=1)
    fig.update_layout(template="plotly_white", height=420, title=(
        f"Hypervolume of the front as the study ran (reference: val_acc {ref[0]:g}, the teacher's {ref[1]:,.0f} "
        f"params and {ref[2]:.3g} ms; log10 params): still rising at the end means more trials would help"))
    return fig


def _two_panels(height: float):
    """A PNG figure of two panels sharing the y axis. matplotlib's Figure without pyplot: no global backend is set
    in the caller's process (a notebook keeps its own), and pyplot's import (0.4 s) is not paid."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, height))
    return fig, fig.subplots(1, 2, sharey=True)


def hypervolume_png(study: optuna.Study, history: pd.DataFrame, path: Path) -> None:
    fig, axes = _two_panels(height=3.8)
    for ax, x, label in zip(axes, ("trials", "seconds"), ("complete trials", "seconds since the first trial")):
        ax.step(history[x], history["hypervolume"], where="post", marker="o", color="crimson")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hypervolume")
    fig.suptitle(f"kdsearch study '{study.study_name}': hypervolume of the front")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def search_page(study: optuna.Study, df: pd.DataFrame, history: pd.DataFrame | None) -> str:
    """Hypervolume history (optimisation history in budget mode) and parallel coordinates."""
    import plotly.express as px

    figures = []
    if len(df):
        if history is not None:
            figures.append(_hypervolume_figure(study, history))
        else:
            figures.append(optuna.visualization.plot_optimization_history(study))
        knobs = [c for c in df.columns if c not in FIXED_COLUMNS and pd.api.types.is_numeric_dtype(df[c])
                 and df[c].notna().all()]  # a knob of one family is missing from the others' rows
        dims = knobs + ["params", "latency_ms", "val_acc"]
        figures.append(px.parallel_coordinates(df[dims].assign(params=np.log10(df["params"])).rename(
            columns={"params": "log10 params"}), color="val_acc", title="trials: parameters to objectives"))
    return page(study.study_name, figures)


def importance_figure(importance: dict):
    import plotly.graph_objects as go

    knobs = sorted({k for shares in importance.values() for k in shares})
    fig = go.Figure([go.Bar(name=objective, x=knobs, y=[shares.get(k, 0.0) for k in knobs])
                     for objective, shares in importance.items()])
    fig.update_layout(barmode="group", template="plotly_white", height=380, width=1100, yaxis_title="importance",
                      title="What drives each objective: parameter importance (fANOVA) over the complete trials")
    return fig


def page(title: str, figures: list) -> str:
    html = [pio.to_html(f, full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures)]
    return f"<html><head><title>{title}</title></head><body>{''.join(html)}</body></html>"
