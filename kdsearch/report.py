"""The Pareto front of a study: an interactive HTML chart, a static PNG, a CSV, and a table in the terminal.

The front is Optuna's own `study.best_trials` (validation accuracy up, parameters and latency down).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import plotly.io as pio
from mlflow import MlflowClient

from kdsearch.figures import hypervolume_history, hypervolume_reference, kd_gains, study_hypervolume
from kdsearch.measure import runtime_label, study_latency
from kdsearch.students import SHARED

COMPLETE = optuna.trial.TrialState.COMPLETE

PANELS = [("params", "parameters (log scale)", True), ("latency_ms", "latency (ms)", False)]


def panels(latency: dict) -> list[tuple[str, str, bool]]:
    """The two panels, the latency axis naming what its figures were timed with."""
    return [(x, f"{title}: {runtime_label(latency)}" if x == "latency_ms" else title, log) for x, title, log in PANELS]
TABLE_COLUMNS = ["trial", "family", "val_acc", "test_acc", "params", "latency_ms"]
FAMILY_COLOURS = {"convnet": "crimson", "separable": "royalblue", "resnet": "seagreen"}  # a user builder: orange


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
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), **timed, "pareto": t.number in front})
    return pd.DataFrame(rows)


def _with_integer_knobs(df: pd.DataFrame, study: optuna.Study) -> pd.DataFrame:
    """Integer knobs as integers: where families mix, a knob is empty in the other families' rows, and pandas would
    write its whole column as floats (depth 3.0)."""
    ints = {name for t in study.get_trials(deepcopy=False) for name, d in t.distributions.items()
            if isinstance(d, optuna.distributions.IntDistribution)}
    return df.astype({c: "Int64" for c in df.columns if c in ints})


def front_2d(df: pd.DataFrame, x: str) -> pd.DataFrame:
    """Rows that no other row beats on both val_acc (higher) and `x` (lower): the staircase drawn in each panel."""
    d = df.sort_values([x, "val_acc"], ascending=[True, False])
    best_before = d["val_acc"].cummax().shift(fill_value=float("-inf"))
    return d[d["val_acc"] > best_before]


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
    figures = [_plotly_figure(df, teacher, study.study_name, latency)]
    figures += [_importance_figure(importance)] if importance else []
    paths[1].write_text(_page(study.study_name, figures))
    _matplotlib_figure(df, teacher, study.study_name, paths[2], latency)
    history = hypervolume_history(study) if len(df) and len(study.directions) > 1 else None  # once, for both
    paths[3].write_text(_search_page(study, df, history))
    paths[4].write_text(json.dumps(kd_gains(study) or None, indent=1))
    paths[5].write_text(json.dumps(importance, indent=1))
    if history is not None:
        _hypervolume_png(study, history, out_dir / "search.png")
        paths.append(out_dir / "search.png")
    return front, paths


def param_importances(study: optuna.Study) -> dict[str, dict[str, float]]:
    """For each objective separately, how much each sampled knob explains of it over the complete trials
    (Optuna's fANOVA evaluator, seeded): {objective: {knob: share}}, shares summing to 1. The size and latency
    objectives are weighed over the architecture's knobs only: T, alpha and lr cannot change them, and with a few
    trials fANOVA credited them by chance.

    Where families mix, fANOVA over all trials could weigh only the knobs every trial has. So `arch` is the share of
    the objective's variance that lies between the families, and each family's trials get their own fANOVA shares
    of the rest (summing to 1 per family), its knobs named `family.knob`. A family (or study) with fewer than
    three complete trials is left out."""
    by_family = _complete_by_family(study)
    if by_family is None:
        return _importances(study, study.get_trials(deepcopy=False, states=[COMPLETE]))
    out: dict[str, dict[str, float]] = {}
    for i, objective in enumerate(_objective_names(study)):
        if len(by_family) > 1:
            out[objective] = {"arch": _between_share([[t.values[i] for t in ts] for ts in by_family.values()])}
    for family, trials in sorted(by_family.items()):
        for objective, shares in _importances(study, trials).items():
            out.setdefault(objective, {}).update(
                {k if k.startswith(f"{family}.") else f"{family}.{k}": v for k, v in shares.items()})
    return out


def _complete_by_family(study: optuna.Study) -> dict[str, list] | None:
    """The complete trials by family where the study samples the family (`arch`), else None."""
    complete = study.get_trials(deepcopy=False, states=[COMPLETE])
    if not any("arch" in t.params for t in complete):
        return None
    by_family: dict[str, list] = {}
    for t in complete:
        by_family.setdefault(t.params.get("arch", t.user_attrs.get("family")), []).append(t)
    return by_family


def _between_share(groups: list[list[float]]) -> float:
    """The share of the values' variance that lies between the groups' means (one-way ANOVA's eta squared)."""
    values = np.concatenate([np.asarray(g, dtype=float) for g in groups])
    total = float(((values - values.mean()) ** 2).sum())
    between = sum(len(g) * (float(np.mean(g)) - values.mean()) ** 2 for g in groups)
    return float(between / total) if total > 0 else 0.0


def _objective_names(study: optuna.Study) -> list[str]:
    return study.metric_names or [f"objective {i}" for i in range(len(study.directions))]


def _importances(study: optuna.Study, trials: list) -> dict[str, dict[str, float]]:
    """fANOVA shares per objective over `trials` (of `study`), for the knobs that vary among them."""
    if len(trials) < 3:
        return {}
    knobs = sorted(k for k in trials[0].params if len({repr(t.params.get(k)) for t in trials}) > 1
                   and all(k in t.params for t in trials))
    if not knobs:
        return {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the in-memory study's "created" line
    try:
        subset = optuna.create_study(directions=study.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    subset.add_trials(trials)
    out = {}
    for i, name in enumerate(_objective_names(study)):
        weighed = [k for k in knobs if k not in SHARED] if name in ("params", "latency_ms") else knobs
        if not weighed:
            continue
        try:
            shares = optuna.importance.get_param_importances(
                subset, params=weighed, target=lambda t, i=i: t.values[i],
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError):  # e.g. an objective that does not vary
            continue
        out[name] = {k: float(v) for k, v in shares.items()}
    return out


def _importance_figure(importance: dict):
    import plotly.graph_objects as go

    knobs = sorted({k for shares in importance.values() for k in shares})
    fig = go.Figure([go.Bar(name=objective, x=knobs, y=[shares.get(k, 0.0) for k in knobs])
                     for objective, shares in importance.items()])
    fig.update_layout(barmode="group", template="plotly_white", height=380, width=1100, yaxis_title="importance",
                      title="What drives each objective: parameter importance (fANOVA) over the complete trials")
    return fig


def importance_line(importance: dict, study: optuna.Study) -> str:
    """Each objective's three largest shares; where families mix, `arch` and then each family's own, with how many
    trials it was weighed over (a family with fewer than three complete trials is named as left out)."""
    def top(shares: dict) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])[:3])

    by_family = _complete_by_family(study)
    parts = []
    for objective, shares in importance.items():
        if by_family is None:
            parts.append(f"{objective}: {top(shares)}")
            continue
        text = [f"arch {shares['arch']:.2f}"] if "arch" in shares else []
        for family, n in sorted((f, len(ts)) for f, ts in by_family.items()):
            own = {k[len(family) + 1:]: v for k, v in shares.items() if k.startswith(f"{family}.")}  # may hold dots
            text.append(f"{family} ({n} trials) {top(own)}" if own else f"{family} ({n} trials) left out")
        parts.append(f"{objective}: " + "; ".join(text))
    return " | ".join(parts)


def _page(title: str, figures: list) -> str:
    html = [pio.to_html(f, full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures)]
    return f"<html><head><title>{title}</title></head><body>{''.join(html)}</body></html>"


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


def _hypervolume_png(study: optuna.Study, history: pd.DataFrame, path: Path) -> None:
    fig, axes = _two_panels(height=3.8)
    for ax, x, label in zip(axes, ("trials", "seconds"), ("complete trials", "seconds since the first trial")):
        ax.step(history[x], history["hypervolume"], where="post", marker="o", color="crimson")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hypervolume")
    fig.suptitle(f"kdsearch study '{study.study_name}': hypervolume of the front")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _search_page(study: optuna.Study, df: pd.DataFrame, history: pd.DataFrame | None) -> str:
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
    return _page(study.study_name, figures)


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
        print(front[TABLE_COLUMNS + knobs].to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
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
    return (f"KD gain of the {gain['family']} ({source}, {gain['params']:,} params; +/- one standard error over the "
            f"{gain['se_over']}): "
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


FIXED_COLUMNS = {"trial", "family", "val_acc", "test_acc", "params", "latency_ms", "flops", "mlflow_run_id", "pareto",
                 "channels", "arch", *(f"latency_{k}" for k in ("device", "threads", "batch_size", "dtype", "runtime",
                                                                 "runtime_version"))}


def _hover(df: pd.DataFrame) -> list[str]:
    knobs = [c for c in df.columns if c not in FIXED_COLUMNS] + ["channels"]
    return [f"trial {r['trial']} ({r['family']})<br>val_acc {r['val_acc']:.4f} test_acc {r['test_acc']:.4f}<br>"
            f"params {r['params']:,} latency {r['latency_ms']:.3f} ms<br>"
            + " ".join(f"{k} {r[k]:.4g}" if isinstance(r[k], float) else f"{k} {r[k]}" for k in knobs
                       if not (isinstance(r[k], float) and np.isnan(r[k])))
            + f"<br>MLflow run {r['mlflow_run_id']}" for r in df.to_dict("records")]


def _plotly_figure(df: pd.DataFrame, teacher: dict | None, name: str, latency: dict):
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
        if teacher:
            fig.add_trace(go.Scatter(x=[teacher[x]], y=[teacher["val_acc"]], mode="markers+text", text=["teacher"],
                                     textposition="bottom center", name="teacher", showlegend=first,
                                     marker={"symbol": "star", "size": 14, "color": "black"}), row=1, col=col)
        fig.update_xaxes(title_text=title, type="log" if log else "linear", row=1, col=col)
    fig.update_yaxes(title_text="validation accuracy", row=1, col=1)
    fig.update_layout(title=f"kdsearch study '{name}'", template="plotly_white", height=520, width=1100)
    return fig


def _by_family(front: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """The front's rows per student family, each with its colour (the same in every figure of a study)."""
    return [(f, FAMILY_COLOURS.get(f, "darkorange"), front[front["family"] == f])
            for f in sorted(front["family"].unique())]


def _matplotlib_figure(df: pd.DataFrame, teacher: dict | None, name: str, path: Path, latency: dict) -> None:
    fig, axes = _two_panels(height=4.5)
    for ax, (x, title, log) in zip(axes, panels(latency)):
        if len(df):
            dominated, front, stairs = df[~df["pareto"]], df[df["pareto"]], front_2d(df, x)
            ax.scatter(dominated[x], dominated["val_acc"], color="grey", alpha=0.35, label="dominated")
            for family, colour, rows in _by_family(front):
                ax.scatter(rows[x], rows["val_acc"], color=colour, label=f"Pareto-optimal {family}", zorder=3)
            ax.step(stairs[x], stairs["val_acc"], where="post", color="dimgrey")
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
