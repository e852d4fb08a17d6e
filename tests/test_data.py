"""The train / validation / test split: disjoint, complete, sized as asked, fixed by the seed."""

import torch

from kdsearch.config import DataConfig
from kdsearch.data import load_dataset, split_indices


def test_split_is_disjoint_complete_and_sized():
    train, val, test = split_indices(1797, (0.2, 0.2), seed=0)
    assert (len(train), len(val), len(test)) == (1079, 359, 359)  # round(1797*0.2) = 359
    everything = torch.cat([train, val, test])
    assert sorted(everything.tolist()) == list(range(1797))


def test_split_is_fixed_by_the_seed():
    a = split_indices(100, (0.1, 0.2), seed=7)
    b = split_indices(100, (0.1, 0.2), seed=7)
    c = split_indices(100, (0.1, 0.2), seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])


def test_digits_load_as_uint8_images_in_three_disjoint_parts():
    data = load_dataset(DataConfig(), seed=0)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert (len(data.train), len(data.val), len(data.test)) == (1079, 359, 359)
    assert data.train.x.dtype == torch.uint8 and int(data.train.x.max()) == 255
    rows = {tuple(x.flatten().tolist()) + (int(y),) for part in (data.train, data.val, data.test)
            for x, y in zip(part.x, part.y)}
    # digits holds a few exact duplicate images; disjoint index sets still give ~all distinct rows
    assert len(rows) >= 1790
    again = load_dataset(DataConfig(), seed=0)
    assert torch.equal(again.test.x, data.test.x) and torch.equal(again.val.y, data.val.y)


def test_digits_read_without_scikit_learn_are_its_own():
    """The digits are read from scikit-learn's file directly (importing it costs a second); the images (0..16 scaled
    to 0..255) and labels are exactly load_digits'."""
    from sklearn.datasets import load_digits

    from kdsearch.data import _digits

    x, y = _digits()
    bunch = load_digits()
    assert torch.equal(x, torch.from_numpy(bunch.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1))
    assert torch.equal(y, torch.from_numpy(bunch.target).long()) and x.shape == (1797, 1, 8, 8)
