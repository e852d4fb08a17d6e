"""One teacher for a study, whatever the number of machines: the study's teacher run in MLflow holds its weights,
logits and metrics as artifacts. The first host to claim that run trains the teacher (or reads its own cache) and
logs them; every other host waits for them and loads them into its cache instead of training its own.

A claim is a RUNNING teacher run: every host creates one, then the oldest live one wins and the others delete
theirs. The winner sets a heartbeat tag while it trains, so a host that died is not waited for past
`search.grace_period`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from kdsearch import KdsearchError, first_line
from kdsearch.tracking import ROLE, log_values

KEY, STATE, DIGEST = "kdsearch.teacher_key", "kdsearch.teacher_state", "kdsearch.teacher_digest"
PRECISE_KEY = "kdsearch.teacher_key_made"  # the key with the precision the provider trained in (`teacher_key`)
HOST, HEARTBEAT = "kdsearch.host", "kdsearch.heartbeat"
ARTIFACTS = "teacher"  # the run's artifact folder: teacher.pt (a trained teacher), train_logits.pt, meta.json


def this_host() -> str:
    return f"{socket.gethostname()} (pid {os.getpid()})"


class TeacherRun:
    """The study's teacher run for teacher `key` (its key in fp32, whatever precision its provider trains in) in
    experiment `exp_id`."""

    def __init__(self, client: MlflowClient, exp_id: str, key: str, heartbeat_s: float, grace_s: float,
                 poll_s: float = 2.0):
        self.client, self.exp_id, self.key = client, exp_id, key
        self.heartbeat_s, self.grace_s, self.poll_s = heartbeat_s, grace_s, poll_s

    def runs(self) -> list[Run]:
        """This key's teacher runs that hold or will hold the teacher, oldest first."""
        found = self.client.search_runs([self.exp_id], f"tags.`{ROLE}` = 'teacher' and tags.`{KEY}` = '{self.key}'",
                                        order_by=["attributes.start_time ASC"])
        return sorted((r for r in found if r.data.tags.get(STATE) in ("training", "ready")),
                      key=lambda r: (r.info.start_time, r.info.run_id))

    def ready(self) -> Run | None:
        return next((r for r in self.runs() if r.data.tags[STATE] == "ready"), None)

    def claim(self) -> str | None:
        """This host's teacher run when it is to provide the teacher, else None (another live host provides it)."""
        run = self.client.create_run(self.exp_id, run_name=f"teacher {self.key}", tags={
            ROLE: "teacher", KEY: self.key, STATE: "training", HOST: this_host(), HEARTBEAT: str(time.time())})
        mine = run.info.run_id
        live = [r for r in self.runs() if r.data.tags[STATE] == "ready" or r.info.run_id == mine or self.alive(r)]
        if live[0].info.run_id == mine:
            return mine
        self.client.delete_run(mine)
        return None

    def alive(self, run: Run) -> bool:
        """A training run whose host beat within the grace period; a dead one is closed as FAILED."""
        if time.time() - float(run.data.tags.get(HEARTBEAT, 0)) < self.grace_s:
            return True
        with contextlib.suppress(Exception):  # another host may close it first
            self.client.set_tag(run.info.run_id, STATE, "abandoned")
            self.client.set_terminated(run.info.run_id, "FAILED")
        return False

    def wait(self) -> None:
        """Wait while another live host trains the teacher: until it is ready, or that host stopped."""
        said = None
        while True:
            runs = self.runs()
            if not runs or runs[0].data.tags[STATE] == "ready" or not self.alive(runs[0]):
                return
            host = runs[0].data.tags.get(HOST, "another host")
            epoch = runs[0].data.metrics.get("epoch")
            line = f"waiting for the teacher that {host} trains (MLflow run {runs[0].info.run_id})" + (
                f": epoch {epoch:.0f}, val_acc {runs[0].data.metrics.get('val_acc', 0):.4f}" if epoch else "")
            if line != said:
                print(line, flush=True)
                said = line
            time.sleep(self.poll_s)

    @contextlib.contextmanager
    def providing(self, run_id: str):
        """Beat while this host provides the teacher; a failure (or Ctrl-C) closes the run so others take over."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                with contextlib.suppress(Exception):  # a missed beat only shortens the others' patience
                    self.client.set_tag(run_id, HEARTBEAT, str(time.time()))
        thread = threading.Thread(target=beat, name="kdsearch-teacher-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.set_tag(run_id, STATE, "abandoned")
                self.client.set_terminated(run_id, "FAILED")
            raise
        finally:
            stop.set()
            thread.join()

    def log_epoch(self, run_id: str, epoch: int, loss: float, val_acc: float) -> None:
        with contextlib.suppress(Exception):  # progress others read; never worth failing the teacher for
            log_values(self.client, run_id, metrics={"epoch": epoch, "train_loss": loss, "val_acc": val_acc},
                       step=epoch)

    def publish(self, run_id: str, folder: Path, digest: str, made_key: str) -> bool:
        """Log the cached teacher's files as the run's artifacts, then mark it ready (others load it from then).
        False, publishing nothing, when another host has taken the claim over (this host's heartbeat lapsed)."""
        if self.client.get_run(run_id).data.tags.get(STATE) != "training":
            return False
        self.client.log_artifacts(run_id, str(folder), ARTIFACTS)
        self.client.set_tag(run_id, DIGEST, digest)
        self.client.set_tag(run_id, PRECISE_KEY, made_key)
        self.client.set_tag(run_id, STATE, "ready")
        self.client.set_terminated(run_id, "FINISHED")
        return True

    def download(self, run: Run, folder: Path) -> None:
        """The ready run's files into this host's cache `folder` (atomically: a crash leaves no half entry)."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".download-"))
        try:
            got = Path(self.client.download_artifacts(run.info.run_id, ARTIFACTS, str(tmp)))
            os.rename(got, tmp / "entry")
            try:
                os.rename(tmp / "entry", folder)
            except OSError:  # another process on this host put it there first
                pass
        except OSError as e:
            raise KdsearchError(f"cannot load the study's teacher from MLflow run {run.info.run_id} into "
                                f"{folder} ({first_line(e)}): check that this host can write --cache-dir") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
