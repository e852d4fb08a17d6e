"""Each logit-based distillation method's loss against numbers worked out by hand: scalar Python over a batch of two
images and three classes, written from the papers' formulas, and identities a reader can check in their head."""

import math

import pytest
import torch

from kdsearch.distill import kd_loss
from kdsearch.kd_losses import dist_loss, dkd_loss, ls_loss, method_loss

S = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
T = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
Y = [0, 1]


def softmax(row, temperature=1.0):
    e = [math.exp(v / temperature) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ce(rows, labels):
    return sum(-math.log(softmax(r)[y]) for r, y in zip(rows, labels)) / len(rows)


def tensors():
    return torch.tensor(S), torch.tensor(T), torch.tensor(Y)


def test_dkd_is_ce_plus_weighted_target_and_non_target_kl():
    temp, alpha, beta = 2.0, 1.0, 8.0
    tckd = nckd = 0.0
    for s, t, y in zip(S, T, Y):
        ps, pt = softmax(s, temp), softmax(t, temp)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others_s = softmax([v for i, v in enumerate(s) if i != y], temp)
        others_t = softmax([v for i, v in enumerate(t) if i != y], temp)
        nckd += kl(others_t, others_s)
    by_hand = ce(S, Y) + temp**2 * (alpha * tckd + beta * nckd) / 2
    assert dkd_loss(*tensors(), epoch=5, alpha=alpha, beta=beta, temperature=temp, warmup=5).item() == \
        pytest.approx(by_hand, rel=1e-5)
    # half-way through the warm-up, half the distillation term
    half = ce(S, Y) + 0.5 * (by_hand - ce(S, Y))
    assert dkd_loss(*tensors(), epoch=2, alpha=alpha, beta=beta, temperature=temp, warmup=4).item() == \
        pytest.approx(half, rel=1e-5)


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_dist_is_ce_plus_one_minus_correlation_per_image_and_per_class():
    tau, beta, gamma = 2.0, 1.0, 3.0
    ys, yt = [softmax(r, tau) for r in S], [softmax(r, tau) for r in T]
    inter = sum(1 - pearson(a, b) for a, b in zip(ys, yt)) / 2
    columns = lambda rows: [list(c) for c in zip(*rows)]  # noqa: E731
    intra = sum(1 - pearson(a, b) for a, b in zip(columns(ys), columns(yt))) / 3
    by_hand = ce(S, Y) + tau**2 * (beta * inter + gamma * intra)
    assert dist_loss(*tensors(), epoch=1, beta=beta, gamma=gamma, tau=tau).item() == pytest.approx(by_hand, rel=1e-5)


def standardise(row):
    mean = sum(row) / len(row)
    sd = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / sd for v in row]


def test_ls_is_kd_on_z_scored_logits():
    temp, kd_w, ce_w = 2.0, 9.0, 0.1
    soft = sum(kl(softmax(standardise(t), temp), softmax(standardise(s), temp)) for s, t in zip(S, T)) / 2
    by_hand = ce_w * ce(S, Y) + kd_w * temp**2 * soft
    got = ls_loss(*tensors(), epoch=1, temperature=temp, kd_weight=kd_w, ce_weight=ce_w).item()
    assert got == pytest.approx(by_hand, rel=1e-4)


def test_identities_a_reader_can_check():
    s, _, y = tensors()
    plain = ce(S, Y)
    # a student that predicts as the teacher does owes only its cross-entropy
    assert dkd_loss(s, s, y, 9, alpha=1.0, beta=8.0, temperature=4.0, warmup=1).item() == pytest.approx(plain)
    assert dist_loss(s, s, y, 1, beta=1.0, gamma=1.0, tau=1.0).item() == pytest.approx(plain)
    # standardising forgets scale and shift: a teacher 3x the student's logits plus 5 teaches it nothing new (up to
    # the 1e-7 that pads the standard deviation, times kd_weight * T^2 = 36)
    assert ls_loss(s, 3 * s + 5, y, 1, temperature=2.0, kd_weight=9.0, ce_weight=0.1).item() == \
        pytest.approx(0.1 * plain, abs=1e-5)


def test_method_loss_names_the_method_and_defaults_to_the_papers_knobs():
    s, t, y = tensors()
    assert method_loss("kd", s, t, y, 1, temperature=4.0, alpha=0.5).item() == kd_loss(s, t, y, 4.0, 0.5).item()
    assert method_loss("dkd", s, t, y, 40).item() == pytest.approx(
        dkd_loss(s, t, y, 40, alpha=1.0, beta=8.0, temperature=4.0, warmup=20).item())
    assert method_loss("dist", s, t, y, 1, tau=2.0).item() == pytest.approx(
        dist_loss(s, t, y, 1, beta=1.0, gamma=1.0, tau=2.0).item())
