"""Evaluation functions against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genext.train import data, evaluate

pytest.importorskip("sklearn")


def test_frechet_distance_of_known_gaussians():
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    got = evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, abs=1e-9)
    # a rotated pair: the distance does not depend on the basis
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rot = evaluate.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rot == pytest.approx(expected, abs=1e-7)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert evaluate.frechet_distance(
        np.array([3.0]), np.array([[4.0]]), np.array([0.0]), np.array([[1.0]])
    ) == pytest.approx(9 + 1)


def test_frechet_distance_of_samples_converges():
    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(20000, 2)) * [1.0, 2.0]
    f2 = rng.normal(size=(20000, 2)) * [1.0, 2.0] + [0.5, 0.0]
    got = evaluate.frechet_distance(*evaluate.gaussian_stats(f1), *evaluate.gaussian_stats(f2))
    assert got == pytest.approx(0.25, abs=0.05)
    with pytest.raises(ValueError, match="shapes"):
        evaluate.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_pca_mse_matches_numpy_svd():
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(5, 12))
    a = rng.normal(size=(200, 5)) @ basis + 0.1 * rng.normal(size=(200, 12)) + 3.0
    b = rng.normal(size=(50, 5)) @ basis + 0.1 * rng.normal(size=(50, 12)) + 3.0
    for k in (1, 3, 5):
        mean = a.mean(0)
        _, _, vt = np.linalg.svd(a - mean, full_matrices=False)
        v = vt[:k].T
        rec = (b - mean) @ v @ v.T + mean
        expected = np.mean((rec - b) ** 2)
        got = evaluate.pca_mse(torch.from_numpy(a), torch.from_numpy(b), k)
        assert got == pytest.approx(expected, rel=1e-9)
    assert evaluate.pca_mse(torch.from_numpy(a), torch.from_numpy(b), 12) < 1e-20  # full rank
    rec = evaluate.pca_reconstruct(torch.from_numpy(a), torch.from_numpy(b[:7]), 5)
    assert rec.shape == (7, 12) and torch.mean((rec - torch.from_numpy(b[:7])) ** 2) < 0.02
    with pytest.raises(ValueError, match="k must be"):
        evaluate.pca_mse(torch.from_numpy(a), torch.from_numpy(b), 0)


def test_codebook_stats():
    uniform = evaluate.codebook_stats(torch.arange(8).repeat(3), 16)
    assert uniform["perplexity"] == pytest.approx(8.0)
    assert uniform["usage"] == 0.5 and uniform["codes_used"] == 8
    one = evaluate.codebook_stats(torch.full((10,), 3), 4)
    assert one == {"perplexity": pytest.approx(1.0), "usage": 0.25, "codes_used": 1}
    # p = (1/2, 1/4, 1/4): entropy 1.5 ln 2, perplexity 2^1.5
    skew = evaluate.codebook_stats(torch.tensor([0, 0, 1, 2]), 3)
    assert skew["perplexity"] == pytest.approx(2**1.5)


def test_digit_classifier_and_fid_floor():
    split = data.digits_split()
    clf = evaluate.digit_classifier()
    acc = clf.accuracy(split.x_test, split.y_test)
    assert acc >= 0.98, acc
    assert clf.features(split.x_test[:3]).shape == (3, 45)  # one-vs-one: 10 * 9 / 2
    floor = evaluate.digit_fid_floor(clf)
    # real vs real is small; a blurred copy of the test set is much further away
    blurred = torch.nn.functional.avg_pool2d(split.x_test, 3, 1, 1)
    assert 0 <= floor < evaluate.digit_fid(blurred, split.x_test, clf)
    assert evaluate.digit_fid(split.x_test, split.x_test, clf) == pytest.approx(0, abs=1e-6)
    # precomputed features are accepted as they are
    f = clf.features(split.x_train)
    assert evaluate.digit_fid(f, split.x_test, clf) == pytest.approx(floor)
