"""Throwaway servers for tests: PostgreSQL (Debian's package) and an MLflow tracking server, both on loopback."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_postgres(password: str | None = None) -> tuple[str, callable] | None:
    """A private PostgreSQL server in a fresh folder under /tmp (the postgres user must reach it), or None where
    its binaries or the postgres user are missing. With a `password`, TCP connections must give it (SCRAM)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not bins or os.geteuid() != 0 or shutil.which("runuser") is None:
        return None
    bindir, port = Path(bins[-1]).parent, free_port()
    folder = Path(tempfile.mkdtemp(prefix="kdsearch-pg-"))
    shutil.chown(folder, "postgres", "postgres")

    def as_postgres(*cmd: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)

    if password is None:
        as_postgres(str(bindir / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "postgres")
    else:
        (folder / "pw").write_text(password)
        shutil.chown(folder / "pw", "postgres", "postgres")
        as_postgres(str(bindir / "initdb"), "-D", str(folder / "data"), "--auth-local=trust",
                    "--auth-host=scram-sha-256", f"--pwfile={folder / 'pw'}", "-U", "postgres")
        (folder / "pw").unlink()
    as_postgres(str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-w", "-l", str(folder / "log"), "-o",
                f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")

    def stop() -> None:
        as_postgres(str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)
    user = f"postgres:{password}" if password else "postgres"
    return f"postgresql+psycopg2://{user}@127.0.0.1:{port}/postgres", stop


def new_database(url: str, name: str) -> str:
    """Create database `name` on the PostgreSQL server of `url`; return its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def start_mlflow_server(folder: Path, backend: str | None = None) -> tuple[str, callable]:
    """`mlflow server` on loopback: runs in `backend` (SQLite in `folder` by default), artifacts served by the server
    from `folder`/artifacts."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--artifacts-destination", str(folder / "artifacts")],
        env={**os.environ, "MLFLOW_BACKEND_STORE_URI": backend or f"sqlite:///{folder}/mlflow.db"},  # as README
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return url, lambda: os.killpg(proc.pid, signal.SIGKILL)  # the server's uvicorn and job workers too
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start within 60 s")
