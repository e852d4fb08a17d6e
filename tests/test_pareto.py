"""The Pareto front (Optuna's best_trials, as the report uses it) of hand-made points."""

import optuna
import pandas as pd

from kdsearch.charts import front_2d
from kdsearch.report import trials_frame, write_report
from kdsearch.study import DIRECTIONS

# (val_acc, params, latency_ms)
POINTS = {
    "A": (0.90, 100, 1.0),
    "B": (0.90, 100, 1.0),  # duplicate of A: neither dominates the other, both stay
    "C": (0.95, 200, 1.0),  # more accurate, larger: on the front
    "D": (0.90, 150, 1.0),  # ties A on accuracy and latency, more parameters: dominated by A
    "E": (0.80, 100, 0.5),  # least accurate but fastest: on the front
    "F": (0.85, 300, 2.0),  # worse than A on everything: dominated
}


def study_of(points: dict) -> optuna.Study:
    study = optuna.create_study(directions=DIRECTIONS["pareto"])
    dist = {"width": optuna.distributions.FloatDistribution(0.1, 4.0)}
    for i, values in enumerate(points.values()):
        study.add_trial(optuna.trial.create_trial(
            values=list(values), params={"width": 1.0 + i / 10}, distributions=dist,
            user_attrs={"test_acc": values[0] - 0.01, "mlflow_run_id": f"run{i}", "flops": 1, "channels": [4],
                        "params": values[1], "latency_ms": values[2]}))
    return study


def front_names(study: optuna.Study) -> set[str]:
    names = list(POINTS)
    return {names[n] for n in trials_frame(study).query("pareto")["trial"]}


def test_front_of_hand_made_points():
    assert front_names(study_of(POINTS)) == {"A", "B", "C", "E"}


def test_single_point_is_its_own_front():
    study = study_of({"A": (0.5, 10, 1.0)})
    assert trials_frame(study)["pareto"].tolist() == [True]


def test_staircase_of_one_panel_drops_ties_and_duplicates():
    df = pd.DataFrame({"params": [1, 1, 2, 3, 3], "val_acc": [0.5, 0.7, 0.7, 0.9, 0.9]})
    stairs = front_2d(df, "params")
    assert list(zip(stairs["params"], stairs["val_acc"])) == [(1, 0.7), (3, 0.9)]


def test_report_csv_holds_exactly_the_front(tmp_path):
    study = study_of(POINTS)
    study.set_user_attr("teacher", {"val_acc": 0.99, "params": 1000, "latency_ms": 3.0})
    front, paths = write_report(study, tmp_path)
    csv = pd.read_csv(tmp_path / "pareto.csv")
    assert sorted(csv["trial"]) == [0, 1, 2, 4]
    assert {"val_acc", "test_acc", "params", "latency_ms", "width", "mlflow_run_id"} <= set(csv.columns)
    assert all(p.stat().st_size > 0 for p in paths)
    assert "plotly" in (tmp_path / "pareto.html").read_text()[:5000].lower()
