import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs on the real MNIST in ../shared/data (deselect with -m 'not slow')")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder, as a user would: MLflow's and Optuna's default databases land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
