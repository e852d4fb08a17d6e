"""A user's own student builder, as a study names it: student.arch = "own_students:tiny_mlp" (tests/ is on the
path while the tests run)."""

import torch
from torch import nn


def tiny_mlp(input_shape, num_classes, hidden=16, activation="relu"):
    c, h, w = input_shape
    act = {"relu": nn.ReLU(), "tanh": nn.Tanh()}[activation]
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), act, nn.Linear(hidden, num_classes))


class RawParameters(nn.Module):
    """Raw parameters and a knob used only in forward: neither shows in its repr."""

    def __init__(self, inputs, num_classes, hidden, passes):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(inputs, hidden) * 0.1)
        self.w2 = nn.Parameter(torch.randn(hidden, num_classes) * 0.1)
        self.passes = passes

    def forward(self, x):
        h = x.flatten(1) @ self.w1
        for _ in range(self.passes):
            h = torch.relu(h)
        return h @ self.w2


def raw_parameters(input_shape, num_classes, hidden=4, passes=1):
    c, h, w = input_shape
    return RawParameters(c * h * w, num_classes, hidden, passes)


def not_a_module(input_shape, num_classes):
    return "a string"


class DataDependent(nn.Module):
    """Its forward branches on the data: torch.export (and so the ONNX exporter) cannot trace it."""

    def __init__(self, inputs, num_classes, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        out = self.body(x)
        if out.sum() > 0:
            return out
        return out * 2


def data_dependent(input_shape, num_classes, hidden=8):
    c, h, w = input_shape
    return DataDependent(c * h * w, num_classes, hidden)
