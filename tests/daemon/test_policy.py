from __future__ import annotations

import numpy as np
import pytest

from polymorphd.daemon.policy import ContextPolicy
from polymorphd.models.core.contexts import greedy_cover
from polymorphd.models.core.errors import ConfigError
from polymorphd.models.core.knobs import PolicyKnobs, validate

K = 8
CONTEXTS = [[0, 1, 2], [2, 3], [4, 5], [6, 7]]


def _p(**high: float) -> np.ndarray:
    """Exit probabilities: 0.01 everywhere except the given classes (c0=0.9, ...)."""
    p = np.full(K, 0.01, dtype=np.float32)
    for name, value in high.items():
        p[int(name[1:])] = value
    return p


def _mask(*classes: int) -> np.ndarray:
    m = np.zeros(K, dtype=bool)
    m[list(classes)] = True
    return m


def _policy(**cfg: object) -> ContextPolicy:
    defaults: dict[str, object] = {"refresh_every": 0, "surprise_jaccard": 0.0}  # isolate what a test checks
    return ContextPolicy(CONTEXTS, K, PolicyKnobs(**{**defaults, **cfg}))


def test_covers_exit_likely_labels() -> None:
    pol = _policy()
    st = pol.new_state()
    assert pol.select(st, _p(c0=0.9, c1=0.3)) == [0]
    assert st.last_reason == "cover" and st.last_likely == {0, 1}
    assert pol.select(st, _p(c0=0.9, c4=0.25)) == [0, 2]
    assert pol.select(st, _p(c0=0.3, c4=0.95)) == [0, 2]  # a set, in index order, whatever is most probable
    assert pol.select(st, _p(c1=0.15)) == []  # under the recall threshold
    assert st.last_reason == "empty"


def test_max_adapters_is_respected_and_spent_on_the_most_probable() -> None:
    pol = _policy(max_adapters=2)
    st = pol.new_state()
    chosen = pol.select(st, _p(c0=0.3, c4=0.9, c6=0.6))
    assert chosen == [2, 3]
    assert pol.select(st, _p(c0=0.3, c4=0.9, c6=0.6, c3=0.5)) == [2, 3]
    pol = _policy(max_adapters=1)
    assert pol.select(pol.new_state(), _p(c0=0.3, c4=0.9, c6=0.6)) == [2]


def test_recent_labels_stay_likely_for_keep_frames() -> None:
    pol = _policy(keep_frames=2)
    st = pol.new_state()
    pol.observe(st, _mask(6))
    assert pol.select(st, _p(c0=0.5)) == [0, 3]  # the published label's context and the exit's
    assert st.last_likely == {0, 6}
    pol.observe(st, _mask(0))
    pol.select(st, _p(c0=0.5))
    assert st.last_likely == {0, 6}  # 6 was published 2 frames ago: still kept
    pol.observe(st, _mask(0))
    assert pol.select(st, _p(c0=0.5)) == [0]  # 3 frames ago: forgotten
    assert st.last_likely == {0}
    pol = _policy(keep_frames=0)
    st = pol.new_state()
    pol.observe(st, _mask(6))
    assert pol.select(st, _p()) == []


def test_published_labels_outrank_exit_guesses() -> None:
    pol = _policy(max_adapters=1)
    st = pol.new_state()
    pol.observe(st, _mask(6))
    # the exit now sees class 0, fairly sure, and 6 barely: the published 6 still wins the one slot
    assert pol.select(st, _p(c0=0.8)) == [3]


def test_refresh_widens_on_every_nth_frame() -> None:
    pol = _policy(refresh_every=3)
    st = pol.new_state()
    p = _p(c0=0.9, c4=0.15)  # 4 is between recall_threshold / 2 and recall_threshold
    reasons, chosen = [], []
    for _ in range(7):
        chosen.append(pol.select(st, p))
        reasons.append(st.last_reason)
    assert reasons == ["cover", "cover", "refresh", "cover", "cover", "refresh", "cover"]
    assert chosen[2] == [0, 2] and chosen[0] == [0]
    st.reset()
    pol.select(st, p)
    assert st.frame == 1 and st.last_reason == "cover"


def test_surprise_when_the_exit_disagrees_with_the_last_labels() -> None:
    pol = _policy(surprise_jaccard=0.3, keep_frames=0)
    st = pol.new_state()
    # nothing seen before: anything likely is a surprise
    assert pol.select(st, _p(c0=0.9, c6=0.12)) == [0, 3]
    assert st.last_reason == "surprise"
    pol.observe(st, _mask(0))
    assert pol.select(st, _p(c0=0.9, c6=0.12)) == [0]  # Jaccard({0}, {0}) = 1
    assert st.last_reason == "cover"
    pol.observe(st, _mask(0))
    # exit sees {0, 1, 2, 4}: Jaccard with {0} = 1/4 < 0.3 -> widen to 6 as well
    chosen = pol.select(st, _p(c0=0.9, c1=0.8, c2=0.8, c4=0.8, c6=0.12))
    assert st.last_reason == "surprise" and st.last_likely == {0, 1, 2, 4, 6}
    assert chosen == [0, 2]  # still at most max_adapters
    pol.observe(st, _mask(0, 1, 2, 4))
    pol.select(st, _p(c0=0.9, c1=0.8, c2=0.8, c4=0.8, c6=0.12))
    assert st.last_reason == "cover"
    # two empty sets agree: no surprise
    pol.observe(st, _mask())
    assert pol.select(st, _p()) == [] and st.last_reason == "empty"


def test_merge_scores_covered_classes_by_their_adapters() -> None:
    pol = ContextPolicy([[0, 1, 2], [2, 3], [4, 5], [5, 6, 7]], K, PolicyKnobs())
    exit_p = np.linspace(0.0, 0.7, K).astype(np.float32)
    rows = np.array([np.full(K, 0.9), np.full(K, 0.5), np.full(K, 0.2)], dtype=np.float32)
    merged = pol.merge(exit_p, rows, [0, 1, 3])
    expected = exit_p.copy()
    expected[[0, 1]] = 0.9
    expected[2] = (0.9 + 0.5) / 2  # in contexts 0 and 1: mean
    expected[3] = 0.5
    expected[[5, 6, 7]] = 0.2
    # class 4 is in no chosen context: keeps the exit's score
    np.testing.assert_allclose(merged, expected, rtol=1e-6)
    assert merged.dtype == np.float32
    np.testing.assert_array_equal(pol.merge(exit_p, np.zeros((0, K)), []), exit_p)


def test_select_then_merge_never_blinds_a_class() -> None:
    rng = np.random.default_rng(0)
    pol = ContextPolicy(CONTEXTS, K, PolicyKnobs(max_adapters=1))
    st = pol.new_state()
    for _ in range(20):
        p = rng.random(K).astype(np.float32)
        chosen = pol.select(st, p)
        assert len(chosen) <= 1
        rows = np.full((len(chosen), K), -1.0, dtype=np.float32)
        merged = pol.merge(p, rows, chosen)
        covered = set().union(*(CONTEXTS[c] for c in chosen)) if chosen else set()
        for k in range(K):
            assert merged[k] == (-1.0 if k in covered else p[k])
        pol.observe(st, merged > 0.5)


def test_select_matches_greedy_cover_on_the_likely_set() -> None:
    pol = ContextPolicy(CONTEXTS, K, PolicyKnobs(max_adapters=4, refresh_every=0))
    st = pol.new_state()
    p = _p(c1=0.9, c3=0.8, c5=0.7, c7=0.6)
    assert pol.select(st, p) == greedy_cover([1, 3, 5, 7], CONTEXTS, weights=p)


def test_rejects_bad_shapes_and_orphan_classes() -> None:
    pol = _policy()
    st = pol.new_state()
    with pytest.raises(ValueError, match=r"exit_probs has shape \(7,\); expected \(8,\)"):
        pol.select(st, np.zeros(7))
    with pytest.raises(ValueError, match=r"labels has shape \(2, 8\)"):
        pol.observe(st, np.zeros((2, K), bool))
    with pytest.raises(ValueError, match=r"expected \(1, 8\)"):
        pol.merge(np.zeros(K), np.zeros((2, K)), [0])
    with pytest.raises(ValueError, match=r"classes \[7\] are in no context"):
        ContextPolicy([[0, 1, 2, 3, 4, 5, 6]], K, PolicyKnobs())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_adapters": 0}, "max_adapters"),
        ({"recall_threshold": 1.0}, "recall_threshold"),
        ({"keep_frames": -1}, "keep_frames"),
        ({"refresh_every": 2.5}, "refresh_every"),
        ({"surprise_jaccard": 1.5}, "surprise_jaccard"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PolicyKnobs(**kwargs)  # type: ignore[arg-type]


def test_config_dict_round_trip() -> None:
    cfg = PolicyKnobs(max_adapters=3, keep_frames=5)
    assert validate(PolicyKnobs, cfg.model_dump()) == cfg
    with pytest.raises(ConfigError, match=r"unknown knob 'budget'; valid knobs are max_adapters, "):
        validate(PolicyKnobs, {"budget": 1})


def test_support_drops_recent_labels_the_exit_no_longer_sees() -> None:
    """A hand-made sequence: a scene of c4 (context 2), then a cut to c6 (context 3). Without support the
    departed c4 keeps its adapter for keep_frames frames; with support it goes as soon as the exit drops it."""
    frames = [_p(c4=0.9), _p(c4=0.9), _p(c6=0.9, c4=0.02), _p(c6=0.9, c4=0.02), _p(c6=0.9, c4=0.12)]
    labels = [_mask(4), _mask(4), _mask(6), _mask(6), _mask(6)]

    def run(**cfg: object) -> list[list[int]]:
        pol = _policy(keep_frames=3, **cfg)
        st = pol.new_state()
        out = []
        for p, lab in zip(frames, labels, strict=True):
            out.append(pol.select(st, p))
            pol.observe(st, lab)
        return out

    assert run() == [[2], [2], [2, 3], [2, 3], [2, 3]]  # v1: the recent c4 holds context 2 for 3 frames
    # c4 at 0.02 is below support: one adapter per frame, as the frame's one true context; at 0.12 the exit
    # still sees it a little, so its adapter comes back (support is a floor, not a switch)
    assert run(support=0.05) == [[2], [2], [3], [3], [2, 3]]


def test_support_keeps_a_present_label_the_exit_scores_low_but_above_support() -> None:
    pol = _policy(keep_frames=2, support=0.05)
    st = pol.new_state()
    pol.select(st, _p(c0=0.9))
    pol.observe(st, _mask(0))
    # c0 at 0.1: below recall_threshold (0.2), so only continuity keeps it, and support allows it
    assert pol.select(st, _p(c0=0.1)) == [0] and st.last_likely == {0}
    assert pol.select(st, _p(c0=0.01)) == [] and st.last_reason == "empty"


def test_class_recall_picks_the_adapters_the_frames_labels_need_and_fewer_than_one_threshold() -> None:
    """A hand-made scene: c0 (context 0) throughout, its look-alike c4 (context 2) entering at frame 4 and
    leaving at frame 6, c6 (context 3) never present. The exit scores the absent c4 and c6 at 0.25-0.3, above
    the single recall_threshold (0.2), so that one threshold fills both adapters on every frame. Cuts fit
    on a calibration set where c4 and c6 score above 0.4 when present keep only the needed contexts."""
    from polymorphd.models.core.calibrate import recall_thresholds

    rng = np.random.default_rng(0)
    Y = rng.random((400, K)) < 0.3
    P = np.where(Y, rng.uniform(0.45, 0.95, Y.shape), rng.uniform(0.0, 0.35, Y.shape))
    cuts, _ = recall_thresholds(Y, P, recall=0.9, min_positives=20)
    assert (cuts > 0.35).all() and (cuts < 0.55).all()
    absent = {"c4": 0.3, "c6": 0.25}
    frames = [
        _p(c0=0.8, **absent), _p(c0=0.8, **absent), _p(c0=0.8, **absent),
        _p(c0=0.8, c4=0.7, c6=0.25), _p(c0=0.8, c4=0.7, c6=0.25),
        _p(c0=0.8, c4=0.02, c6=0.25), _p(c0=0.8, c4=0.02, c6=0.25),
    ]  # fmt: skip
    labels = [_mask(0)] * 3 + [_mask(0, 4)] * 2 + [_mask(0)] * 2
    needed = [[0]] * 3 + [[0, 2]] * 2 + [[0]] * 2  # contexts covering the frame's true labels

    def run(class_recall: np.ndarray | None, **cfg: object) -> list[list[int]]:
        pol = ContextPolicy(
            CONTEXTS, K, PolicyKnobs(refresh_every=0, surprise_jaccard=0.0, **cfg), class_recall
        )
        st = pol.new_state()
        out = []
        for p, lab in zip(frames, labels, strict=True):
            out.append(pol.select(st, p))
            pol.observe(st, lab)
        return out

    single = run(None)
    assert all(len(c) == 2 for c in single)  # max_adapters, whatever the frame holds
    # per-class cuts: the needed contexts, except that the departed c4 stays 2 frames (keep_frames) ...
    assert run(cuts) == [*needed[:5], [0, 2], [0, 2]]
    # ... unless the recent-labels rule also asks the exit (support): then exactly what the labels need
    assert run(cuts, support=0.05) == needed
    assert sum(map(len, run(cuts, support=0.05))) == 9 < sum(map(len, single)) == 14


def test_class_recall_must_have_one_finite_cut_per_class() -> None:
    with pytest.raises(ValueError, match=r"expected \(8,\) finite thresholds"):
        ContextPolicy(CONTEXTS, K, PolicyKnobs(), np.full(7, 0.3))
    with pytest.raises(ValueError, match="non-finite"):
        ContextPolicy(CONTEXTS, K, PolicyKnobs(), np.array([0.3] * 7 + [np.nan]))
