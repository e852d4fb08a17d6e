"""The training engine: batched augmentation, the per-batch teacher, reproducible trials, data errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kdsearch import KdsearchError
from kdsearch.config import DataConfig
from kdsearch.data import Split, StreamingSplit, augment_batch, load_dataset
from kdsearch.distill import Normalizer, TrainSettings, fit, predict_logits
from kdsearch.engine import PhaseTimer
from kdsearch.models import Architecture, MaxPool2x2, build_model


def test_crop_shifts_each_image_within_the_padding():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6) + 1  # no zeros inside
    out = augment_batch(x, "crop", torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for img, src in zip(out, x):
        # every non-zero pixel comes from the same image, and the crop is a shifted window of the padded image
        assert set(img[img > 0].tolist()) <= set(src.flatten().tolist())
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        windows = [padded[:, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(img, w) for w in windows)


def test_flip_is_a_mirror_image_or_the_image():
    x = torch.randint(1, 255, (64, 3, 8, 8), dtype=torch.uint8)
    out = augment_batch(x, "crop-flip", torch.Generator().manual_seed(1), pad=0)
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x)]
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same)) and 10 < sum(flipped) < 54


def test_none_returns_the_batch_untouched():
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    assert augment_batch(x, "none", torch.Generator()) is x


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(), seed=0)


def _train(data, seed, teacher=None, augment="none", alpha=0.0):
    torch.manual_seed(seed)
    model = build_model(Architecture(1, 10, 4, 2), 8)
    settings = TrainSettings(epochs=1, lr=0.05, batch_size=64, seed=seed, augment=augment, alpha=alpha,
                             temperature=2.0)
    val_acc = fit(model, data.train, data.val, Normalizer(data.mean, data.std, "cpu"), settings, teacher)
    return model, val_acc


def test_same_seed_gives_the_same_weights(digits):
    (a, acc_a), (b, acc_b), (c, _) = _train(digits, 5), _train(digits, 5), _train(digits, 6)
    assert acc_a == acc_b
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


def test_augmented_training_runs_the_teacher_per_batch(digits):
    teacher = build_model(Architecture(1, 10, 4, 1), 8).eval()
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    _train(digits, 0, teacher=teacher, augment="crop", alpha=0.5)
    assert len(calls) == len(digits.train) // 64  # one teacher pass per batch, none for evaluation


def test_cached_logits_with_augmentation_are_refused(digits):
    logits = torch.zeros(len(digits.train), 10)
    with pytest.raises(ValueError, match="augmented"):
        _train(digits, 0, teacher=logits, augment="crop", alpha=0.5)


def test_predict_logits_matches_one_big_forward():
    model = build_model(Architecture(1, 10, 4, 2), 8).eval()
    x = torch.randint(0, 255, (300, 1, 8, 8), dtype=torch.uint8)
    norm = Normalizer((0.5,), (0.25,), "cpu")
    with torch.no_grad():
        expected = model((x.float() / 255 - 0.5) / 0.25)
    torch.testing.assert_close(predict_logits(model, x, norm, batch_size=128), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [28, 7, 3])
def test_inference_pool_gives_aten_values_ties_and_odd_sizes_included(size):
    # small integers make ties common, as in the constant background of MNIST maps
    x = torch.randint(-2, 3, (64, 4, size, size)).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fast, scripted = MaxPool2x2()(x), torch.jit.script(MaxPool2x2())(x)
    assert torch.equal(fast, F.max_pool2d(x, 2)) and torch.equal(scripted, fast)
    assert fast.is_contiguous(memory_format=torch.channels_last)


def test_training_pool_keeps_atens_gradient():
    x = torch.randint(-2, 3, (64, 4, 6, 6)).float().contiguous(memory_format=torch.channels_last).requires_grad_()
    MaxPool2x2()(x).sum().backward()
    expected = x.detach().clone().requires_grad_()
    F.max_pool2d(expected, 2).sum().backward()
    assert torch.equal(x.grad, expected.grad)  # one position per window, as aten picks it, even among ties
    assert x.grad.sum() == 64 * 4 * 9


def test_missing_torchvision_dataset_names_the_expected_files(tmp_path):
    with pytest.raises(KdsearchError, match=r"expected .*MNIST/raw/train-images-idx3-ubyte.*--data-dir"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)), seed=0)


def image_folder(root, per_class=5):
    from PIL import Image

    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir()
        for i in range(per_class):
            Image.new("RGB", (20 + i % 7, 12), color=(i * 9 % 255, 100 * c, 200 - i)).save(root / cls / f"{i}.png")
    return root


def test_image_folder_loads_resized_uint8(tmp_path):
    data = load_dataset(DataConfig(dataset="imagefolder", data_dir=str(image_folder(tmp_path)), image_size=16), 0)
    assert data.input_shape == (3, 16, 16) and data.num_classes == 2
    assert len(data.train) + len(data.val) + len(data.test) == 10 and data.train.x.dtype == torch.uint8


def test_a_folder_over_the_memory_budget_streams_and_trains_the_same(tmp_path, capsys):
    folder = str(image_folder(tmp_path, per_class=40))
    held = load_dataset(DataConfig(dataset="imagefolder", data_dir=folder, image_size=8), seed=0)
    streamed = load_dataset(DataConfig(dataset="imagefolder", data_dir=folder, image_size=8, memory_gb=1e-6), 0)
    assert "streaming them from disk with" in capsys.readouterr().out
    assert isinstance(streamed.train, StreamingSplit) and isinstance(held.train, Split)
    assert torch.equal(streamed.test.y, held.test.y) and streamed.input_shape == held.input_shape
    norm = Normalizer(held.mean, held.std, "cpu")
    settings = TrainSettings(epochs=2, lr=0.05, batch_size=16, seed=3, augment="crop")
    weights = []
    for data in (held, streamed):
        torch.manual_seed(0)
        model = build_model(Architecture(3, 2, 4, 2), 8)
        fit(model, data.train, data.val, norm, settings)
        weights.append(list(model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_a_streamed_split_distils_from_the_cached_logits_of_its_own_images(tmp_path):
    folder = str(image_folder(tmp_path, per_class=40))
    held = load_dataset(DataConfig(dataset="imagefolder", data_dir=folder, image_size=8), seed=0)
    streamed = load_dataset(DataConfig(dataset="imagefolder", data_dir=folder, image_size=8, memory_gb=1e-6), 0)
    norm = Normalizer(held.mean, held.std, "cpu")
    torch.manual_seed(1)
    teacher = build_model(Architecture(3, 2, 8, 2), 8).eval()
    logits = predict_logits(teacher, held.train.x, norm)
    # every batch of the streamed split, in a shuffled order, finds its own images' row of the cache
    order = torch.randperm(len(streamed.train), generator=torch.Generator().manual_seed(5))
    for idx, images, _ in streamed.train.batches(order, 16):
        with torch.inference_mode():
            assert torch.allclose(logits[idx], teacher(norm(images)), atol=1e-5)
    settings = TrainSettings(epochs=2, lr=0.05, batch_size=16, seed=3, temperature=4.0, alpha=0.7)
    weights = []
    for data in (held, streamed):
        torch.manual_seed(0)
        model = build_model(Architecture(3, 2, 4, 2), 8)
        fit(model, data.train, data.val, norm, settings, teacher=logits)
        weights.append(list(model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    torch.manual_seed(0)
    plain = build_model(Architecture(3, 2, 4, 2), 8)
    fit(plain, held.train, held.val, norm, dataclasses.replace(settings, alpha=0.0))
    assert not torch.equal(next(iter(plain.state_dict().values())), weights[0][0])  # the KD term did count


def test_phase_timer_takes_nested_phases_out(monkeypatch):
    clock = iter([0.0, 1.0, 4.0, 10.0, 20.0, 22.5])  # outer starts, inner 1..4, outer ends; then "other" 20..22.5
    monkeypatch.setattr("kdsearch.engine.time.perf_counter", lambda: next(clock))
    timer = PhaseTimer(torch.device("cpu"))
    with timer("outer"):
        with timer("inner"):
            pass
        timer.add("evaluate", 2.0)  # measured in another process, inside "outer"
    with timer("other"):
        pass
    timer.add("evaluate", 0.5)  # outside every phase: taken out of none
    assert timer.seconds == {"inner": 3.0, "outer": 10.0 - 3.0 - 2.0, "evaluate": 2.5, "other": 2.5}


def test_the_trial_loop_freezes_long_lived_objects_and_thaws_them_even_after_an_error():
    import gc

    from kdsearch.scheduling import long_lived_objects_frozen

    with pytest.raises(RuntimeError), long_lived_objects_frozen():
        assert gc.get_freeze_count() > 1000  # torch alone brings many thousands
        raise RuntimeError("a trial loop that fails")
    assert gc.get_freeze_count() == 0


def test_a_narrow_strided_1x1_convolution_trains_without_corrupting_memory():
    """torch 2.14.1's oneDNN weight gradient of a 1x1 strided convolution with < 8 input channels, in channels_last
    on one thread, corrupts the heap (the narrow resnet students' shortcut): `prepare_model` keeps such a model
    contiguous. Run in a fresh process, since the corruption aborts it (`MALLOC_CHECK_=3` makes it prompt)."""
    import os
    import subprocess
    import sys

    script = """
import torch
from torch import nn
from kdsearch.engine import prepare_model
torch.set_num_threads(1)
model = prepare_model(nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False)), torch.device("cpu"))
for _ in range(30):
    model(torch.randn(64, 4, 8, 8)).sum().backward()  # NCHW images, as the training loop feeds them
print("trained")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MALLOC_CHECK_": "3"})
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-500:]


def test_only_models_with_a_narrow_strided_1x1_convolution_train_contiguous():
    from kdsearch.engine import has_unsafe_strided_1x1, prepare_model

    narrow = torch.nn.Sequential(torch.nn.Conv2d(4, 12, 1, stride=2))
    assert has_unsafe_strided_1x1(narrow) and not has_unsafe_strided_1x1(torch.nn.Conv2d(8, 16, 1, stride=2))
    assert not has_unsafe_strided_1x1(torch.nn.Conv2d(4, 8, 3, stride=2))
    assert prepare_model(narrow, torch.device("cpu"))[0].weight.is_contiguous()
    wide = prepare_model(build_model(Architecture(1, 10, 8, 2), 8), torch.device("cpu"))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in wide.parameters() if p.dim() == 4)
