"""Contexts from label co-occurrence, and the per-frame context cover (Polymorph, arXiv 2507.14959).

Offline, classes that appear together are grouped into small *contexts*, each of which gets one LoRA
adapter. Online, a frame's likely labels are covered by as few contexts as possible (greedy set cover),
so only those adapters run. Pure numpy: shared by training, eval and the daemon (torch-free).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ContextIndex",
    "cluster_contexts",
    "cooccurrence",
    "coverage",
    "greedy_cover",
]


def _as_label_matrix(Y: np.ndarray) -> np.ndarray:
    Y = np.asarray(Y)
    if Y.ndim != 2:
        raise ValueError(f"label matrix must be 2-D (frames, classes), got shape {Y.shape}")
    if Y.dtype != bool and Y.size and not np.isin(Y, (0, 1)).all():
        raise ValueError("label matrix must hold only 0/1 (or bool); binarise it first")
    return Y.astype(bool, copy=False)


def cooccurrence(Y: np.ndarray) -> np.ndarray:
    """(K, K) int64 counts of frames where classes i and j are both present; diagonal = class frequency."""
    Yf = _as_label_matrix(Y).astype(np.float64)  # BLAS matmul; integer matmul has none and is ~100x slower
    return np.rint(Yf.T @ Yf).astype(np.int64)  # exact: counts stay far below 2**53


def _jaccard(C: np.ndarray) -> np.ndarray:
    freq = np.diag(C).astype(np.float64)
    union = freq[:, None] + freq[None, :] - C
    with np.errstate(invalid="ignore", divide="ignore"):
        J = np.where(union > 0, C / np.maximum(union, 1), 0.0)
    np.fill_diagonal(J, 0.0)
    return J


def _agglomerate(J: np.ndarray, classes: np.ndarray, cap: int) -> list[list[int]]:
    """Average-linkage agglomeration of `classes` on affinity J, clusters capped at `cap` members.

    Merges stop when no pair of clusters that fits under the cap has positive affinity. Ties go to the
    lowest (row, column) pair, so the result is deterministic.
    """
    n = len(classes)
    if n == 0:
        return []
    S = J[np.ix_(classes, classes)].astype(np.float64)  # summed pairwise affinity between clusters
    size = np.ones(n, dtype=np.int64)
    members: list[list[int]] = [[int(c)] for c in classes]
    alive = np.ones(n, dtype=bool)
    # average affinity of every mergeable pair, -1 where not mergeable; symmetric, so the first argmax
    # hit is the lowest (row, column) pair with row < column
    A = S.copy() if cap >= 2 else np.full((n, n), -1.0)
    np.fill_diagonal(A, -1.0)
    while True:
        flat = int(np.argmax(A))
        a, b = divmod(flat, n)
        if A[a, b] <= 0.0:
            break
        S[a, :] += S[b, :]
        S[:, a] += S[:, b]
        size[a] += size[b]
        members[a].extend(members[b])
        alive[b] = False
        row = np.where(alive & (size + size[a] <= cap), S[a, :] / (size * size[a]), -1.0)
        row[a] = -1.0
        A[a, :] = row
        A[:, a] = row
        A[b, :] = -1.0
        A[:, b] = -1.0
    return [sorted(members[i]) for i in np.flatnonzero(alive)]


def _pack(classes: Iterable[int], cap: int) -> list[list[int]]:
    """Chunk classes (in index order) into groups of at most `cap`."""
    ordered = sorted(int(c) for c in classes)
    return [ordered[i : i + cap] for i in range(0, len(ordered), cap)]


def _cluster(J: np.ndarray, classes: np.ndarray, cap: int) -> list[list[int]]:
    """Agglomerate, then pack the leftover singletons together (a one-class adapter costs a forward pass
    for almost no benefit; unrelated classes sharing a context only cost head width)."""
    groups = _agglomerate(J, classes, cap)
    multi = [g for g in groups if len(g) > 1]
    singles = [g[0] for g in groups if len(g) == 1]
    return multi + _pack(singles, cap)


def _hubs(
    C: np.ndarray, contexts: list[list[int]], candidates: np.ndarray, hub_fraction: float
) -> np.ndarray:
    """Candidates that co-occur with classes of more than hub_fraction of the contexts they are not in."""
    n_ctx = len(contexts)
    if n_ctx < 2 or len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    K = C.shape[0]
    member = np.zeros((n_ctx, K), dtype=bool)
    for i, ctx in enumerate(contexts):
        member[i, ctx] = True
    together = C > 0
    np.fill_diagonal(together, False)
    touches = (together[candidates].astype(np.float64) @ member.T.astype(np.float64)) > 0  # (cand, n_ctx)
    own = member[:, candidates].T
    n_other = (touches & ~own).sum(axis=1)
    n_other_total = n_ctx - own.sum(axis=1)
    return candidates[n_other > hub_fraction * np.maximum(n_other_total, 1)]


def cluster_contexts(
    Y: np.ndarray, *, max_size: int = 8, hub_fraction: float = 0.5, min_frames: int = 1
) -> list[list[int]]:
    """Group classes into contexts of at most `max_size` classes by co-occurrence in Y (F, K).

    Affinity is Jaccard (frames with both / frames with either): unlike raw counts or conditional
    probability it does not let a frequent class attract everything, and unlike NPMI it is not inflated
    by a handful of frames of a rare class. Clustering is capped average-linkage agglomeration.

    Hubs (classes seen beside more than `hub_fraction` of the other contexts, e.g. "person") are taken out,
    the rest is re-clustered with room left in each context, and every context then receives the hubs it
    co-occurs with most, so one adapter covers "scene + hub" frames. Classes with fewer than `min_frames`
    positives (including never-seen ones) are packed into extra contexts so no class is unreachable.
    Deterministic; each context is a sorted list, contexts are sorted.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if hub_fraction < 0:
        raise ValueError(f"hub_fraction must be >= 0, got {hub_fraction}")
    C = cooccurrence(Y)
    K = C.shape[0]
    freq = np.diag(C)
    seen = freq >= max(min_frames, 1)  # never-seen classes are packed at the end whatever min_frames is
    active = np.flatnonzero(seen)
    rare = np.flatnonzero(~seen)
    J = _jaccard(C)

    contexts = _cluster(J, active, max_size)
    hubs = _hubs(C, contexts, active, hub_fraction)
    reserve = min(len(hubs), max_size // 2)
    if reserve > 0:
        rest = np.setdiff1d(active, hubs)
        contexts = _cluster(J, rest, max_size - reserve)
        placed = np.zeros(K, dtype=bool)
        for ctx in contexts:
            score = C[np.ix_(hubs, ctx)].sum(axis=1)  # frames shared with this context's classes
            order = np.lexsort((hubs, -score))
            chosen = [int(hubs[i]) for i in order[:reserve] if score[i] > 0]
            ctx.extend(chosen)
            ctx.sort()
            placed[chosen] = True
        unplaced = [int(h) for h in hubs if not placed[h]]
        contexts += _pack(unplaced, max_size)
    contexts += _pack(rare, max_size)
    assert K == 0 or set().union(*map(set, contexts)) == set(range(K))
    return sorted(contexts)


@dataclass(frozen=True)
class ContextIndex:
    """Contexts precomputed for covering every frame.

    The cover works on Python sets, not numpy: a frame has a handful of likely labels touching a handful
    of contexts, where a numpy call's fixed cost (microseconds) would dominate. The membership matrix is
    kept for vectorised merging.
    """

    sets: tuple[frozenset[int], ...]
    by_class: tuple[tuple[int, ...], ...]  # class -> indices of the contexts holding it
    member: np.ndarray  # (n_contexts, K) bool, read-only

    @classmethod
    def from_contexts(cls, contexts: Sequence[Sequence[int]], num_classes: int | None = None) -> ContextIndex:
        """Build from lists of class indices; num_classes defaults to the largest index + 1."""
        sets = tuple(frozenset(int(c) for c in ctx) for ctx in contexts)
        top = max((max(s) for s in sets if s), default=-1)
        K = top + 1 if num_classes is None else int(num_classes)
        by_class: list[list[int]] = [[] for _ in range(K)]
        member = np.zeros((len(sets), K), dtype=bool)
        for i, ctx in enumerate(sets):
            for c in sorted(ctx):
                if not 0 <= c < K:
                    raise ValueError(f"context {i} holds class {c}, outside 0..{K - 1}")
                by_class[c].append(i)
                member[i, c] = True
        member.flags.writeable = False
        return cls(sets=sets, by_class=tuple(tuple(b) for b in by_class), member=member)

    @property
    def num_classes(self) -> int:
        return len(self.by_class)

    def cover(
        self,
        labels: Iterable[int],
        max_sets: int | None = None,
        weights: np.ndarray | Mapping[int, float] | None = None,
    ) -> list[int]:
        """Greedy cover of `labels` (class indices); see greedy_cover. `weights` may also map label -> weight."""
        need = set(labels.tolist() if isinstance(labels, np.ndarray) else (int(x) for x in labels))
        if not need:
            return []
        K = len(self.by_class)
        cands: set[int] = set()
        for label in need:
            if not 0 <= label < K:
                raise ValueError(f"label {label} is outside 0..{K - 1} (the contexts know {K} classes)")
            holders = self.by_class[label]
            if not holders:
                raise ValueError(f"label {label} is in no context; recluster so every class has one")
            cands.update(holders)
        w: Mapping[int, float] | None = None
        if isinstance(weights, Mapping):
            w = weights
            if not all(label in w for label in need):
                raise ValueError(f"cover weights lack labels {sorted(need - set(w))}")
        elif weights is not None:
            order = sorted(need)
            w = dict(zip(order, np.asarray(weights, dtype=np.float64)[order].tolist(), strict=True))
        if w is not None and not all(0.0 <= w[label] < math.inf for label in need):
            raise ValueError("cover weights must be finite and >= 0")
        uncovered = need
        chosen: list[int] = []
        limit = len(self.sets) if max_sets is None else max_sets
        while uncovered and len(chosen) < limit:
            best, best_key = -1, None
            for c in cands:
                hit = self.sets[c] & uncovered
                if not hit:
                    continue
                # weighted gain first, raw count next (keeps zero-weight labels coverable), then the
                # smaller context, then the lower index
                gain = sum(w[x] for x in sorted(hit)) if w is not None else 0.0
                key = (gain, len(hit), -len(self.sets[c]), -c)
                if best_key is None or key > best_key:
                    best, best_key = c, key
            chosen.append(best)
            cands.discard(best)
            uncovered = uncovered - self.sets[best]
        return chosen


def greedy_cover(
    labels: Iterable[int],
    contexts: Sequence[Sequence[int]] | ContextIndex,
    max_sets: int | None = None,
    weights: np.ndarray | None = None,
) -> list[int]:
    """Context indices covering `labels`, in the order chosen by classic greedy set cover.

    Each step takes the context covering the most still-uncovered labels (by total `weights` (K,) first
    when given, then by count), ties to the smaller context, then the lower index. Stops after `max_sets`.
    With max_sets=None every label is covered. ValueError for a label that is in no context.
    """
    if max_sets is not None and max_sets < 0:
        raise ValueError(f"max_sets must be >= 0 or None, got {max_sets}")
    labels = list(labels.tolist() if isinstance(labels, np.ndarray) else (int(x) for x in labels))
    if isinstance(contexts, ContextIndex):
        index = contexts
    else:  # size the index to the labels too, so an unknown label reads as "in no context"
        top = max(labels, default=-1) + 1
        index = ContextIndex.from_contexts(contexts)
        if index.num_classes < top:
            index = ContextIndex.from_contexts(contexts, top)
    return index.cover(labels, max_sets=max_sets, weights=weights)


def coverage(
    Y: np.ndarray, contexts: Sequence[Sequence[int]] | ContextIndex, ks: Sequence[int] = (1, 2, 3)
) -> dict[str, float]:
    """Share of frames whose label set the greedy cover completes with <= k contexts, for each k.

    Frames without labels count as covered by 0 contexts; a frame with a label in no context is never
    covered. Keys are str(k).
    """
    Yb = _as_label_matrix(Y)
    F, K = Yb.shape
    index = contexts if isinstance(contexts, ContextIndex) else ContextIndex.from_contexts(contexts, K)
    if index.num_classes < K:
        raise ValueError(f"contexts know {index.num_classes} classes but Y has {K} columns")
    if F == 0:
        return {str(k): float("nan") for k in ks}
    fr, cols = np.nonzero(Yb)
    ends = np.cumsum(np.bincount(fr, minlength=F)).tolist()
    cols_l = cols.tolist()
    known = index.member.any(axis=0).tolist()
    cache: dict[tuple[int, ...], float] = {}  # frames repeat label sets a lot
    per_frame = np.empty(F, dtype=np.float64)
    start = 0
    for f, end in enumerate(ends):
        key = tuple(cols_l[start:end])
        start = end
        n = cache.get(key)
        if n is None:
            n = float(len(index.cover(key))) if all(known[c] for c in key) else math.inf
            cache[key] = n
        per_frame[f] = n
    return {str(k): float(np.mean(per_frame <= k)) for k in ks}
