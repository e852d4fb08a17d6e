"""Distillation losses that need only the teacher's logits, so each works from kdsearch's logit cache.

- `kd`: Hinton et al. (`kd_loss`): alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE.
- `dkd`: Decoupled KD (Zhao et al., CVPR 2022): the KL split into the target class's binary part (TCKD, weight
  `alpha`) and the part among the other classes (NCKD, weight `beta`), both at T^2, added to the CE and ramped up
  linearly over `warmup` epochs. Paper defaults: alpha 1, beta 8, T 4, 20 of 240 epochs of warm-up.
- `dist`: DIST (Huang et al., NeurIPS 2022): one minus the Pearson correlation of the softened predictions, per
  image (inter-class, weight `beta`) and per class over the batch (intra-class, weight `gamma`), at `tau`^2, added
  to the CE. Defaults: beta 1, gamma 1, tau 1.
- `ls`: KD on standardised logits (Sun et al., CVPR 2024): each row's logits z-scored before the softmax at the
  base temperature; `ce_weight` * CE + `kd_weight` * T^2 * KL. Defaults (their CIFAR-100 KD): T 2, kd_weight 9,
  ce_weight 0.1.

Every loss is averaged over the batch and takes (student logits, teacher logits, labels, epoch, **its knobs).
A study searches each method's temperature (DIST's tau) as the shared `temperature`, kd's `alpha` from the study
file, and the knobs of `METHOD_SPACE`; the others stay at the paper's values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHOD_DEFAULTS = {
    "kd": {"temperature": 4.0, "alpha": 0.5},  # the baselines' (Hinton et al.'s MNIST runs used T up to 20)
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20},  # warm-up: 20 of the paper's 240 epochs
    "dist": {"beta": 1.0, "gamma": 1.0, "tau": 1.0},
    "ls": {"temperature": 2.0, "kd_weight": 9.0, "ce_weight": 0.1},
}
DKD_PAPER_EPOCHS = 240
# The knobs a study searches besides the temperature, on a log scale, each around its paper's values: DKD's beta
# was 8 on CIFAR-100 and 0.5 on ImageNet; DIST's beta and gamma 2 on CIFAR-100, 1 on ImageNet; LS's KD weight 9
# with a CE weight of 0.1 (about 1 for each term at T 2 after standardising).
METHOD_SPACE = {
    "kd": {},
    "dkd": {"beta": (0.5, 8.0)},
    "dist": {"beta": (0.5, 4.0), "gamma": (0.5, 4.0)},
    "ls": {"kd_weight": (1.0, 9.0)},
}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), averaged over the batch.

    The T^2 keeps the soft term's gradients on the same scale as the hard term's as T changes (Hinton et al.).
    `label_smoothing` smooths the hard labels only: the teacher's soft targets are left as they are.
    """
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    return alpha * temperature**2 * _kl(teacher_logits, student_logits, temperature) + (1 - alpha) * hard


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, epoch: int, *,
             alpha: float, beta: float, temperature: float, warmup: int) -> torch.Tensor:
    target = F.one_hot(labels, student_logits.shape[1]).bool()
    # TCKD: KL between the (target, all others) probabilities, in log space: a confident teacher's 1 - p rounds to
    # 0 in float32, and 0 * log 0 must read 0 (as F.kl_div takes it), not NaN
    binary_s, binary_t = _binary_log_probs(student_logits / temperature, target), \
        _binary_log_probs(teacher_logits / temperature, target)
    tckd = F.kl_div(binary_s, binary_t, reduction="batchmean", log_target=True)
    hidden = -1000.0 * target  # the target class left out of the softmax among the others
    nckd = _kl(teacher_logits + hidden * temperature, student_logits + hidden * temperature, temperature)
    ramp = min(epoch / warmup, 1.0) if warmup > 0 else 1.0
    return F.cross_entropy(student_logits, labels) + ramp * temperature**2 * (alpha * tckd + beta * nckd)


def _binary_log_probs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log (p_target, 1 - p_target) of softmax(logits), each row, without forming 1 - p."""
    log_p = F.log_softmax(logits, dim=1)
    others = torch.logsumexp(logits.masked_fill(target, float("-inf")), dim=1) - torch.logsumexp(logits, dim=1)
    return torch.stack([log_p[target], others], dim=1)


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """One minus the Pearson correlation of each row of `a` with the same row of `b`, averaged over the rows."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (1 - F.cosine_similarity(a, b, dim=1, eps=eps)).mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, epoch: int, *,
              beta: float, gamma: float, tau: float) -> torch.Tensor:
    y_s = F.softmax(student_logits / tau, dim=1)
    y_t = F.softmax(teacher_logits / tau, dim=1)
    inter = _pearson_distance(y_s, y_t)
    intra = _pearson_distance(y_s.T, y_t.T)
    return F.cross_entropy(student_logits, labels) + tau**2 * (beta * inter + gamma * intra)


def standardised(logits: torch.Tensor) -> torch.Tensor:
    """Each row z-scored (the sample standard deviation, as the paper's code takes it)."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (1e-7 + logits.std(dim=1, keepdim=True))


def ls_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, epoch: int, *,
            temperature: float, kd_weight: float, ce_weight: float) -> torch.Tensor:
    soft = _kl(standardised(teacher_logits), standardised(student_logits), temperature)
    return ce_weight * F.cross_entropy(student_logits, labels) + kd_weight * temperature**2 * soft


def method_loss(method: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                epoch: int, **knobs) -> torch.Tensor:
    """The loss of `method` (see `METHOD_DEFAULTS`), its knobs defaulting to the paper's."""
    if method == "kd":
        return kd_loss(student_logits, teacher_logits, labels, knobs["temperature"], knobs["alpha"])
    loss = {"dkd": dkd_loss, "dist": dist_loss, "ls": ls_loss}[method]
    return loss(student_logits, teacher_logits, labels, epoch, **{**METHOD_DEFAULTS[method], **knobs})


def training_loss(settings, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                  labels: torch.Tensor, epoch: int) -> torch.Tensor:
    """The loss a student of `settings` (a `distill.TrainSettings`) trains with in `epoch` (from 1): its method's,
    at its temperature (DIST's tau) and searched knobs; DKD's warm-up the paper's share of the epochs."""
    if settings.method == "kd":
        return kd_loss(student_logits, teacher_logits, labels, settings.temperature, settings.alpha,
                       settings.label_smoothing)
    knobs = dict(settings.method_knobs)
    knobs["tau" if settings.method == "dist" else "temperature"] = settings.temperature
    if settings.method == "dkd":
        knobs["warmup"] = max(1, round(settings.epochs * METHOD_DEFAULTS["dkd"]["warmup"] / DKD_PAPER_EPOCHS))
    return method_loss(settings.method, student_logits, teacher_logits, labels, epoch, **knobs)
