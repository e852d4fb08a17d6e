"""Credentials in storage and tracking URLs (`postgresql+psycopg2://alice:PASSWORD@host/db`): masked wherever a URL
or an error is shown, and handed to worker processes through their environment, never on their command line (where
any user of the host reads it with `ps`).

A user may keep them off their own command line too: `--storage` defaults to $KDSEARCH_STORAGE, `--tracking-uri`
to MLflow's own $MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import os
import re

STORAGE_ENV = "KDSEARCH_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own
DEFAULT_STORAGE = "sqlite:///optuna.db"
# scheme://user:password@host: the password runs to the last '@' before a space or quote (SQLAlchemy takes a raw '/'
# or '@' in it); and a password given as a query parameter
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*:)[^\s'\"]*@")
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)[^&\s'\"]*", re.IGNORECASE)


def masked(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***: `postgresql://alice:***@host/db`."""
    return _QUERY.sub(lambda m: m["head"] + "***", _USERINFO.sub(lambda m: m["head"] + "***@", text))


def default_storage() -> str:
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def worker_environment(storage: str, tracking_uri: str | None) -> dict[str, str]:
    """The variables that hand a worker its stores, so its command line holds no URL."""
    return {STORAGE_ENV: storage, **({TRACKING_ENV: tracking_uri} if tracking_uri else {})}
