from __future__ import annotations

import numpy as np

from polymorphd.models.core.exitrule import exit_decides, exit_labels


def test_exit_decides_needs_every_class_outside_the_band() -> None:
    assert exit_decides(np.array([0.01, 0.99, 0.02]), 0.05, 0.95) is True
    assert exit_decides(np.array([0.01, 0.50, 0.99]), 0.05, 0.95) is False
    # the band is closed: a probability equal to lo or hi is undecided
    assert exit_decides(np.array([0.05, 0.99]), 0.05, 0.95) is False
    assert exit_decides(np.array([0.01, 0.95]), 0.05, 0.95) is False
    # (0, 1) never exits
    assert exit_decides(np.array([0.0, 1.0]), 0.0, 1.0) is False


def test_exit_decides_on_a_batch() -> None:
    P = np.array([[0.01, 0.99], [0.5, 0.99], [0.2, 0.3]])
    np.testing.assert_array_equal(exit_decides(P, 0.1, 0.9), [True, False, False])
    np.testing.assert_array_equal(exit_decides(P, 0.35, 0.4), [True, True, True])


def test_exit_labels_are_above_hi() -> None:
    np.testing.assert_array_equal(exit_labels(np.array([0.2, 0.9, 0.95]), 0.9), [False, False, True])
