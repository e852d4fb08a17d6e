"""A user's own images: a class-per-folder tree, or `train/` with `val/` and/or `test/` beside it, each holding one
folder per class (the layout most image datasets ship in).

The splits a tree has are used as they are; a split it lacks is cut from `train/` with the study seed. Class labels
come from `train/`'s folders, so `val/` and `test/` label the same class with the same number. What would be
misread (split folders mixed with class folders, one class, an empty class, a file that is not an image) is a
one-line error naming the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdsearch import KdsearchError, first_line

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class ImageFiles(torch.utils.data.Dataset):
    """(uint8 [3, size, size] image, label) for each (path, label) of `samples`, read with PIL as RGB."""

    def __init__(self, samples: list[tuple[str, int]], size: int):
        from torchvision.transforms import v2

        self.samples, self.size = samples, size
        self.transform = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def split_folders(root: Path) -> dict[str, Path]:
    """{'train': root} for a class-per-folder tree, else the split folders found under `root`."""
    if not root.is_dir():
        raise KdsearchError(f"image folder '{root}' not found: pass --data-dir with one sub-folder per class, or "
                            "with train/ (and val/, test/) holding one sub-folder per class")
    folders = _visible_folders(root)
    named = [p for p in folders if p.name.lower() in SPLIT_NAMES]
    splits = {SPLIT_NAMES[p.name.lower()]: p for p in named}
    if len(splits) < len(named):
        split = next(s for s in splits if sum(SPLIT_NAMES[p.name.lower()] == s for p in named) > 1)
        twins = [p.name for p in named if SPLIT_NAMES[p.name.lower()] == split]
        names = [f"{n}/" for n, s in SPLIT_NAMES.items() if s == split]
        raise KdsearchError(f"image folder '{root}' has {len(twins)} folders for the {split} split "
                            f"({', '.join(twins)}): keep one of {', '.join(names)}")
    if not splits:
        return {"train": root}
    others = [p.name for p in folders if p.name.lower() not in SPLIT_NAMES]
    if others or "train" not in splits:
        found = ", ".join(p.name for p in splits.values())
        raise KdsearchError(
            f"image folder '{root}' looks like split folders ({found}) " + (f"mixed with class folders "
            f"({', '.join(others[:5])})" if others else "without train/") + ", and would be read as classes: put "
            "the class folders inside train/ (and val/, test/), or pass one split's folder as --data-dir")
    return splits


def _visible_folders(root: Path) -> list[Path]:
    """Sub-folders, leaving out hidden ones (.ipynb_checkpoints, .git, ...)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_names(train_dir: Path) -> list[str]:
    classes = [p.name for p in _visible_folders(train_dir)]
    if len(classes) < 2:
        found = f"only the class '{classes[0]}'" if classes else "no class folders"
        raise KdsearchError(f"image folder '{train_dir}' holds {found}: a classifier needs two or more, one "
                            "sub-folder of images per class")
    return classes


def samples(folder: Path, classes: list[str], train_dir: Path) -> list[tuple[str, int]]:
    """(path, label) of every image file under folder/<class>/, labelled by `classes` (train/'s folders)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    unknown = sorted({p.name for p in _visible_folders(folder)} - set(classes))
    if unknown:
        raise KdsearchError(f"image folder '{folder}' has classes that '{train_dir}' lacks ({', '.join(unknown[:5])}):"
                            " give every split the same class folders")
    found = make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS, allow_empty=True)
    if not found:
        raise KdsearchError(f"image folder '{folder}' holds no images ({', '.join(IMG_EXTENSIONS)}) in its class "
                            "folders: add images or remove the folder")
    if folder == train_dir:
        require_every_class(found, classes, folder, "hold no images")
    return found


def require_every_class(found: list[tuple[str, int]], classes: list[str], folder: Path, problem: str) -> None:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    counts = torch.bincount(torch.tensor([y for _, y in found], dtype=torch.long), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
    if empty:
        raise KdsearchError(f"image folder '{folder}': the class folder(s) {', '.join(empty[:5])} {problem} "
                            f"({', '.join(IMG_EXTENSIONS)}): add images or remove the folder")


def readable(found: list[tuple[str, int]], images: ImageFiles, keep_pixels: bool, skip: bool, root: Path
             ) -> tuple[list[tuple[str, int]], list[torch.Tensor]]:
    """The samples that decode as images (every file is read once, streamed ones too, so that a damaged file
    stops nothing mid-study), and their pixels when `keep_pixels`. Unreadable files are an error naming the first,
    or, with `skip`, left out with a printed count."""
    kept, pixels, bad = [], [], []
    for i, (path, label) in enumerate(found):
        try:
            x = images[i][0]
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for a damaged file
            bad.append((path, e))
            continue
        kept.append((path, label))
        if keep_pixels:
            pixels.append(x)
    if bad and not skip:
        raise KdsearchError(f"{len(bad)} file(s) under '{root}' cannot be read as images, the first: {bad[0][0]} "
                            f"({first_line(bad[0][1])}): remove or replace them, or set data.skip_unreadable = "
                            "true to leave them out")
    if bad:
        print(f"{root}: left out {len(bad)} unreadable file(s) (data.skip_unreadable), the first: {bad[0][0]}",
              flush=True)
    if not kept:
        raise KdsearchError(f"none of the {len(found)} files under '{root}' can be read as images: replace them")
    return kept, pixels
