"""A user's own student builder, as a study names it: student.arch = "own_students:tiny_mlp" (tests/ is on the
path while the tests run)."""

from torch import nn


def tiny_mlp(input_shape, num_classes, hidden=16, activation="relu"):
    c, h, w = input_shape
    act = {"relu": nn.ReLU(), "tanh": nn.Tanh()}[activation]
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), act, nn.Linear(hidden, num_classes))


def not_a_module(input_shape, num_classes):
    return "a string"
