"""The fixed teacher: trained once per (data, architecture, training settings, seed), cached on disk with its
logits over the training set so that no trial runs the teacher again."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from torch import nn

from kdsearch import KdsearchError, first_line
from kdsearch.config import StudyConfig
from kdsearch.data import Dataset
from kdsearch.distill import Normalizer, TrainSettings, accuracy, fit, split_logits
from kdsearch.engine import prepare_model, uses_bf16
from kdsearch.execution import InProcess
from kdsearch.measure import count_flops, count_params
from kdsearch.models import FAMILY_VERSION
from kdsearch.progress import Progress
from kdsearch.shared_teacher import DIGEST, HOST, PRECISE_KEY, TeacherRun
from kdsearch.teacher_network import build_or_load, build_teacher, file_sha
from kdsearch.timing_lock import training_epoch


@dataclass
class Teacher:
    """The study's teacher on this host, ready for the trials."""

    model: nn.Module
    train_logits: torch.Tensor  # [N_train, classes], on the training device
    metrics: dict  # val_acc, test_acc, params, flops, latency_ms
    key: str
    latency_timed_now: bool = False  # latency_ms was measured by this process (not read from the cache)
    source: str = "trained here"  # where this host's teacher came from, said when the session opens
    run_id: str | None = None  # the study's MLflow teacher run that holds it, when shared

    def targets(self, augment: str) -> torch.Tensor | nn.Module:
        """What the distillation loop needs: the cached logits, or the model itself when images are augmented."""
        return self.train_logits if augment == "none" else self.model


def teacher_key(cfg: StudyConfig, data: Dataset, device: torch.device | None = None, bf16: bool | None = None) -> str:
    """Study settings that shape the teacher, the identity of the data it learns from (`data.fingerprint`: what was
    loaded, wherever it was loaded from) and, on `device` (or as `bf16` says), the precision it trains in (bf16
    autocast where the device computes bf16 natively). In fp32: the key as it was before it held the precision."""
    settings = asdict(cfg.data)
    for key in ("data_dir", "download", "skip_unreadable", "memory_gb"):
        settings.pop(key)
    fields = {"data": settings, "data_fingerprint": data.fingerprint, "teacher": asdict(cfg.teacher),
              "seed": cfg.seed, "family": FAMILY_VERSION}
    if cfg.teacher.checkpoint:
        fields["checkpoint_sha"] = file_sha(Path(cfg.teacher.checkpoint))
    if bf16 is None:
        bf16 = device is not None and uses_bf16(device)
    if bf16 and not cfg.teacher.checkpoint:  # a checkpoint is not trained here
        fields["precision"] = "bf16"
    text = json.dumps(fields, sort_keys=True)
    return f"{cfg.data.dataset}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def get_teacher(cfg: StudyConfig, data: Dataset, device: torch.device, cache_dir: Path, key: str | None = None,
                shared: TeacherRun | None = None) -> Teacher:
    """The teacher `key` (this host's own key by default): from this host's cache, from the study's MLflow teacher
    run (`shared`), or trained here (or read from the user's checkpoint), measured and cached, then logged to that
    run for the study's other hosts."""
    own_key = teacher_key(cfg, data, device)
    key = key or own_key
    if shared is None:
        return _local_teacher(cfg, data, device, cache_dir / "teachers" / key, key, trainable=True)
    try:
        return _shared_teacher(cfg, data, device, cache_dir, key, own_key, shared)
    except MlflowException as e:
        raise KdsearchError(f"cannot share the study's teacher through the MLflow tracking store "
                            f"({first_line(e)[:200]}): check --tracking-uri and that its server is running and "
                            "writable") from None


def _shared_teacher(cfg: StudyConfig, data: Dataset, device: torch.device, cache_dir: Path, key: str, own_key: str,
                    shared: TeacherRun) -> Teacher:
    while True:  # hosts claim the teacher by its key in fp32, so a bf16 host and an fp32 one share one teacher
        ready = shared.ready()
        if ready is not None:
            key = ready.data.tags.get(PRECISE_KEY, key)  # the precision it was made in
            return _study_teacher(cfg, data, device, cache_dir / "teachers" / key, key, ready, shared)
        run_id = shared.claim()
        if run_id is None:
            shared.wait()
            continue
        folder = cache_dir / "teachers" / key
        with shared.providing(run_id):
            teacher = _local_teacher(cfg, data, device, folder, key, trainable=key == own_key,
                                     on_epoch=functools.partial(shared.log_epoch, run_id))
            published = shared.publish(run_id, folder, teacher.metrics["digest"], key)
        if published:
            teacher.run_id = run_id
            return teacher
        shutil.rmtree(folder, ignore_errors=True)  # another host took over (this one's heartbeat lapsed): the
        # study's teacher is the one it provides


def _study_teacher(cfg: StudyConfig, data: Dataset, device: torch.device, folder: Path, key: str, run: Run,
                   shared: TeacherRun) -> Teacher:
    """The study's teacher from its ready MLflow run: this host's cache when it holds the same one (refused when it
    holds another), else the run's files, downloaded into the cache."""
    study_digest = run.data.tags.get(DIGEST)
    if (folder / "meta.json").is_file() and _load_cached(folder, cfg, data, device, "loading the study's") is None:
        shutil.rmtree(folder)  # damaged: the study's run holds the teacher
    if (folder / "meta.json").is_file():
        source = "this host's cache (the study's teacher)"
    else:
        shared.download(run, folder)
        _forget_latency(folder)  # timed on the host that made it: this host times it itself
        source = f"the study's MLflow run {run.info.run_id}"
    teacher = _local_teacher(cfg, data, device, folder, key, trainable=False)
    if teacher.metrics["digest"] != study_digest:
        raise KdsearchError(f"this host's cached teacher {folder} differs from the study's teacher (MLflow run "
                            f"{run.info.run_id}, from {run.data.tags.get(HOST, 'another host')}; digest "
                            f"{teacher.metrics['digest']} against {study_digest}): delete {folder} so that this host "
                            "loads the study's teacher, or pass another --cache-dir")
    teacher.source, teacher.run_id = source, run.info.run_id
    return teacher


def _local_teacher(cfg: StudyConfig, data: Dataset, device: torch.device, folder: Path, key: str, trainable: bool,
                   on_epoch=None) -> Teacher:
    """The teacher in this host's cache `folder`, or (when `trainable`) trained here, measured and cached."""
    normalize = Normalizer(data.mean, data.std, device)
    if (folder / "meta.json").is_file():
        cached = _load_cached(folder, cfg, data, device)
        if cached is not None:
            model, logits, metrics = cached
            timed_now = _latency_key(cfg) not in metrics.get("latency_ms_by_settings", {})
            if "digest" not in metrics:  # cached before teachers were shared
                metrics["digest"] = weights_digest(model, logits, bool(cfg.teacher.checkpoint))
            metrics["latency_ms"] = _latency(folder, metrics, model, data, cfg)
            return Teacher(prepare_model(model, device).eval(), logits, metrics, key, timed_now,
                           "this host's cache")
    if not trainable:
        raise KdsearchError(f"the study's teacher {key} trains in another precision (bf16 on a GPU host, fp32 on a "
                            "CPU) and the study's MLflow tracking store holds no finished copy: let a host of that "
                            "precision train it (or finish), pass the study's --tracking-uri, or copy that host's "
                            "cache entry here")
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_or_load(cfg, data), device)
    if not cfg.teacher.checkpoint:
        train_teacher(model, cfg, data, device, normalize, on_epoch)
    logits = split_logits(model, data.train.to(device), normalize)
    metrics = {
        "val_acc": accuracy(model, data.val.to(device), normalize),
        "test_acc": accuracy(model, data.test.to(device), normalize),
        "params": count_params(model),
        "flops": count_flops(model.cpu(), data.input_shape),
        "seconds": time.perf_counter() - started,  # training, logit cache and measurement, paid once
        "finished_at": time.time(),
        "digest": weights_digest(model, logits, bool(cfg.teacher.checkpoint)),
    }
    _save(folder, model.cpu(), logits, metrics, bool(cfg.teacher.checkpoint))
    metrics["latency_ms"] = _latency(folder, metrics, model, data, cfg)
    return Teacher(prepare_model(model, device).eval(), logits, metrics, key, True,
                   "read from its checkpoint" if cfg.teacher.checkpoint else "trained here")


def train_teacher(model: nn.Module, cfg: StudyConfig, data: Dataset, device: torch.device, normalize: Normalizer,
                  on_epoch=None) -> None:
    """Train the [teacher] in place on the training images (plain cross-entropy), showing its epochs' progress."""
    t = cfg.teacher
    settings = TrainSettings(epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, weight_decay=t.weight_decay,
                             seed=cfg.seed, augment=cfg.data.augment)
    progress = Progress("training the teacher, epoch", t.epochs)

    def epoch_done(epoch: int, loss: float, acc: float) -> None:
        progress.update(epoch, f"val_acc {acc:.4f}")
        if on_epoch is not None:
            on_epoch(epoch, loss, acc)
    fit(model, data.train.to(device), data.val.to(device), normalize, settings, epoch_guard=training_epoch,
        on_epoch=epoch_done)


def weights_digest(model: nn.Module, logits: torch.Tensor, from_checkpoint: bool) -> str:
    """What identifies a teacher's figures: its logits over the training images and (unless they are the user's
    checkpoint file, which the key holds) its weights."""
    h = hashlib.sha256(logits.detach().float().cpu().contiguous().numpy().tobytes())
    if not from_checkpoint:
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _forget_latency(folder: Path) -> None:
    """A downloaded entry's figures that this host measures itself: its latency, and its digest (checked again)."""
    meta = json.loads((folder / "meta.json").read_text())
    meta.pop("latency_ms_by_settings", None)
    meta.pop("digest", None)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _latency_key(cfg: StudyConfig) -> str:
    settings = asdict(cfg.latency)
    settings.pop("min_run_time")  # how long it is timed, not what is timed
    return json.dumps(settings, sort_keys=True)


def _latency(folder: Path, metrics: dict, model: nn.Module, data: Dataset, cfg: StudyConfig) -> float:
    """The teacher's latency under the study's [latency] settings: measured once per settings, kept in meta.json."""
    key = _latency_key(cfg)
    known = metrics.setdefault("latency_ms_by_settings", {})
    if key not in known:
        known[key] = InProcess().measure_latency(model, data.input_shape, cfg.latency, what=_what(cfg),
                                                 normalize=(data.mean, data.std)).median_ms
        tmp = folder / f".meta-{os.getpid()}.json"
        tmp.write_text(json.dumps(metrics, indent=1))
        os.replace(tmp, folder / "meta.json")
    return known[key]


def _what(cfg: StudyConfig) -> str:
    return f"the teacher ({cfg.teacher.checkpoint or cfg.teacher.arch})"


def _save(folder: Path, model: nn.Module, logits: torch.Tensor, metrics: dict, from_checkpoint: bool) -> None:
    """Write into a temporary folder, then rename: a crash never leaves a half-written cache entry."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    if not from_checkpoint:  # a checkpoint's teacher is read from the checkpoint itself
        torch.save(model.state_dict(), tmp / "teacher.pt")
    torch.save(logits.cpu(), tmp / "train_logits.pt")
    (tmp / "meta.json").write_text(json.dumps(metrics, indent=1))
    if folder.exists():  # a stale entry that did not match its data (see _load_cached): set it aside
        stale = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".stale-"))
        with contextlib.suppress(OSError):
            os.rename(folder, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process cached the same teacher first; theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(folder: Path, cfg: StudyConfig, data: Dataset, device: torch.device, instead: str = "building"
                 ) -> tuple[nn.Module, torch.Tensor, dict] | None:
    """The cached teacher, its logits and metrics; None (after saying why) when the entry does not fit the data:
    a model that does not load, or logits without one row per training image and one column per class."""
    try:
        if cfg.teacher.checkpoint:  # the key holds the checkpoint's digest: the file is what was cached
            model = build_or_load(cfg, data)
        else:
            model = build_teacher(cfg, data)
            model.load_state_dict(torch.load(folder / "teacher.pt", map_location="cpu", weights_only=True))
        logits = torch.load(folder / "train_logits.pt", map_location=device, weights_only=True)
        metrics = json.loads((folder / "meta.json").read_text())
    except Exception as e:  # a damaged or foreign cache entry: rebuilt below
        problem = first_line(e)[:200]
    else:
        if tuple(logits.shape) == (len(data.train), data.num_classes):
            return model, logits, metrics
        problem = f"logits of shape {tuple(logits.shape)} for {len(data.train)} images of {data.num_classes} classes"
    print(f"cached teacher {folder} does not match the data ({problem}): {instead} it again", flush=True)
    return None
