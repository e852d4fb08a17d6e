"""A user's own image folders: split layouts, what would be misread, unreadable files, and a teacher cache that
knows which data it learnt from."""

import json

import pytest
import torch
from helpers import fast
from PIL import Image

from kdsearch import KdsearchError
from kdsearch.cli import main
from kdsearch.config import DataConfig
from kdsearch.data import load_dataset


def images(folder, classes=("cat", "dog"), per_class=6, shade=0):
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color = ((i * 37 + shade) % 255, 120 * c % 255, (200 - i * 11 + shade) % 255)
            Image.new("RGB", (10 + i % 3, 9), color=color).save(folder / name / f"{i}.png")
    return folder


def load(folder, **kw):
    return load_dataset(DataConfig(dataset="imagefolder", data_dir=str(folder), image_size=8, **kw), seed=0)


def test_train_and_test_folders_are_splits_not_classes(tmp_path, capsys):
    images(tmp_path / "train", per_class=10)
    images(tmp_path / "test", per_class=3)
    data = load(tmp_path)
    assert data.num_classes == 2 and data.classes == ("cat", "dog")
    assert len(data.test) == 6 and sorted(data.test.y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(data.train) + len(data.val) == 20 and len(data.val) == 4  # val cut from train/ (0.2)
    out = capsys.readouterr().out
    assert "2 classes (cat, dog); train 16, val 4, test 6 images (train/ and test/; val cut from it)" in out


def test_val_folder_labels_classes_as_train_does_even_when_it_lacks_one(tmp_path):
    images(tmp_path / "train", classes=("ant", "bee", "cow"))
    images(tmp_path / "validation", classes=("bee", "cow"), per_class=2)
    images(tmp_path / "test", classes=("ant", "cow"), per_class=2)
    data = load(tmp_path)
    assert data.num_classes == 3 and len(data.train) == 18
    assert sorted(data.val.y.tolist()) == [1, 1, 2, 2] and sorted(data.test.y.tolist()) == [0, 0, 2, 2]


@pytest.mark.parametrize("make, expected", [
    (lambda r: (images(r / "train"), images(r, classes=("bird",))),
     "looks like split folders (train) mixed with class folders (bird)"),
    (lambda r: images(r / "test"), "looks like split folders (test) without train/"),
    (lambda r: images(r, classes=("cat",)), "holds only the class 'cat': a classifier needs two or more"),
    (lambda r: (images(r), (r / "emu").mkdir()), "the class folder(s) emu hold no images"),
    (lambda r: (images(r / "train"), images(r / "val", classes=("cat", "owl"))),
     "has classes that"),
    (lambda r: (images(r / "train"), images(r / "val"), images(r / "valid")),
     "has 2 folders for the val split (val, valid): keep one of val/, valid/, validation/"),
    (lambda r: (images(r / "train"), images(r / "Train"), images(r / "test")),
     "has 2 folders for the train split (Train, train): keep one of train/"),
    (lambda r: (images(r / "train"), images(r / "test"), images(r / "TEST")),
     "has 2 folders for the test split (TEST, test): keep one of test/"),
])
def test_trees_that_would_be_misread_are_one_line_errors(tmp_path, make, expected):
    make(tmp_path)
    with pytest.raises(KdsearchError, match=None) as info:
        load(tmp_path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unreadable_images_are_an_error_naming_the_first_or_skipped_when_asked(tmp_path, capsys):
    images(tmp_path)
    for name in ("0.png", "3.png"):
        (tmp_path / "dog" / name).write_bytes(b"not a png")
    with pytest.raises(KdsearchError) as info:
        load(tmp_path)
    message = str(info.value)
    assert message.startswith("2 file(s) under") and "dog/0.png" in message and "skip_unreadable" in message
    data = load(tmp_path, skip_unreadable=True)
    assert len(data.train) + len(data.val) + len(data.test) == 10
    assert "left out 2 unreadable file(s)" in capsys.readouterr().out


def test_hidden_folders_are_not_classes(tmp_path):
    images(tmp_path)
    images(tmp_path / ".ipynb_checkpoints", classes=("cat",), per_class=1)
    assert load(tmp_path).classes == ("cat", "dog")


def truncated_jpeg(path):
    """A JPEG cut short: its header reads fine (PIL's verify() passes it), its pixels do not."""
    Image.effect_noise((64, 64), 60).convert("RGB").save(path, format="JPEG")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) * 2 // 3])


@pytest.mark.parametrize("memory_gb", [0.0, 1e-9])  # held in memory, and streamed from disk
def test_a_truncated_image_is_caught_before_training_however_the_data_are_read(tmp_path, memory_gb):
    images(tmp_path)
    truncated_jpeg(tmp_path / "cat" / "2.png")
    with pytest.raises(KdsearchError, match=r"^1 file\(s\) under .*/cat/2.png \(image file is truncated"):
        load(tmp_path, memory_gb=memory_gb)
    data = load(tmp_path, memory_gb=memory_gb, skip_unreadable=True)
    assert len(data.train) + len(data.val) + len(data.test) == 11


def test_skipping_that_empties_a_split_or_a_class_is_an_error(tmp_path):
    images(tmp_path / "train")
    images(tmp_path / "test", per_class=1)
    for f in (tmp_path / "test").rglob("*.png"):
        f.write_bytes(b"broken")
    with pytest.raises(KdsearchError, match="none of the 2 files under .*test' can be read as images"):
        load(tmp_path, skip_unreadable=True)
    images(tmp_path / "test", per_class=1)
    for f in (tmp_path / "train" / "dog").glob("*.png"):
        f.write_bytes(b"broken")
    with pytest.raises(KdsearchError, match="the class folder\\(s\\) dog hold no readable images"):
        load(tmp_path, skip_unreadable=True)


def teacher_dirs(workdir):
    return sorted(p.name for p in (workdir / ".kdsearch-cache" / "teachers").iterdir())


ARGS = ["--set", "data.dataset='imagefolder'", "--set", "data.image_size=8", "--set", "search.baselines=false",
        "--n-trials", "1", *fast()]


def test_two_image_folders_with_the_same_settings_get_their_own_teachers(workdir, capsys):
    images(workdir / "a", classes=("cat", "dog"))
    images(workdir / "b", classes=("cat", "dog", "emu"), shade=50)
    images(workdir / "c", classes=("cat", "dog"), shade=90)  # same names and counts as a, other pixels
    for name in ("a", "b", "c"):
        assert main(["run-study", "--data-dir", str(workdir / name), "--study-name", name, *ARGS]) == 0
    assert len(teacher_dirs(workdir)) == 3
    assert main(["run-study", "--data-dir", str(workdir / "a"), "--study-name", "a", *ARGS]) == 0
    assert len(teacher_dirs(workdir)) == 3  # the same data finds its own teacher again


def test_a_cached_teacher_whose_logits_do_not_fit_the_data_is_rebuilt(workdir, capsys):
    assert main(["run-study", "--study-name", "one", *fast(), "--n-trials", "1"]) == 0
    (entry,) = teacher_dirs(workdir)
    logits = workdir / ".kdsearch-cache" / "teachers" / entry / "train_logits.pt"
    torch.save(torch.zeros(5, 10), logits)
    capsys.readouterr()
    assert main(["run-study", "--study-name", "two", *fast(), "--n-trials", "1"]) == 0
    assert "does not match the data (logits of shape (5, 10) for 1079 images of 10 classes)" in capsys.readouterr().out
    assert torch.load(logits).shape == (1079, 10)


def test_the_teachers_latency_follows_the_latency_settings(workdir):
    assert main(["run-study", "--study-name", "one", *fast(), "--n-trials", "1"]) == 0
    assert main(["run-study", "--study-name", "two", *fast(), "--n-trials", "1", "--set", "latency.batch_size=64"]) == 0
    (entry,) = teacher_dirs(workdir)
    meta = json.loads((workdir / ".kdsearch-cache" / "teachers" / entry / "meta.json").read_text())
    by_settings = {json.loads(k)["batch_size"]: v for k, v in meta["latency_ms_by_settings"].items()}
    assert set(by_settings) == {1, 64} and by_settings[64] > by_settings[1]
    import optuna

    teacher = {name: optuna.load_study(study_name=name, storage=f"sqlite:///{workdir}/optuna.db").user_attrs["teacher"]
               for name in ("one", "two")}
    assert teacher["two"]["latency_ms"] > teacher["one"]["latency_ms"]  # each study timed it with its own settings


def test_a_changed_dataset_is_refused_on_resume(workdir, capsys):
    images(workdir / "pics")
    args = ["run-study", "--data-dir", str(workdir / "pics"), "--study-name", "pics", *ARGS]
    assert main(args) == 0
    images(workdir / "pics", classes=("cat", "dog", "emu"))  # the user adds a class
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "differ from those study 'pics' was made with" in err and "\n" not in err
    assert len(teacher_dirs(workdir)) == 1  # refused before any teacher was trained for the changed data


def test_the_study_keeps_its_first_teacher_figures_whatever_the_cache(workdir):
    import optuna

    assert main(["run-study", "--n-trials", "1", *fast()]) == 0
    first = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db").user_attrs["teacher"]
    assert main(["run-study", "--n-trials", "1", *fast(), "--cache-dir", str(workdir / "other-cache")]) == 0
    again = optuna.load_study(study_name="digits", storage=f"sqlite:///{workdir}/optuna.db").user_attrs["teacher"]
    assert again["latency_ms"] == first["latency_ms"] and again["params"] == first["params"]
