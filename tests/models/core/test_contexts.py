from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polymorphd.models.core.contexts import (
    ContextIndex,
    cluster_contexts,
    cooccurrence,
    coverage,
    greedy_cover,
)


def _scenes(frames_per_scene: int = 40, hub: int | None = 12, seed: int = 0) -> np.ndarray:
    """Three scenes of four classes each (0-3, 4-7, 8-11), a hub (12) in every scene, class 13 never seen."""
    rng = np.random.default_rng(seed)
    K = 14
    rows = []
    for scene in range(3):
        for _ in range(frames_per_scene):
            y = np.zeros(K, dtype=bool)
            y[rng.choice(np.arange(4 * scene, 4 * scene + 4), size=rng.integers(1, 4), replace=False)] = True
            if hub is not None and rng.random() < 0.6:
                y[hub] = True
            rows.append(y)
    return np.array(rows)


def test_cooccurrence_counts_pairs_and_frequency_on_diagonal() -> None:
    Y = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    C = cooccurrence(Y)
    assert C.dtype == np.int64
    np.testing.assert_array_equal(C, [[3, 2, 1], [2, 2, 1], [1, 1, 1]])


@pytest.mark.parametrize(
    ("Y", "match"), [(np.zeros(3), "2-D"), (np.array([[0, 2]]), "0/1"), (np.array([[0.5, 1.0]]), "0/1")]
)
def test_cooccurrence_rejects_bad_label_matrices(Y: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cooccurrence(Y)


def test_cluster_recovers_scenes_shares_the_hub_and_keeps_unseen_classes() -> None:
    contexts = cluster_contexts(_scenes(), max_size=6)
    assert contexts == [[0, 1, 2, 3, 12], [4, 5, 6, 7, 12], [8, 9, 10, 11, 12], [13]]


def test_cluster_without_hubs_puts_each_class_in_exactly_one_context() -> None:
    contexts = cluster_contexts(_scenes(), max_size=6, hub_fraction=1.0)
    flat = sorted(c for ctx in contexts for c in ctx)
    assert flat == list(range(14))  # a partition: the hub is not duplicated
    assert [0, 1, 2, 3] in contexts and [4, 5, 6, 7] in contexts


def test_cluster_respects_max_size_and_reaches_every_class() -> None:
    rng = np.random.default_rng(3)
    Y = rng.random((300, 40)) < 0.08
    Y[:, 7] = False  # never seen
    for max_size in (1, 3, 8):
        contexts = cluster_contexts(Y, max_size=max_size)
        assert all(1 <= len(c) <= max_size for c in contexts)
        assert set().union(*map(set, contexts)) == set(range(40))
        assert all(c == sorted(c) for c in contexts) and contexts == sorted(contexts)
        assert cluster_contexts(Y, max_size=max_size) == contexts  # deterministic


def test_cluster_packs_rare_classes_apart_from_real_contexts() -> None:
    Y = _scenes(hub=None)
    Y[0, 13] = True  # seen once: below min_frames=2, packed with the never-seen 12
    contexts = cluster_contexts(Y, max_size=4, min_frames=2)
    assert contexts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13]]
    assert [13] in cluster_contexts(Y, max_size=1, min_frames=2)


def test_cluster_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_size must be >= 1, got 0"):
        cluster_contexts(_scenes(), max_size=0)
    with pytest.raises(ValueError, match="hub_fraction"):
        cluster_contexts(_scenes(), hub_fraction=-0.1)


CONTEXTS = [[0, 1, 2], [2, 3], [3, 4, 5, 6], [6, 7], [0, 7]]


def test_greedy_cover_picks_most_uncovered_first() -> None:
    assert greedy_cover([3, 4, 5, 0], CONTEXTS) == [2, 4]  # then 0: context 4 is smaller than 0
    assert greedy_cover([0, 1, 2, 3], CONTEXTS) == [0, 1]
    assert greedy_cover([], CONTEXTS) == []


def test_greedy_cover_ties_go_to_smaller_then_lower_index() -> None:
    # 2 is in contexts 0 (size 3) and 1 (size 2): the smaller wins
    assert greedy_cover([2], CONTEXTS) == [1]
    # 7 is in contexts 3 and 4, both size 2: the lower index wins
    assert greedy_cover([7], CONTEXTS) == [3]


def test_greedy_cover_stops_at_max_sets() -> None:
    # each context covers one label: smaller contexts first, then lower index
    assert greedy_cover([1, 3, 7], CONTEXTS) == [1, 3, 0]
    assert greedy_cover([1, 3, 7], CONTEXTS, max_sets=2) == [1, 3]
    assert greedy_cover([1, 3, 7], CONTEXTS, max_sets=0) == []


def test_greedy_cover_weights_rank_before_counts() -> None:
    w = np.zeros(8)
    w[7] = 1.0
    # by count context 2 (3, 4) comes first; by weight the context holding 7 does
    assert greedy_cover([3, 4, 7], CONTEXTS, max_sets=1) == [2]
    assert greedy_cover([3, 4, 7], CONTEXTS, max_sets=1, weights=w) == [3]
    # zero-weight labels are still covered
    assert greedy_cover([3, 4, 7], CONTEXTS, weights=w) == [3, 2]


def test_greedy_cover_rejects_orphans_and_bad_weights() -> None:
    with pytest.raises(ValueError, match="label 9 is in no context"):
        greedy_cover([1, 9], CONTEXTS)
    with pytest.raises(ValueError, match="label 8 is in no context"):
        greedy_cover([8], ContextIndex.from_contexts(CONTEXTS, 9))
    with pytest.raises(ValueError, match=r"outside 0\.\.7"):
        greedy_cover([-1], CONTEXTS)
    with pytest.raises(ValueError, match="finite and >= 0"):
        greedy_cover([1], CONTEXTS, weights=-np.ones(8))
    with pytest.raises(ValueError, match="max_sets"):
        greedy_cover([1], CONTEXTS, max_sets=-1)


def test_context_index_rejects_classes_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"context 1 holds class 5, outside 0\.\.3"):
        ContextIndex.from_contexts([[0, 1], [5]], 4)


@st.composite
def _cover_case(draw: st.DrawFn) -> tuple[list[list[int]], list[int], np.ndarray | None]:
    K = draw(st.integers(1, 20))
    n = draw(st.integers(1, 8))
    contexts = [draw(st.lists(st.integers(0, K - 1), max_size=6, unique=True)) for _ in range(n)]
    for c in range(K):  # every class somewhere
        if not any(c in ctx for ctx in contexts):
            contexts[draw(st.integers(0, n - 1))].append(c)
    labels = draw(st.lists(st.integers(0, K - 1), max_size=K))
    weights = draw(st.none() | st.lists(st.floats(0, 1), min_size=K, max_size=K).map(np.array))
    return contexts, labels, weights


@settings(max_examples=200, deadline=None)
@given(_cover_case(), st.integers(0, 4))
def test_greedy_cover_property(case: tuple, max_sets: int) -> None:
    contexts, labels, weights = case
    chosen = greedy_cover(labels, contexts, weights=weights)
    assert len(chosen) == len(set(chosen))
    covered = set().union(*(contexts[i] for i in chosen)) if chosen else set()
    assert set(labels) <= covered
    # every pick covers something new
    seen: set[int] = set()
    for i in chosen:
        assert set(contexts[i]) & (set(labels) - seen)
        seen |= set(contexts[i])
    limited = greedy_cover(labels, contexts, max_sets=max_sets, weights=weights)
    assert len(limited) <= max_sets
    assert limited == chosen[: len(limited)]  # the same greedy run, cut short


def test_coverage_on_a_hand_made_label_matrix() -> None:
    contexts = [[0, 1], [2, 3], [4, 5], [6, 7]]
    Y = np.zeros((5, 9), dtype=bool)
    Y[0, [0, 1]] = True  # 1 context
    Y[1, [0, 2]] = True  # 2
    Y[2, [0, 2, 4]] = True  # 3
    Y[3, [0, 2, 4, 6]] = True  # 4
    # frame 4: no labels, covered by 0
    assert coverage(Y, contexts) == {"1": 0.4, "2": 0.6, "3": 0.8}
    assert coverage(Y, contexts, ks=(0, 4)) == {"0": 0.2, "4": 1.0}
    Y[4, 8] = True  # class 8 is in no context: never covered
    assert coverage(Y, contexts, ks=(4,)) == {"4": 0.8}


def test_coverage_of_clustered_scenes_needs_one_context_per_frame() -> None:
    Y = _scenes()
    assert coverage(Y, cluster_contexts(Y, max_size=6)) == {"1": 1.0, "2": 1.0, "3": 1.0}
