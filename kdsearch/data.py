"""Datasets as whole uint8 tensors, split once into train / validation / test with the study seed.

The search only ever sees `train` and `val`; `test` is used for the logged `test_acc` alone.
"""

from __future__ import annotations

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
    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


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
        return tuple(self.train.x.shape[1:])


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
        x, y = _image_folder(Path(cfg.data_dir), cfg.image_size)
        train_idx, val_idx, test_idx = split_indices(len(y), (cfg.val_fraction, cfg.test_fraction), seed)
        train, val, test = (Split(x[i], y[i]) for i in (train_idx, val_idx, test_idx))
    else:
        full, test = (_torchvision(cfg, train=t) for t in (True, False))
        train_idx, val_idx = split_indices(len(full), (cfg.val_fraction,), seed)
        train, val = Split(full.x[train_idx], full.y[train_idx]), Split(full.x[val_idx], full.y[val_idx])
    scaled = train.x.float().div_(255)
    return Dataset(
        name=cfg.dataset, train=train, val=val, test=test, num_classes=int(train.y.max()) + 1,
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


def _image_folder(root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-per-folder image tree, resized to size x size, read once into memory."""
    import torchvision
    from torchvision.transforms import v2

    if not root.is_dir():
        raise KdsearchError(f"image folder '{root}' not found: pass --data-dir with one sub-folder per class")
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])
    try:
        ds = torchvision.datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise KdsearchError(f"image folder '{root}': {e}; put images in one sub-folder per class") from None
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=0)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys).long()



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
