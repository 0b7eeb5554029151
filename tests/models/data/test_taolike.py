"""The tao profile: LVIS-like buckets, >= 10 contexts from co-occurrence, look-alikes apart, sparse and
persistent labels, videos that move between contexts; the default dataset untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from polymorphd.daemon.cli import main
from polymorphd.models.core.contexts import cluster_contexts
from polymorphd.models.core.errors import ConfigError
from polymorphd.models.data import sprites, tao, taolike
from polymorphd.models.data.taolike import TaoProfile

pytestmark = pytest.mark.skipif(
    len(sprites.available_class_names()) < 60, reason="the tao profile needs fashion-mnist and scikit-learn"
)
P = TaoProfile()


@pytest.fixture(scope="module")
def videos() -> list:
    lay = taolike.layout(P)
    return [list(taolike.render_video(P, s, lay)) for s in range(60)]


def test_buckets_follow_lvis_v1_proportions_and_weights_make_a_long_tail(videos) -> None:
    lay = taolike.layout(P)
    assert P.num_classes >= 100 and P.num_contexts >= 10
    # LVIS v1: 405 / 461 / 337 of 1,203 -> 40 / 46 / 34 of 120
    assert [lay.bucket.count(b) for b in "fcr"] == [40, 46, 34]
    counts = np.zeros(P.num_classes)
    for v in videos:
        for fr in v:
            counts[list(fr.labels)] += 1
    f, c, r = (counts[[k for k in range(P.num_classes) if lay.bucket[k] == b]].mean() for b in "fcr")
    assert f > 3 * c and c > 2 * r  # frames per class fall from bucket to bucket, as in LVIS
    stats = taolike.profile_statistics(P, [[fr.labels for fr in v] for v in videos], [[0] for _ in videos])
    assert stats.bucket_sizes == {"f": 40, "c": 46, "r": 34}


def test_contexts_partition_the_classes_with_hubs_and_keep_lookalikes_apart() -> None:
    lay = taolike.layout(P)
    assert len(lay.contexts) == 12
    members = [sum(k in g for g in lay.contexts) for k in range(P.num_classes)]
    assert all(members[k] == (P.hub_contexts if k in lay.hubs else 1) for k in range(P.num_classes))
    assert all(lay.bucket[h] == "f" for h in lay.hubs)
    stats = taolike.profile_statistics(P, [], [])
    assert stats.lookalike_pairs == 57 and stats.lookalikes_apart == 57  # 120 classes from 63 appearances
    for g in lay.contexts:  # every context gets part of the tail
        assert {lay.bucket[k] for k in g} == {"f", "c", "r"}


def test_labels_are_sparse_persistent_and_contexts_recoverable_from_co_occurrence(videos) -> None:
    lay = taolike.layout(P)
    labels = [[f.labels for f in v] for v in videos]
    stats = taolike.profile_statistics(P, labels, [[f.context for f in v] for v in videos])
    assert 1.0 <= stats.labels.mean_labels <= 2.5 and stats.labels.max_labels <= 3  # sparse: <= 3 of 120
    assert stats.labels.persistence > 0.9  # objects last a scene
    assert stats.labels.within_context > 0.9
    assert 1.2 < stats.contexts_per_video < 3  # videos move between contexts
    # a frame's labels come from its scene's context, bar the rare outsider (outside_prob per new object)
    inside = [set(f.labels) <= set(lay.contexts[f.context]) for v in videos for f in v]
    assert np.mean(inside) > 0.9
    Y = np.zeros((sum(map(len, labels)), P.num_classes), np.uint8)
    for i, fl in enumerate(x for v in labels for x in v):
        Y[i, list(fl)] = 1
    found = cluster_contexts(Y, max_size=14)
    # clustered contexts mostly lie inside one true context (a random grouping of 14: ~0.2); rare classes
    # with a handful of frames in 60 videos are what lands elsewhere
    purity = [max(len(set(g) & set(t)) for t in lay.contexts) / len(g) for g in found if len(g) > 1]
    assert len(found) >= 10 and np.mean(purity) > 0.6


def test_written_dataset_records_frequency_contexts_and_prints_statistics(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tao"
    rc = main(
        ["data", "synth", "--profile", "tao", "--out", str(out), "--videos", "4", "1", "1", "--frames", "20"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "classes: 120 (frequent 40, common 46, rare 34" in text
    assert "contexts: 12" in text and "look-alike pairs: 57 (57 in different contexts)" in text
    doc = json.loads((out / "annotations" / "train.json").read_text())
    assert {c["frequency"] for c in doc["categories"]} == {"f", "c", "r"}
    assert len(doc["info"]["contexts"]) == 12 and doc["info"]["profile"] == "tao"
    assert all(0 <= im["context"] < 12 for im in doc["images"])
    split = tao.load_split(out, "test")  # the loader reads it like any TAO split
    assert len(split.categories) == 120 and split.videos[0].frames[0].path.stat().st_size > 0
    labels, contexts = taolike.split_truth(out, "train")
    assert len(labels) == 4 and all(len(v) == 20 for v in labels)
    assert all(0 <= c < 12 for v in contexts for c in v)


def test_default_synth_is_unchanged_by_the_profile_option(tmp_path: Path, capsys) -> None:
    out = tmp_path / "default"
    assert main(["data", "synth", "--out", str(out), "--videos", "1", "0", "0", "--frames", "4"]) == 0
    doc = json.loads((out / "annotations" / "train.json").read_text())
    assert len(doc["categories"]) == 32 and "frequency" not in doc["categories"][0]
    assert "context" not in doc["images"][0] and doc["images"][0]["width"] == 128


@pytest.mark.parametrize(
    "kwargs, field",
    [({"num_classes": 200}, "num_classes"), ({"num_contexts": 1}, "num_contexts"),
     ({"bucket_shares": (0.5, 0.5, 0.5)}, "bucket_shares"), ({"hub_contexts": 13}, "hub_contexts")],
)  # fmt: skip
def test_profile_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"TaoProfile.{field}"):
        TaoProfile(**kwargs)
