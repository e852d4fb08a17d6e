"""Property: any study file either loads into a config whose trials can be built and measured, or fails with
our one error type. Random tables mix valid keys, misspelt keys, and values of every TOML type."""

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdsearch import KdsearchError
from kdsearch.config import StudyConfig, check_values
from kdsearch.data import load_dataset
from kdsearch.measure import count_params
from kdsearch.models import build_student
from kdsearch.students import sample_student, student_spec
from kdsearch.study_file import build

SECTIONS = {name: list(getattr(StudyConfig(), name).__dataclass_fields__)
            for name in ("data", "teacher", "student", "distill", "search", "latency", "engine")}
scalars = st.one_of(st.integers(-5, 50), st.floats(-2, 30, allow_nan=False), st.booleans(),
                    st.sampled_from(["digits", "mnist", "tpe", "random", "nsga2", "gp", "none", "crop", "pareto",
                                     "budget", "median", "cpu", "x", "separable", "resnet", "auto"]),
                    st.lists(st.one_of(st.integers(-1, 8), st.floats(-1, 25, allow_nan=False)), max_size=3))


@st.composite
def study_tables(draw):
    table = {}
    for section, keys in SECTIONS.items():
        if draw(st.booleans()):
            names = draw(st.lists(st.sampled_from(keys + [keys[0] + "s", "colour"]), max_size=4, unique=True))
            table[section] = {k: draw(scalars) for k in names}
    if draw(st.booleans()):
        table[draw(st.sampled_from(["seed", "name", "sead"]))] = draw(scalars)
    return table


@pytest.fixture(scope="module")
def digits():
    return load_dataset(StudyConfig().data, seed=0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=study_tables())
def test_random_study_files_load_or_fail_with_our_error(table, digits):
    try:
        cfg = build(StudyConfig, table, "random.toml")
        check_values(cfg, "random.toml")
    except KdsearchError as e:
        assert str(e).startswith("random.toml: ") and "\n" not in str(e)
        return
    trial = optuna.create_study().ask()  # a student sampled from the file's ranges builds and counts
    family, knobs, _ = sample_student(trial, cfg)
    model = build_student(student_spec(family, knobs, digits.input_shape, digits.num_classes))
    assert count_params(model) > 0
