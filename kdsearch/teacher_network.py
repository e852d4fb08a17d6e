"""The teacher's network: the [teacher] architecture, built untrained (a convnet or a torchvision model adapted to
the data), or the user's checkpoint (a state_dict, a torch.export program or TorchScript), read and checked
against the data's shape and classes.
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdsearch import KdsearchError, first_line
from kdsearch.config import StudyConfig
from kdsearch.data import Dataset
from kdsearch.models import Architecture, build_model


def teacher_arch(cfg: StudyConfig, data: Dataset) -> Architecture:
    t = cfg.teacher
    return Architecture(data.input_shape[0], data.num_classes, t.width, t.depth, t.convs_per_stage)


def build_teacher(cfg: StudyConfig, data: Dataset) -> nn.Module:
    """The [teacher] architecture, untrained: a convnet or a torchvision model adapted to the data."""
    if cfg.teacher.arch.startswith("torchvision:"):
        return torchvision_model(cfg.teacher.arch.partition(":")[2], data.input_shape, data.num_classes)
    return build_model(teacher_arch(cfg, data), data.input_shape[1])


def build_or_load(cfg: StudyConfig, data: Dataset) -> nn.Module:
    if not cfg.teacher.checkpoint:
        return build_teacher(cfg, data)
    path = Path(cfg.teacher.checkpoint)  # teacher_key has checked that it exists
    model = load_checkpoint(path)
    if model is None:
        model = build_teacher(cfg, data)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(model, TorchvisionTeacher) and not any(k.startswith("model.") for k in state):
                model = _torchvision_state(model, state)  # the torchvision model's own state_dict
            else:
                model.load_state_dict(state)
        except Exception as e:
            raise KdsearchError(
                f"teacher checkpoint {path} is neither a torch.export program (.pt2), TorchScript nor a state_dict "
                f"of the [teacher] architecture ({first_line(e)}): check teacher.arch/width/depth/convs_per_stage"
            ) from None
    _check_output(model, data, path)
    return model


def _torchvision_state(model: TorchvisionTeacher, state: dict) -> TorchvisionTeacher:
    model.model.load_state_dict(state)
    if model.to_rgb is not None:
        raise KdsearchError("a torchvision state_dict has no weights for the layer that maps this data's channels "
                            "to 3: save the whole kdsearch teacher's state_dict instead")
    return model


def _check_output(model: nn.Module, data: Dataset, path: Path) -> None:
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(3, *data.input_shape))
    except Exception as e:
        hint = (" exported with a dynamic batch size (dynamic_shapes={'x': {0: torch.export.Dim('batch')}})"
                if isinstance(model, ExportedModule) else "")
        raise KdsearchError(f"teacher checkpoint {path} does not accept images of shape {data.input_shape} "
                            f"({first_line(e)}): use a teacher made for {data.name}{hint}") from None
    if out.shape != (3, data.num_classes):
        raise KdsearchError(f"teacher checkpoint {path} gives {tuple(out.shape)[1:]} outputs, the data has "
                            f"{data.num_classes} classes: use a teacher made for {data.name}")


def file_sha(path: Path) -> str:
    if not path.is_file():
        raise KdsearchError(f"teacher checkpoint {path} not found: fix teacher.checkpoint or leave it empty "
                            "to train one")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class TorchvisionTeacher(nn.Module):
    """A torchvision classifier fitted to the data: images with other than 3 channels go through a learned 1x1 conv
    (grey ones are repeated), and images too small for the model are upsampled to the smallest size it takes."""

    def __init__(self, model: nn.Module, in_channels: int, size: int | None):
        super().__init__()
        self.model = model
        self.to_rgb = nn.Conv2d(in_channels, 3, 1) if in_channels not in (1, 3) else None
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_rgb(x) if self.to_rgb is not None else x.expand(-1, 3, -1, -1)
        if self.size is not None:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.model(x)
        return out if isinstance(out, torch.Tensor) else out.logits  # inception-style outputs in training mode


def torchvision_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> TorchvisionTeacher:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        near = difflib.get_close_matches(name, known, n=3)
        raise KdsearchError(f"teacher.arch = 'torchvision:{name}' is not a torchvision classification model: "
                            f"use one of {', '.join(near) if near else 'torchvision.models.list_models()'}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    for size in (None, 32, 64, 96, 128, 224, 299):
        if size is not None and size <= input_shape[1]:
            continue
        teacher = TorchvisionTeacher(model, input_shape[0], size)
        try:
            with torch.no_grad():
                teacher.eval()(torch.zeros(2, *input_shape))
        except Exception:  # too small for the model (RuntimeError), or a fixed input size (vision transformers)
            continue
        return teacher.train()
    raise KdsearchError(f"teacher.arch = 'torchvision:{name}' accepts none of the image sizes tried up to 299: pick "
                        "another model")


class ExportedModule(nn.Module):
    """A torch.export program (.pt2) as a module. It runs as it was exported (a teacher in eval mode): `train()`
    and `eval()` leave it alone, which the program's own module does not allow."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def load_checkpoint(path: Path) -> nn.Module | None:
    """A whole model from a torch.export (.pt2) or TorchScript file; None for anything else (a state_dict)."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    try:
        if any(n.endswith("/archive_format") for n in names):
            return ExportedModule(torch.export.load(str(path)).module())
        if any("/code/" in n for n in names):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load is deprecated; a user's TorchScript file still works
                return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise KdsearchError(f"teacher checkpoint {path} does not load ({first_line(e)[:200]}): export it again with "
                            "torch.export.save (or torch.jit.save)") from None
    return None  # torch.save's archive: a state_dict
