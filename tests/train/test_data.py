"""The bundled data: a fixed, stratified, disjoint digits split; photo patches; the batch stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genext.train import data

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = data.digits_split_indices()
    y = sklearn_datasets.load_digits().target
    assert len(train) == 1347 and len(test) == 450  # 75 / 25 of 1,797
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(range(len(y)))
    # every class holds its share in both parts, to within one image
    for d in range(10):
        share = np.mean(y == d)
        assert abs(np.sum(y[test] == d) - share * len(test)) <= 1, d
    again = data.digits_split_indices()
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    other = data.digits_split_indices(seed=1)
    assert not np.array_equal(test, other[1])  # the seed decides it


def test_digits_scaled_to_unit_range_with_labels():
    split = data.digits_split()
    raw = sklearn_datasets.load_digits()
    train, _ = data.digits_split_indices()
    assert split.x_train.shape == (1347, 1, 8, 8) and split.x_test.shape == (450, 1, 8, 8)
    assert split.x_train.dtype == torch.float32
    assert split.x_train.min() == -1 and split.x_train.max() == 1
    # pixel 0 -> -1, 16 -> 1, and the labels follow their images
    i = int(train[5])
    expected = torch.from_numpy(raw.images[i] / 8.0 - 1.0).float()
    assert torch.equal(split.x_train[5, 0], expected)
    assert int(split.y_train[5]) == raw.target[i]


def test_digits_upsampled():
    split = data.digits_split(size=16)
    assert split.x_train.shape == (1347, 1, 16, 16)
    assert -1 <= split.x_train.min() and split.x_train.max() <= 1
    # area-averaging back to 8x8 gives a slightly blurred copy of the same digits
    back = data.to_digit_scale(split.x_test)
    small = data.to_digit_scale(data.digits_split().x_test)
    assert np.corrcoef(back.ravel(), small.ravel())[0, 1] > 0.95
    assert np.corrcoef(back[:-1].ravel(), small[1:].ravel())[0, 1] < 0.8  # another digit


def test_photo_patches_hold_out_whole_images():
    split = data.photo_patches(32)
    assert split.x_train.shape[1:] == (3, 32, 32) and split.x_test.shape[1:] == (3, 32, 32)
    assert -1 <= split.x_test.min() and split.x_test.max() <= 1
    assert split.x_test.std() > 0.1  # real pictures, not a constant
    # test patches: the held-out images only, halved, cut without overlap
    skimage_data = pytest.importorskip("skimage.data")
    expected = sum(
        (getattr(skimage_data, n)().shape[0] // 2 // 32)
        * (getattr(skimage_data, n)().shape[1] // 2 // 32)
        for n in data.PHOTOS_TEST
    )
    assert len(split.x_test) == expected
    assert not set(data.PHOTOS_TRAIN) & set(data.PHOTOS_TEST)


def test_batch_stream_shards_cover_an_epoch_once():
    x = torch.arange(20).float()
    streams = [data.BatchStream(x, 5, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = torch.cat([s.next() for s in streams for _ in range(2)])
    assert sorted(seen.long().tolist()) == list(range(20))
    # the next epoch is another order
    again = torch.cat([s.next() for s in streams for _ in range(2)])
    assert not torch.equal(seen, again)


def test_batch_stream_resumes_the_same_order():
    x = torch.arange(23).float()  # 23 / 4: a short last batch that is dropped
    a = data.BatchStream(x, 4, seed=7)
    for _ in range(7):  # past the end of the first epoch (5 batches)
        a.next()
    state = a.state_dict()
    assert state == {"epoch": 1, "position": 2, "seed": 7}
    b = data.BatchStream(x, 4, seed=7)
    b.load_state_dict(state)
    for _ in range(8):
        assert torch.equal(a.next(), b.next())
    with pytest.raises(ValueError, match="seed"):
        data.BatchStream(x, 4, seed=8).load_state_dict(state)
