"""Datasets as whole uint8 tensors, split once into train / validation / test with the study seed.

The search only ever sees `train` and `val`; `test` is used for the logged `test_acc` alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kdsearch import KdsearchError, imagefolder
from kdsearch.config import DataConfig

TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
EXPECTED_FILES = {
    "mnist": "MNIST/raw/train-images-idx3-ubyte (and the other three idx files)",
    "fashion-mnist": "FashionMNIST/raw/train-images-idx3-ubyte (and the other three idx files)",
    "cifar10": "cifar-10-batches-py/data_batch_1 ... data_batch_5 and test_batch",
}


@dataclass
class Split:
    """Images held as one tensor, batched by slicing."""

    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """(positions, images, labels) for each slice of `order`."""
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield idx, self.x[idx], self.y[idx]


@dataclass
class StreamingSplit:
    """Images read from disk by DataLoader workers, for datasets too large to hold in memory; batches come in
    the same order, and so give the same training, as from a `Split`."""

    dataset: torch.utils.data.Dataset  # yields (uint8 image, label)
    indices: torch.Tensor  # positions in `dataset`
    y: torch.Tensor  # labels, on `device`
    shape: tuple[int, int, int]
    workers: int = 2
    device: str = "cpu"

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.shape

    def to(self, device: torch.device | str) -> StreamingSplit:
        return dataclasses.replace(self, y=self.y.to(device), device=str(device))

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        subset = torch.utils.data.Subset(self.dataset, self.indices[order.cpu()].tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=self.workers,
                                             pin_memory=self.device.startswith("cuda"))
        for i, (x, y) in enumerate(loader):
            idx = order[i * batch_size:(i + 1) * batch_size]
            yield idx, x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()  # names, where the data has them
    fingerprint: str = ""  # what was loaded (see `fingerprint`): part of the teacher cache's key

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.input_shape


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Shuffle range(n) with `seed` and cut off one part per fraction; the rest comes first."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [round(n * f) for f in fractions]
    rest = n - sum(sizes)
    return list(torch.split(order, [rest, *sizes]))


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    data = _load(cfg, seed)
    return dataclasses.replace(data, fingerprint=fingerprint(data))


def fingerprint(data: Dataset) -> str:
    """A digest of what was loaded: every image and label of each split (for a streamed image folder, its files'
    paths, sizes and modification times), and the class names. Two datasets share it only when they are the same."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([data.name, data.num_classes, list(data.classes)]).encode())
    for split in (data.train, data.val, data.test):
        if isinstance(split, StreamingSplit):
            files = [split.dataset.samples[i] for i in split.indices.tolist()]
            h.update(json.dumps([(p, y, *_stat(p)) for p, y in files]).encode())
        else:
            h.update(split.x.cpu().contiguous().numpy())
        h.update(split.y.cpu().contiguous().numpy())
    return h.hexdigest()


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _load(cfg: DataConfig, seed: int) -> Dataset:
    if cfg.dataset == "digits":
        x, y = _digits()
        train_idx, val_idx, test_idx = split_indices(len(y), (cfg.val_fraction, cfg.test_fraction), seed)
        train, val, test = (Split(x[i], y[i]) for i in (train_idx, val_idx, test_idx))
    elif cfg.dataset == "imagefolder":
        return _image_folder(cfg, seed)
    else:
        full, test = (_torchvision(cfg, train=t) for t in (True, False))
        train_idx, val_idx = split_indices(len(full), (cfg.val_fraction,), seed)
        train, val = Split(full.x[train_idx], full.y[train_idx]), Split(full.x[val_idx], full.y[val_idx])
    return _with_statistics(cfg.dataset, train, val, test, train.x)


def _with_statistics(name: str, train, val, test, sample: torch.Tensor, num_classes: int | None = None) -> Dataset:
    """The dataset, with per-channel mean and std of the training images (or of a sample of them)."""
    scaled = sample.float().div_(255)
    return Dataset(
        name=name, train=train, val=val, test=test, num_classes=num_classes or int(train.y.max()) + 1,
        mean=tuple(scaled.mean(dim=(0, 2, 3)).tolist()), std=tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()),
    )


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits (values 0..16), shipped inside scikit-learn. Its file is read as
    `sklearn.datasets.load_digits` reads it, without importing scikit-learn (1.1-1.6 s of a study's start)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise KdsearchError("the digits dataset ships inside scikit-learn, which is not installed: "
                            "pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    try:
        table = np.loadtxt(path, delimiter=",")
    except (OSError, ValueError) as e:
        raise KdsearchError(f"the digits dataset could not be read from scikit-learn ({e}): reinstall it with "
                            "pip install --force-reinstall scikit-learn") from None
    x = torch.from_numpy(table[:, :-1]).view(-1, 1, 8, 8).mul(255 / 16).round().to(torch.uint8)
    return x, torch.from_numpy(table[:, -1]).long()


def _torchvision(cfg: DataConfig, train: bool) -> Split:
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION[cfg.dataset])
    try:
        ds = cls(root=cfg.data_dir, train=train, download=cfg.download)
    except RuntimeError as e:
        raise KdsearchError(
            f"{cfg.dataset} not found in data folder '{cfg.data_dir}' ({e}): expected "
            f"{cfg.data_dir}/{EXPECTED_FILES[cfg.dataset]}; pass --data-dir or set data.download = true"
        ) from None
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # grey [N,H,W] or colour [N,H,W,C]
    return Split(x.contiguous(), torch.as_tensor(ds.targets).long())


def _image_folder(cfg: DataConfig, seed: int) -> Dataset:
    """An image tree (see `kdsearch.imagefolder`), resized to size x size: read once into memory when it fits the
    memory budget, else streamed from disk by DataLoader workers every epoch."""
    root, size = Path(cfg.data_dir), cfg.image_size
    folders = imagefolder.split_folders(root)
    classes = imagefolder.class_names(folders["train"])
    found = {name: imagefolder.samples(path, classes, folders["train"]) for name, path in folders.items()}
    need_gb = sum(map(len, found.values())) * 3 * size**2 / 1e9
    budget_gb = cfg.memory_gb or available_memory_gb() / 2
    stream = need_gb > budget_gb
    sources = {}  # split -> (samples, uint8 images, or None when streamed)
    for name, items in found.items():
        kept, pixels = imagefolder.readable(items, imagefolder.ImageFiles(items, size), not stream,
                                            cfg.skip_unreadable, folders[name])
        sources[name] = (kept, torch.stack(pixels) if pixels else None)
    imagefolder.require_every_class(sources["train"][0], classes, folders["train"], "hold no readable images")
    parts = _parts_of(sources, cfg, seed)
    if not stream:
        train, val, test = (Split(sources[src][1][i], _labels(sources[src][0])[i]) for src, i in parts)
        data = _with_statistics(cfg.dataset, train, val, test, train.x, len(classes))
    else:
        workers = max(1, min(8, len(os.sched_getaffinity(0))))
        print(f"{root}: {need_gb:.2f} GB of images exceed the {budget_gb:.2f} GB memory budget "
              f"(data.memory_gb): streaming them from disk with {workers} DataLoader workers", flush=True)
        train, val, test = (StreamingSplit(imagefolder.ImageFiles(sources[src][0], size), i,
                                           _labels(sources[src][0])[i], (3, size, size), workers) for src, i in parts)
        sample = torch.stack([train.dataset[int(i)][0] for i in train.indices[:1000]])
        data = _with_statistics(cfg.dataset, train, val, test, sample, len(classes))
    cut = [name for name in ("val", "test") if name not in folders]
    present = " and ".join(f"{n}/" for n in ("train", "val", "test") if n in folders)
    where = ("one tree" if len(folders) == 1 else present) + (f"; {' and '.join(cut)} cut from it" if cut else "")
    print(f"{root}: {len(classes)} classes ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); "
          f"train {len(train)}, val {len(val)}, test {len(test)} images ({where})", flush=True)
    return dataclasses.replace(data, classes=tuple(classes))


def _parts_of(sources: dict, cfg: DataConfig, seed: int) -> list[tuple[str, torch.Tensor]]:
    """(source split, positions in it) for train, val and test: a split the tree lacks is cut from train with
    the study seed."""
    missing = [name for name in ("val", "test") if name not in sources]
    fractions = tuple(cfg.val_fraction if name == "val" else cfg.test_fraction for name in missing)
    rest, *cut = split_indices(len(sources["train"][0]), fractions, seed)
    parts = {"train": ("train", rest), **{name: ("train", idx) for name, idx in zip(missing, cut)}}
    for name in ("val", "test"):
        if name not in parts:
            parts[name] = (name, torch.arange(len(sources[name][0])))
    return [parts["train"], parts["val"], parts["test"]]


def _labels(items: list[tuple[str, int]]) -> torch.Tensor:
    return torch.tensor([y for _, y in items], dtype=torch.long)


def available_memory_gb() -> float:
    """MemAvailable from /proc/meminfo; 8 GB where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return 8.0


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding of `pad` pixels) and, for 'crop-flip', random horizontal flip, for a whole
    batch at once on its device: one gather, no per-image Python."""
    if kind == "none":
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, b, 1), generator=gen, device=x.device))
    rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # [B, H, W, C]
    out = out.permute(0, 3, 1, 2)
    if kind == "crop-flip":
        flip = torch.rand(b, generator=gen, device=x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out
