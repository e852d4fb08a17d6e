"""The Hinton KD loss against numbers worked out by hand.

One sample, two classes, student logits s = [0, 0], teacher logits t = [ln 3, 0], label 0.
  CE(s, 0)              = -ln(1/2) = ln 2 = 0.693147
  T = 1: softmax(t)     = [3/4, 1/4], softmax(s) = [1/2, 1/2]
         KL             = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812
  T = 2: softmax(t/2)   = [sqrt3/(sqrt3+1), 1/(sqrt3+1)] = [0.633975, 0.366025]
         KL             = 0.633975 ln(1.267949) + 0.366025 ln(0.732051) = 0.150506 - 0.114165 = 0.036341
         T^2 * KL       = 0.145363
"""

import math

import pytest
import torch

from kdsearch.distill import kd_loss

S = torch.tensor([[0.0, 0.0]])
T_LOGITS = torch.tensor([[math.log(3.0), 0.0]])
Y = torch.tensor([0])
CE = 0.693147
KL_T1 = 0.130812
KL_T2 = 0.036341


def test_alpha_zero_is_plain_cross_entropy():
    assert kd_loss(S, T_LOGITS, Y, temperature=2.0, alpha=0.0).item() == pytest.approx(CE, abs=1e-6)


def test_alpha_one_is_pure_distillation_at_t1():
    assert kd_loss(S, T_LOGITS, Y, temperature=1.0, alpha=1.0).item() == pytest.approx(KL_T1, abs=1e-6)


def test_temperature_squared_factor():
    assert kd_loss(S, T_LOGITS, Y, temperature=2.0, alpha=1.0).item() == pytest.approx(4 * KL_T2, abs=1e-5)


def test_mixture_of_both_terms():
    # 0.25 * 4 * KL_T2 + 0.75 * CE = 0.036341 + 0.519860 = 0.556201
    assert kd_loss(S, T_LOGITS, Y, temperature=2.0, alpha=0.25).item() == pytest.approx(0.556201, abs=1e-5)
    # 0.5 * 1 * KL_T1 + 0.5 * CE = 0.065406 + 0.346574 = 0.411980
    assert kd_loss(S, T_LOGITS, Y, temperature=1.0, alpha=0.5).item() == pytest.approx(0.411980, abs=1e-5)


def test_batch_is_averaged_not_summed():
    s, t, y = S.repeat(4, 1), T_LOGITS.repeat(4, 1), Y.repeat(4)
    assert kd_loss(s, t, y, 2.0, 0.5).item() == pytest.approx(kd_loss(S, T_LOGITS, Y, 2.0, 0.5).item(), abs=1e-6)


def test_matches_the_definition_on_random_logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    temp, alpha = 4.0, 0.7
    p_t, p_s = torch.softmax(t / temp, 1), torch.softmax(s / temp, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(16), y].mean()
    expected = alpha * temp**2 * kl + (1 - alpha) * ce
    assert kd_loss(s, t, y, temp, alpha).item() == pytest.approx(expected.item(), rel=1e-5)


def test_identical_logits_leave_only_the_hard_term():
    assert kd_loss(S, S, Y, 3.0, 0.4).item() == pytest.approx(0.6 * CE, abs=1e-6)
