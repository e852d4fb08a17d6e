"""Networks for students (and the convnet teacher), by family. Every family is built from (input shape, classes,
knobs), so the search, the cost measurement, tracking and export treat them all alike.

- `convnet`: `depth` stages of `convs_per_stage` x (3x3 conv without bias, BatchNorm, ReLU), stage i having
  `width * 2**i` channels; the last conv of a stage is followed by a 2x2 max-pool (while the image is larger than
  1x1) before its BatchNorm and ReLU, as in airbench: the normalisation then runs on a quarter of the pixels, which
  made a CPU training step 1.4x faster. Then global average pooling and one linear layer.
  Knobs: `base_width`, `width` (multiplier), `depth` (stages), `convs_per_stage`.
- `separable`: MobileNet-style. A 3x3 stem conv with `c` channels at full resolution, then `depth` stages, stage i
  with `c * (i + 1)` channels (linear growth: a pointwise conv costs c_in * c_out, so doubling would put nearly all
  parameters in the last stage), each of `blocks` blocks, the first with stride 2. (A first stage at full
  resolution was slower and no better: on MNIST, 1,362 parameters, 96.8% test after 10 epochs at 18 s an epoch,
  against 97.7% after 12 at 9 s.) With `expand` = 1 a block is a
  plain separable conv (3x3 depthwise, BN, ReLU, 1x1 pointwise, BN, ReLU); with `expand` > 1 an inverted residual
  (1x1 to `expand` x channels, 3x3 depthwise, 1x1 back with a linear BN, plus the input when shapes match). Global
  average pooling and a linear head. Knobs: `base_width`, `width`, `depth`, `blocks`, `expand`.
- `resnet`: the CIFAR ResNet of He et al. (resnet8/14/20/... = 6n+2 layers): a 3x3 stem, three stages of `blocks`
  (n) basic blocks with 16, 32 and 64 channels times `width`, stride 2 at the start of stages 2 and 3, 1x1-conv
  projection shortcuts where the shape changes; global average pooling and a linear head.
  Knobs: `base_width` (16), `width`, `blocks`.
- `package.module:function`: a user's builder, called as `function(input_shape, num_classes, **knobs)` with
  input_shape = (channels, height, width) and the knobs of `[student.custom]`; it returns an `nn.Module` that maps
  a float batch [N, C, H, W] to logits [N, num_classes].

The teacher's other networks (torchvision models, checkpoints) are in `teacher_network.py`. Built-in families
round every channel count to a multiple of `student.channel_multiple` (1 by default, no rounding: rounded to 8 or
4, the default digits space held about 6 sizes, and the search's front fell short of a plain Optuna script's).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdsearch import KdsearchError, first_line

FAMILY_VERSION = 2  # bump when a change makes old state_dicts (and cached teachers) meaningless
BUILT_IN = ("convnet", "separable", "resnet")


def round_channels(channels: float, multiple: int) -> int:
    """`channels` rounded to the nearest multiple of `multiple`, and at least one multiple."""
    return max(multiple, round(channels / multiple) * multiple)


@dataclass(frozen=True)
class Architecture:
    """A `convnet` (the teacher's family, and the student family kdsearch started with)."""

    in_channels: int
    num_classes: int
    width: int  # channels of the first stage
    depth: int
    convs_per_stage: int = 1

    def channels(self) -> list[int]:
        return [self.width * 2**i for i in range(self.depth)]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StudentSpec:
    """Everything that fixes a student's architecture: its family, the data's shape and the family's knobs."""

    family: str
    input_shape: tuple[int, int, int]
    num_classes: int
    knobs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"family": self.family, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "knobs": dict(sorted(self.knobs.items()))}

    @classmethod
    def from_dict(cls, d: dict) -> StudentSpec:
        return cls(d["family"], tuple(d["input_shape"]), d["num_classes"], dict(d["knobs"]))


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


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True
            ) -> list[nn.Module]:
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class SeparableBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        if expand == 1:
            layers = conv_bn(c_in, c_in, 3, stride, groups=c_in) + conv_bn(c_in, c_out, 1)
        else:
            hidden = c_in * expand
            layers = (conv_bn(c_in, hidden, 1) + conv_bn(hidden, hidden, 3, stride, groups=hidden)
                      + conv_bn(hidden, c_out, 1, relu=False))
        self.body = nn.Sequential(*layers)
        self.residual = expand > 1 and stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class SeparableNet(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, channels: list[int], blocks: int,
                 expand: int):
        super().__init__()
        layers = conv_bn(input_shape[0], channels[0])
        c_in, size = channels[0], input_shape[1]
        for c_out in channels[1:]:
            for b in range(blocks):
                stride = 2 if b == 0 and size > 1 else 1
                layers.append(SeparableBlock(c_in, c_out, stride, expand))
                size, c_in = (size + 1) // stride, c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c_in, c_out, 3, stride), *conv_bn(c_out, c_out, 3, relu=False))
        self.shortcut = (nn.Sequential(*conv_bn(c_in, c_out, 1, stride, relu=False))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, channels: list[int], blocks: int):
        super().__init__()
        layers = conv_bn(input_shape[0], channels[0])
        c_in = channels[0]
        for stage, c_out in enumerate(channels):
            for b in range(blocks):
                layers.append(BasicBlock(c_in, c_out, 2 if stage > 0 and b == 0 else 1))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def convnet(input_shape: tuple[int, int, int], num_classes: int, *, base_width: int, width: float, depth: int,
            convs_per_stage: int = 1, channel_multiple: int = 1) -> ConvNet:
    first = round_channels(base_width * width, channel_multiple)
    return ConvNet(Architecture(input_shape[0], num_classes, first, depth, convs_per_stage), input_shape[1])


def separable(input_shape: tuple[int, int, int], num_classes: int, *, base_width: int, width: float, depth: int,
              blocks: int = 1, expand: int = 1, channel_multiple: int = 1) -> SeparableNet:
    c = base_width * width
    channels = [round_channels(c * max(1, i), channel_multiple) for i in range(depth + 1)]  # stem, then stages
    return SeparableNet(input_shape, num_classes, channels, blocks, expand)


def resnet(input_shape: tuple[int, int, int], num_classes: int, *, base_width: int, width: float, blocks: int,
           channel_multiple: int = 1) -> ResNet:
    channels = [round_channels(base_width * width * 2**i, channel_multiple) for i in range(3)]
    return ResNet(input_shape, num_classes, channels, blocks)


FAMILIES: dict[str, Callable[..., nn.Module]] = {"convnet": convnet, "separable": separable, "resnet": resnet}


def is_user_builder(name: str) -> bool:
    return ":" in name and not name.startswith("torchvision:")


def load_builder(name: str, where: str = "student.arch") -> Callable[..., nn.Module]:
    """A built-in family's builder, or a user's `package.module:function`."""
    if name in FAMILIES:
        return FAMILIES[name]
    module_name, _, function = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise KdsearchError(f"{where} = {name!r}: cannot import {module_name} ({first_line(e)}): install it or put "
                            "its folder on PYTHONPATH") from None
    builder = getattr(module, function, None)
    if not callable(builder):
        raise KdsearchError(f"{where} = {name!r}: {module_name} has no function {function!r}: name a function "
                            "that takes (input_shape, num_classes, **knobs) and returns an nn.Module")
    return builder


def build_student(spec: StudentSpec) -> nn.Module:
    builder = load_builder(spec.family)
    try:
        model = builder(tuple(spec.input_shape), spec.num_classes, **spec.knobs)
    except KdsearchError:
        raise
    except Exception as e:
        if spec.family in FAMILIES:
            raise
        raise KdsearchError(f"student builder {spec.family} failed with knobs {spec.knobs} ({first_line(e)}): fix "
                            "the builder or its [student.custom] knobs") from None
    if not isinstance(model, nn.Module):
        raise KdsearchError(f"student builder {spec.family} returned {type(model).__name__}: it must return an "
                            "nn.Module")
    return model


def channels_of(model: nn.Module) -> list[int]:
    """Output channels of each conv layer, in order: how wide a student is, whatever its family."""
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
