"""RAIL-Fusion rules on hand-made inputs with hand-computed outputs."""

import numpy as np
import pytest

from edgeclip.errors import UsageError
from edgeclip.train.fusion import (
    fuse_gated,
    fuse_paper,
    zero_shot_probs,
)

# Label space of 5: learned classes 0,1 (task 0) and 2 (task 1); labels 3,4 from unseen domains.
P_ZS = np.array([
    [0.50, 0.10, 0.10, 0.20, 0.10],  # top-1 learned (task 0)
    [0.05, 0.05, 0.30, 0.35, 0.25],  # top-1 unseen, though class 2 holds 0.30
    [0.10, 0.10, 0.40, 0.20, 0.20],  # top-1 learned (task 1)
])
S_A = np.array([
    [1.0, 0.0, 0.5],
    [0.2, 0.4, 0.9],
    [0.0, 1.0, 0.0],
])
OFFSETS, SIZES = np.array([0, 2]), np.array([2, 1])


def test_zero_shot_probs_is_softmax_of_100_cos():
    img = np.array([[3.0, 0.0], [0.0, 0.5]])  # not unit length: cos normalises
    text = np.array([[1.0, 0.0], [0.6, 0.8]])
    # cosines: image 0 -> [1, 0.6]; image 1 -> [0, 0.8]
    expected = np.array([
        [1 / (1 + np.exp(-40.0)), np.exp(-40.0) / (1 + np.exp(-40.0))],
        [np.exp(-80.0) / (1 + np.exp(-80.0)), 1 / (1 + np.exp(-80.0))],
    ])
    got = zero_shot_probs(img, text)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-30)  # float32: 100 * cos amplifies rounding
    np.testing.assert_allclose(zero_shot_probs(img, text, logit_scale=1.0)[0],
                               [np.exp(1) / (np.exp(1) + np.exp(0.6)), np.exp(0.6) / (np.exp(1) + np.exp(0.6))],
                               rtol=1e-6)


def test_fuse_paper():
    got = fuse_paper(P_ZS, S_A, beta=0.8)
    expected = np.array([
        [0.2 * 0.50 + 0.8 * 1.0, 0.2 * 0.10 + 0.0, 0.2 * 0.10 + 0.8 * 0.5, 0.2 * 0.20, 0.2 * 0.10],
        [0.05, 0.05, 0.30, 0.35, 0.25],  # unseen top-1: pure zero-shot
        [0.2 * 0.10, 0.2 * 0.10 + 0.8, 0.2 * 0.40, 0.2 * 0.20, 0.2 * 0.20],
    ])
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_fuse_gated_restricts_scores_to_the_routed_task():
    got = fuse_gated(P_ZS, S_A, np.array([1, -1, 0]), OFFSETS, SIZES, beta=0.5)
    expected = np.array([
        [0.25, 0.05, 0.05 + 0.25, 0.10, 0.05],  # task 1: only class 2's score (0.5) enters
        [0.05, 0.05, 0.30, 0.35, 0.25],  # -1: zero-shot
        [0.05, 0.05 + 0.5, 0.20, 0.10, 0.10],  # task 0: classes 0, 1 (scores 0, 1)
    ])
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_bad_inputs_raise():
    with pytest.raises(UsageError):
        fuse_paper(P_ZS, S_A[:2])
    with pytest.raises(UsageError):
        fuse_gated(P_ZS, S_A, np.array([2, 0, 0]), OFFSETS, SIZES)
    with pytest.raises(UsageError):
        zero_shot_probs(np.ones((2, 3)), np.ones((4, 2)))
