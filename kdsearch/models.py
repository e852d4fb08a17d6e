"""The CNN family used for teachers and students.

`convnet`: `depth` stages of `convs_per_stage` x (3x3 conv without bias, BatchNorm, ReLU), stage i having
`width * 2**i` channels; the last conv of a stage is followed by a 2x2 max-pool (while the image is larger than
1x1) before its BatchNorm and ReLU, as in airbench: the normalisation then runs on a quarter of the pixels, which
made a CPU training step 1.4x faster. Then global average pooling and one linear layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

FAMILY_VERSION = 2  # bump when a change makes old state_dicts (and cached teachers) meaningless


@dataclass(frozen=True)
class Architecture:
    in_channels: int
    num_classes: int
    width: int  # channels of the first stage
    depth: int
    convs_per_stage: int = 1

    def channels(self) -> list[int]:
        return [self.width * 2**i for i in range(self.depth)]

    def to_dict(self) -> dict:
        return asdict(self)


def student_width(base_width: int, multiplier: float) -> int:
    return max(1, round(base_width * multiplier))


class MaxPool2x2(nn.MaxPool2d):
    """A 2x2 max-pool. CPU inference on a batch of channels_last maps takes the maxima of four strided views: the
    same values, without the indices that aten's kernel always writes for a backward pass (evaluation of the MNIST
    students 1.2-2.3x faster here). Training, small batches (latency), GPUs, tracing, scripting and export use
    aten's kernel."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles only the kernel below
            if _inference_batch(x):
                return _max_of_strided_views(x)
        return F.max_pool2d(x, 2)


def _inference_batch(x: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled() and len(x) >= 64 and x.device.type == "cpu" and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and x.is_contiguous(memory_format=torch.channels_last))


def _max_of_strided_views(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    v = x.permute(0, 2, 3, 1)[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    rows = torch.maximum(v[:, :, 0], v[:, :, 1])
    return torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).permute(0, 3, 1, 2)


class ConvNet(nn.Module):
    def __init__(self, arch: Architecture, image_size: int):
        super().__init__()
        self.arch = arch
        layers: list[nn.Module] = []
        c_in, size = arch.in_channels, image_size
        for c_out in arch.channels():
            for i in range(arch.convs_per_stage):
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
                if i == arch.convs_per_stage - 1 and size > 1:
                    layers.append(MaxPool2x2())
                    size //= 2
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def build_model(arch: Architecture, image_size: int) -> ConvNet:
    return ConvNet(arch, image_size)
