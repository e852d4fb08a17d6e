"""Datasets as whole uint8 tensors, split once into train / validation / test with the study seed.

The search only ever sees `train` and `val`; `test` is used for the logged `test_acc` alone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kdsearch import KdsearchError
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


def _with_statistics(name: str, train, val, test, sample: torch.Tensor) -> Dataset:
    """The dataset, with per-channel mean and std of the training images (or of a sample of them)."""
    scaled = sample.float().div_(255)
    return Dataset(
        name=name, train=train, val=val, test=test, num_classes=int(train.y.max()) + 1,
        mean=tuple(scaled.mean(dim=(0, 2, 3)).tolist()), std=tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()),
    )


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits (values 0..16), shipped inside scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    return x, torch.from_numpy(bunch.target).long()


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
    """A class-per-folder image tree, resized to size x size: read once into memory when it fits the memory
    budget, else streamed from disk by DataLoader workers every epoch."""
    ds = _image_folder_dataset(Path(cfg.data_dir), cfg.image_size)
    y = torch.tensor(ds.targets).long()
    parts = split_indices(len(y), (cfg.val_fraction, cfg.test_fraction), seed)
    shape = (3, cfg.image_size, cfg.image_size)  # ImageFolder's loader converts every image to RGB
    need_gb, budget_gb = len(y) * 3 * cfg.image_size**2 / 1e9, cfg.memory_gb or available_memory_gb() / 2
    if need_gb <= budget_gb:
        x = torch.cat([xb for xb, _ in torch.utils.data.DataLoader(ds, batch_size=256, num_workers=0)])
        train, val, test = (Split(x[i], y[i]) for i in parts)
        return _with_statistics(cfg.dataset, train, val, test, train.x)
    workers = max(1, min(8, len(os.sched_getaffinity(0))))
    print(f"{cfg.data_dir}: {need_gb:.2f} GB of images exceed the {budget_gb:.2f} GB memory budget "
          f"(data.memory_gb): streaming them from disk with {workers} DataLoader workers", flush=True)
    train, val, test = (StreamingSplit(ds, i, y[i], shape, workers) for i in parts)
    sample = torch.stack([ds[int(i)][0] for i in parts[0][:1000]])
    return _with_statistics(cfg.dataset, train, val, test, sample)


def _image_folder_dataset(root: Path, size: int):
    import torchvision
    from torchvision.transforms import v2

    if not root.is_dir():
        raise KdsearchError(f"image folder '{root}' not found: pass --data-dir with one sub-folder per class")
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])
    try:
        return torchvision.datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise KdsearchError(f"image folder '{root}': {e}; put images in one sub-folder per class") from None


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
