"""One distillation epoch over the 60k MNIST training images: the tutorial loop against kdsearch's engine.

    python benchmarks/bench_epoch.py --data-dir ../shared/data

(a) reference: torchvision MNIST + ToTensor + Normalize + DataLoader (batch 64, shuffled), the teacher's forward
    pass per batch, the same KD loss and optimiser, as tutorials write it.
(b) kdsearch: `distill_epoch` with its defaults (uint8 images held as one tensor, batches sliced from a permutation,
    the teacher's logits computed once and cached, channels_last).
Both train the same student from the same initial weights against the same teacher in one process, so the ratio
holds even on a noisy shared machine. Prints images/s, the ratio, the logit-cache build time, the test accuracy
after the epoch, and the FLOP lower bound of the epoch. The last line is `ratio: N.Nx`.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from kdsearch.data import Split, load_dataset
from kdsearch.distill import Normalizer, TrainSettings, accuracy, distill_epoch, kd_loss, make_optimizer, predict_logits
from kdsearch.engine import configure_device, prepare_model, sync
from kdsearch.measure import count_params
from kdsearch.models import Architecture, build_model
from kdsearch.study_file import load_study
from kdsearch.teacher import get_teacher

STUDY = Path(__file__).resolve().parent.parent / "studies" / "mnist.toml"


REFERENCE_BATCH = 64  # as tutorials write it, and as the issue names the reference


def reference_epoch(student, teacher, data_dir: str, settings: TrainSettings, device) -> float:
    """The plain loop; returns seconds."""
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = torchvision.datasets.MNIST(data_dir, train=True, download=False, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=REFERENCE_BATCH, shuffle=True, drop_last=True)
    opt, sched = make_optimizer(student, settings, len(loader))
    student.train()
    teacher.eval()
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            t_logits = teacher(x)
        loss = kd_loss(student(x), t_logits, y, settings.temperature, settings.alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start


def engine_epoch(student, train_set: Split, normalize, logits, settings: TrainSettings, device) -> float:
    opt, sched = make_optimizer(student, settings, len(train_set) // settings.batch_size)
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    start = time.perf_counter()
    distill_epoch(student, train_set, normalize, settings, logits, opt, sched, gen).item()
    sync(device)
    return time.perf_counter() - start


def flop_lower_bound(student, input_shape, n_images: int, device) -> tuple[float, float]:
    """Seconds the epoch's forward+backward FLOPs need at the measured matmul FLOP/s; and that FLOP/s."""
    from torch.utils import benchmark
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(student).to(device).train()
    x = torch.randn(64, *input_shape, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    flops_per_image = counter.get_total_flops() / 64
    a = torch.randn(2048, 2048, device=device)
    t = benchmark.Timer("a @ a", globals={"a": a}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=1.0)
    flops_per_s = 2 * 2048**3 / t.median
    return flops_per_image * n_images / flops_per_s, flops_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=16, help="student first-stage channels (default: 16)")
    parser.add_argument("--depth", type=int, default=3, help="student stages (default: 3)")
    parser.add_argument("--skip-reference", action="store_true", help="time the engine only (e.g. on a GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    configure_device(device)
    cfg = load_study(STUDY, [f"data.data_dir={args.data_dir!r}"])
    data = load_dataset(cfg.data, cfg.seed)
    full = Split(torch.cat([data.train.x, data.val.x]), torch.cat([data.train.y, data.val.y]))  # all 60k
    print(f"device {device}, threads {torch.get_num_threads()}, {len(full):,} training images")

    teacher = get_teacher(cfg, data, device, Path(".kdsearch-cache")).model.eval()
    normalize = Normalizer(data.mean, data.std, device)
    full_dev, test_dev = full.to(device), data.test.to(device)
    sync(device)
    start = time.perf_counter()
    logits = predict_logits(teacher, full_dev.x, normalize)
    sync(device)
    cache_s = time.perf_counter() - start

    torch.manual_seed(0)
    student = build_model(Architecture(1, 10, args.width, args.depth), 28)
    settings = TrainSettings(epochs=1, lr=0.05, batch_size=cfg.distill.batch_size, temperature=4.0, alpha=0.5)
    print(f"student: {count_params(student):,} params; teacher logits cached in {cache_s:.2f} s")
    fast = prepare_model(copy.deepcopy(student), device)
    fast_s = engine_epoch(fast, full_dev, normalize, logits, settings, device)
    fast_acc = accuracy(fast, test_dev, normalize)
    print(f"(b) kdsearch : {fast_s:6.2f} s  {len(full) / fast_s:9,.0f} images/s  test_acc {fast_acc:.4f}")
    bound_s, flops = flop_lower_bound(student, (1, 28, 28), len(full), device)
    print(f"FLOP lower bound: {bound_s:.2f} s for the epoch at {flops / 1e9:.0f} GFLOP/s (measured matmul)")
    if args.skip_reference:
        return
    plain = copy.deepcopy(student)
    ref_s = reference_epoch(plain.to(device), teacher, args.data_dir, settings, device)
    ref_acc = accuracy(plain.to(device), test_dev, normalize)
    print(f"(a) reference: {ref_s:6.2f} s  {len(full) / ref_s:9,.0f} images/s  test_acc {ref_acc:.4f}")
    print(f"ratio: {ref_s / fast_s:.1f}x")


if __name__ == "__main__":
    main()
