"""polymorphd eval / bench on a tiny synthetic TAO dataset and the tiny bundle."""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest

from polymorphd.daemon.engine import MODES, load_engine
from polymorphd.daemon.tools.bench import cli_bench
from polymorphd.daemon.tools.evaluate import cli_eval, evaluate, label_summary, run_eval
from polymorphd.models.core.errors import ConfigError, DataError
from polymorphd.models.core.metrics import label_quality
from polymorphd.models.core.preprocess import InputSpec, preprocess
from polymorphd.models.data.tao import load_split

torch = pytest.importorskip("torch")


def args(bundle, data, **kw) -> argparse.Namespace:
    base = dict(bundle=str(bundle), data=str(data), split="validation", mode="full", json=None, threads=1,
                max_frames=None)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_full_mode_map_equals_a_reference_computation(tiny_bundle, tiny_run, dataset):
    from sklearn.metrics import average_precision_score

    from polymorphd.models.train.run import load_run

    run = load_run(tiny_run)
    spec = InputSpec.from_dict(run.config["input"])
    split = load_split(dataset, "validation", include_unannotated=True)
    annotated = split.annotated_frames()
    assert 0 < len(annotated) < len(split.frames())  # unannotated frames are streamed, not scored
    with torch.no_grad():
        S = np.stack([
            torch.sigmoid(run.vit(torch.from_numpy(preprocess(cv2.imread(str(f.path)), spec))))[0].numpy()
            for f in annotated
        ])  # fmt: skip
    Y = split.multi_hot(annotated, run.config["class_ids"])
    aps = [average_precision_score(Y[:, k], S[:, k]) for k in range(Y.shape[1]) if Y[:, k].any()]
    engine = load_engine(tiny_bundle, threads=1)
    report = evaluate(engine, split, ["full"]).report
    row = report["modes"]["full"]
    assert row["map"] == pytest.approx(float(np.mean(aps)), abs=1e-6)
    assert row["frames"] == len(split.frames()) == report["frames"]
    assert report["annotated_frames"] == len(annotated)
    assert row["exit_rate"] == {"0": 0.0, "1": 0.0, "final": 1.0}
    per_class = row["per_class_ap"]
    assert sum(v is None for v in per_class.values()) == int((~Y.any(axis=0)).sum())  # no positive: n/a
    assert row["latency_ms"]["p50"] > 0 and row["fps"] > 0 and report["peak_rss_mb"] > 0


def test_eval_all_modes_prints_one_table_and_writes_json(tiny_bundle, dataset, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli_eval(args(tiny_bundle, dataset, mode="all", json=str(out), max_frames=7)) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith(
        "| mode | mAP | label F1 | exact match | exit rates | adapters/frame | GFLOPs/frame | p50 ms | p95 ms | fps"
    )
    assert [line.split("|")[1].strip() for line in table[2:]] == list(MODES)
    report = json.loads(out.read_text())
    assert set(report["modes"]) == set(MODES)
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    for m, row in report["modes"].items():
        assert row["frames"] == 7  # --max-frames per mode
        # the table shows the report's numbers: F1 as a fraction, exact match as a percentage
        assert cells[m][1:3] == [f"{row['label_f1']:.3f}", f"{row['exact_match']:.1%}"]
        assert f"  {m}" in text.split("by answering exit")[1]  # one footer line per mode
        assert sum(row["exit_rate"].values()) == pytest.approx(1.0)
        assert row["gflops_per_frame"] > 0
    assert report["modes"]["full"]["speedup_vs_full"] == pytest.approx(1.0)
    assert report["modes"]["full"]["adapters_per_frame"] == 0
    assert report["modes"]["polymorph"]["adapters_per_frame"] > 0  # tiny run: exits never decide


def _published(engine, split, mode):
    """Reference: every video through a fresh stream state, the labels the engine returns on annotated frames."""
    engine.set_knobs(mode=mode)
    rows, exits = [], []
    for video in split.videos:
        state = engine.new_state()
        for f in video.frames:
            r = engine.infer(cv2.imread(str(f.path), cv2.IMREAD_COLOR), state)
            if f.labels is not None:
                rows.append(r.labels)
                exits.append(r.exit)
    pred = np.zeros((len(rows), len(engine.classes)), dtype=bool)
    for i, labels in enumerate(rows):
        pred[i, labels] = True
    return pred, exits


def test_label_quality_per_mode_and_exit_is_that_of_the_published_labels(tiny_bundle, dataset):
    split = load_split(dataset, "validation", include_unannotated=True)
    Y = split.multi_hot(split.annotated_frames(), load_engine(tiny_bundle).class_ids).astype(bool)
    modes = ["full", "early-exit", "polymorph"]
    # the random tiny exits sit near p = 0.5: find narrow undecided windows that send some frames out early
    windows = [[[c - w, c + w], [0.4, 0.6]] for c in (0.5, 0.49, 0.51) for w in (0.02, 0.01, 0.03, 0.005)]
    for window in windows:
        engine = load_engine(tiny_bundle, threads=1)
        engine.set_knobs(exit_thresholds=window)
        report = evaluate(engine, split, modes).report
        by_exit = report["modes"]["early-exit"]["label_quality_by_exit"]
        if sum(q["annotated_frames"] > 0 for q in by_exit.values()) >= 2:
            break
    else:
        pytest.fail(f"no exit window in {windows} mixes exit and final frames on the tiny bundle")
    reference = load_engine(tiny_bundle, threads=1)
    reference.set_knobs(exit_thresholds=window)
    for m in modes:
        pred, exits = _published(reference, split, m)
        row = report["modes"][m]
        assert {k: row[k] for k in ("label_f1", "exact_match")} == pytest.approx(label_quality(pred, Y))
        assert set(row["label_quality_by_exit"]) == {"0", "1", "final"}
        for key, q in row["label_quality_by_exit"].items():
            mask = np.array([str(e) == key for e in exits])
            assert q["annotated_frames"] == mask.sum()
            if mask.any():
                want = label_quality(pred[mask], Y[mask])
                assert (q["label_f1"], q["exact_match"]) == pytest.approx(
                    (want["label_f1"], want["exact_match"])
                )
            else:
                assert q["label_f1"] is q["exact_match"] is None
    assert report["modes"]["full"]["label_quality_by_exit"]["final"]["annotated_frames"] == len(Y)


def test_label_summary_splits_frames_by_the_exit_that_answered():
    Y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=bool)
    pred = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)
    overall, by_exit = label_summary(pred, Y, [0, "final", 0, "final"], [0, 1, "final"])
    # per-frame F1: 1, 2/3, 0 (a label where there is none), 1
    assert overall == pytest.approx({"label_f1": (1 + 2 / 3 + 0 + 1) / 4, "exact_match": 0.5})
    assert by_exit["0"] == pytest.approx({"annotated_frames": 2, "label_f1": 0.5, "exact_match": 0.5})
    assert by_exit["final"] == pytest.approx({"annotated_frames": 2, "label_f1": 5 / 6, "exact_match": 0.5})
    assert by_exit["1"] == {"annotated_frames": 0, "label_f1": None, "exact_match": None}


def test_eval_set_applies_engine_knobs_to_every_mode_and_records_them(tiny_bundle, dataset, tmp_path, capsys):
    out = tmp_path / "r.json"
    knobs = ["exit_thresholds=[[0.5,0.5],[0,1]]", "max_adapters=1"]  # exit 0 decides every frame
    assert cli_eval(args(tiny_bundle, dataset, mode="all", json=str(out), max_frames=5, set=knobs)) == 0
    report = json.loads(out.read_text())
    assert report["knobs"] == {"exit_thresholds": [[0.5, 0.5], [0, 1]], "max_adapters": 1}
    assert all(report["modes"][m]["exit_rate"]["0"] == 1.0 for m in MODES if m != "full")
    assert report["modes"]["full"]["exit_rate"]["final"] == 1.0  # full has no exits whatever the knobs
    assert 'knobs set: {"exit_thresholds"' in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown knob 'max_adaptors'"):
        cli_eval(args(tiny_bundle, dataset, mode="full", set=["max_adaptors=1"]))
    with pytest.raises(ConfigError, match="--set: 'exit0_lo' is not KEY=VALUE"):
        cli_eval(args(tiny_bundle, dataset, mode="full", set=["exit0_lo"]))


def test_eval_without_split_scores_test_when_present_else_says_calibration(
    tiny_bundle, dataset, tmp_path, capsys
):
    import shutil

    report = run_eval(args(tiny_bundle, dataset, split=None, max_frames=2), ["full"]).report
    assert report["split"] == "validation"
    assert "not a test" in report["split_reason"]
    assert "evaluating split 'validation': no test split" in capsys.readouterr().err
    with_test = tmp_path / "with_test"
    shutil.copytree(dataset, with_test)
    shutil.copy(with_test / "annotations" / "validation.json", with_test / "annotations" / "test.json")
    report = run_eval(args(tiny_bundle, with_test, split=None, max_frames=2), ["full"]).report
    assert (report["split"], report["split_reason"]) == ("test", "the dataset's test split")


def test_context_modes_agree_on_map(tiny_bundle, dataset):
    engine = load_engine(tiny_bundle, threads=1)
    split = load_split(dataset, "validation", include_unannotated=True)
    modes = evaluate(engine, split, ["polymorph", "switching", "merged"]).report["modes"]
    maps = [modes[m]["map"] for m in ("polymorph", "switching", "merged")]
    assert maps == pytest.approx([maps[0]] * 3, abs=1e-4)
    assert engine.mode == "polymorph"  # eval restores the engine's mode


def test_bench_writes_table_report_and_plots(tiny_bundle, dataset, tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli_bench(args(tiny_bundle, dataset, out=str(out), max_frames=4)) == 0
    names = sorted(p.name for p in out.iterdir())
    assert {
        "exit_rates.png",
        "latency_cdf.png",
        "sweep_map_vs_latency.png",
        "report.json",
        "table.md",
    } <= set(names)
    table = (out / "table.md").read_text()
    assert "| polymorph |" in table and "| mAP | label F1 | exact match |" in table
    report = json.loads((out / "report.json").read_text())
    assert report["modes"]["full"]["label_quality_by_exit"]["final"]["annotated_frames"] == 2
    for m in MODES:  # per answering exit in the footer, from the report
        final = report["modes"][m]["label_quality_by_exit"]["final"]
        if final["annotated_frames"]:
            assert (
                f"F: {final['label_f1']:.3f} / {final['exact_match']:.1%} ({final['annotated_frames']})"
                in table
            )
    assert report["command"].startswith("polymorphd bench")
    assert (out / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"


def test_class_mismatch_and_bad_arguments_are_clear_errors(tiny_bundle, dataset):
    engine = load_engine(tiny_bundle, threads=1)
    split = load_split(dataset, "validation", include_unannotated=True)
    with pytest.raises(ConfigError, match="mode 'fast' invalid"):
        evaluate(engine, split, ["fast"])
    with pytest.raises(ConfigError, match="max-frames"):
        evaluate(engine, split, ["full"], max_frames=0)
    engine.class_ids = [1000 + 7 * i for i in range(9)] + [5]
    with pytest.raises(DataError, match=r"1 of the bundle's 10 classes .*class9 \(id 5\)"):
        evaluate(engine, split, ["full"])
    with pytest.raises(DataError, match="split 'test' not found"):
        cli_eval(args(tiny_bundle, dataset, split="test"))


def test_selection_compares_adapters_run_with_the_contexts_true_labels_need(tiny_bundle, dataset):
    from polymorphd.models.core.contexts import greedy_cover

    engine = load_engine(tiny_bundle, threads=1)
    engine.set_knobs(max_adapters=3)
    split = load_split(dataset, "validation", include_unannotated=True)
    row = evaluate(engine, split, ["polymorph", "full"]).report["modes"]
    poly = row["polymorph"]
    assert row["full"]["adapters_per_tail_frame"] is None  # full runs no adapters
    ids = [c.id for c in split.categories]
    frames = [f for v in split.videos for f in v.frames if f.labels is not None and f.labels]
    needed = [len(greedy_cover([ids.index(c) for c in f.labels], engine.contexts)) for f in frames]
    assert poly["tail_frames"] <= len(split.annotated_frames())
    assert 1 <= poly["adapters_per_tail_frame"] <= engine.knobs()["max_adapters"]
    assert 0 <= poly["true_contexts_per_tail_frame"] <= max(needed)


def test_intervals_resample_videos_and_pair_each_mode_with_full(tiny_bundle, dataset, tmp_path, capsys):
    from polymorphd.daemon.tools.evaluate import _ModeRecord, add_intervals

    # 6 videos of 10 frames, 3 classes; "worse" is full except on video 2, where it ranks every class backwards
    rng = np.random.default_rng(0)
    video_of = np.repeat(np.arange(6), 10)
    Y = (rng.random((60, 3)) < 0.4).astype(np.uint8)
    S = np.clip(Y + rng.normal(0, 0.3, Y.shape), 0, 1)
    bad = S.copy()
    bad[video_of == 2] = 1 - bad[video_of == 2]
    records = {}
    for name, scores in (("full", S), ("same", S), ("worse", bad)):
        rec = _ModeRecord(name)
        rec.rows, rec.scores = list(range(60)), list(scores)
        rec.labels = [np.flatnonzero(s > 0.5).tolist() for s in scores]
        records[name] = rec
    rows = {n: {"map": None, "label_f1": None} for n in records}  # point values: unknown here
    add_intervals(rows, records, Y, video_of, 300)
    assert rows["same"]["map_vs_full_ci95"] == pytest.approx((0.0, 0.0))  # the same frames, the same answers
    assert rows["same"]["label_f1_vs_full_ci95"] == pytest.approx((0.0, 0.0))
    lo, hi = rows["worse"]["map_vs_full_ci95"]
    assert lo < 0 and hi <= 0  # worse on one video in six: every draw with that video loses, none gains
    assert "map_vs_full_ci95" not in rows["full"]
    full_lo, full_hi = rows["full"]["map_ci95"]
    assert 0 < full_lo < full_hi <= 1

    # end to end: eval prints the intervals and writes them; --resamples 0 leaves them out; < 0 is refused
    out = tmp_path / "r.json"
    assert cli_eval(args(tiny_bundle, dataset, mode="all", json=str(out), resamples=50)) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert f"95 % interval over 50 draws of the {report['videos']} videos" in printed
    early = report["modes"]["early-exit"]
    assert early["map_vs_full"] == pytest.approx(early["map"] - report["modes"]["full"]["map"])
    assert len(early["map_vs_full_ci95"]) == 2 and report["resamples"] == 50
    assert cli_eval(args(tiny_bundle, dataset, mode="full", json=str(out), resamples=0)) == 0
    assert "map_ci95" not in json.loads(out.read_text())["modes"]["full"]
    assert "95 % interval" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--resamples must be >= 0, got -3"):
        cli_eval(args(tiny_bundle, dataset, resamples=-3))


def test_selection_on_final_frames_counts_frames_without_adapters_and_the_labels_covered(
    tiny_bundle, dataset
):
    """Frames the final classifier answered with no adapter count as 0 adapters (a selection cannot look
    tight by skipping frames), and label_coverage is the share of their true labels the chosen contexts hold:
    none chosen (every class below its recall cut) covers nothing; every context chosen covers everything."""
    engine = load_engine(tiny_bundle, threads=1)
    split = load_split(dataset, "validation", include_unannotated=True)
    off = {"exit_thresholds": [[0.0, 1.0], [0.0, 1.0]]}  # every frame reaches the final classifier
    engine.set_knobs(max_adapters=3, recall_threshold=0.99, keep_frames=0, refresh_every=0, **off)
    engine.set_knobs(surprise_jaccard=0.0)
    none = evaluate(engine, split, ["polymorph"]).report["modes"]["polymorph"]
    annotated = split.annotated_frames()
    assert none["final_frames"] == len(annotated)
    assert none["adapters_per_final_frame"] == 0.0 and none["adapters_per_tail_frame"] is None
    assert none["label_coverage"] == 0.0 and none["true_contexts_per_final_frame"] > 0
    engine.set_knobs(recall_threshold=1e-6)  # every class likely: all three contexts, every label covered
    every = evaluate(engine, split, ["polymorph"]).report["modes"]["polymorph"]
    assert every["adapters_per_final_frame"] == 3.0 and every["label_coverage"] == 1.0
