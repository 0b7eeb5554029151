"""polymorphd bench: the sweep, Pareto fronts, target checks, ablations, real-size replay and the report files."""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest

from polymorphd.daemon.engine import MODES, load_engine
from polymorphd.daemon.power import Meter
from polymorphd.daemon.tools import bench, replay
from polymorphd.daemon.tools.sweep import (
    WATTS_PER_BUSY_CORE,
    ablations_from_runs,
    dominance,
    pareto_front,
    scaled_thresholds,
    sweep_points,
)
from polymorphd.models.core.errors import ConfigError
from polymorphd.models.core.preprocess import preprocess

PNGS = ["energy.png", "exit_rates.png", "headline.png", "latency_cdf.png", "realsize.png",
        "sweep_f1_vs_latency.png", "sweep_map_vs_gflops.png", "sweep_map_vs_latency.png"]  # fmt: skip
KNOBS = {"exit_thresholds": [[0.2, 0.7], [0.4, 0.5]], "max_adapters": 2, "recall_threshold": 0.2}


def fake_run(path, exit_maps: dict[tuple[int, str, bool], float], gain: float, rank: int = 4):
    """A finished run's report.json and config.json with hand-made exit and adapter numbers."""
    path.mkdir(parents=True)
    exits = [{"after_block": b, "kind": k, "copycat": c, "map": m, "label_f1": m / 2, "exact_match": 0.1}
             for (b, k, c), m in exit_maps.items()]  # fmt: skip
    adapters = [
        {"map_adapter": 0.5 + gain, "map_generalist": 0.5},
        {"map_adapter": 0.7 + gain, "map_generalist": 0.7},
    ]
    report = {"preset": "tiny", "splits": {"report": {"name": "test"}}, "exits": exits, "adapters": adapters}
    (path / "report.json").write_text(json.dumps(report))
    (path / "config.json").write_text(json.dumps({"lora": {"rank": rank}}))
    return str(path)


def bench_args(bundle, data, out, **kw) -> argparse.Namespace:
    base = dict(bundle=str(bundle), data=str(data), out=str(out), split="validation", threads=1, max_frames=None,
                set=[], exit_scales=[1.0, 0.0], max_adapters=[2], recall=[0.2], runs=None, realsize=None,
                realsize_frames=10)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_bench_two_point_sweep_writes_every_section_and_plot(
    tiny_bundle, tiny_realsize, dataset, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        bench, "probe_meter", lambda: Meter()
    )  # no meter: the estimate, whatever the host has
    runs = [
        fake_run(
            tmp_path / f"run{i}", {(1, "slvit", True): 0.8 + d, (1, "mlp", True): 0.6 + d}, gain=0.01 * i
        )
        for i, d in enumerate((0.0, 0.1))
    ]
    out = tmp_path / "bench"
    args = bench_args(tiny_bundle, dataset, out, runs=runs, realsize=str(tiny_realsize))
    assert bench.cli_bench(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*PNGS, "report.json", "table.md"])
    report = json.loads((out / "report.json").read_text())
    assert {"modes", "sweep", "ablations", "realsize", "energy", "targets", "load"} <= set(report)
    assert list(report["modes"]) == list(MODES)

    rows = {r["point"]: r for r in report["sweep"]}
    assert list(rows) == [*MODES, "early-exit s0", "polymorph s0 M2 r0.2", "switching s0 M2 r0.2",
                          "merged s0 M2 r0.2", "polymorph s1 no-continuity", "polymorph s0 no-continuity"]  # fmt: skip
    for name, r in rows.items():
        assert r["exit_rate"]["final"] == (
            1.0 if r["exit_scale"] == 0 or r["mode"] == "full" else r["exit_rate"]["final"]
        )
        assert r["energy_mj_per_frame"] == pytest.approx(r["cpu_ms_per_frame"] * WATTS_PER_BUSY_CORE)
        if name in MODES:  # the mode table's row is the sweep's point at the bundle's knobs
            assert (r["map"], r["p50_ms"]) == (
                report["modes"][name]["map"],
                report["modes"][name]["latency_ms"]["p50"],
            )
    assert rows["polymorph s0 no-continuity"]["knobs"]["keep_frames"] == 0
    assert (
        rows["polymorph s0 M2 r0.2"]["adapters_per_frame"] > 0
    )  # exits off: every frame reaches the adapters
    assert report["energy"]["source"] == "estimate" and "estimate" in (out / "table.md").read_text()

    rs = report["realsize"]
    fp32 = rs["precisions"]["fp32"]
    assert set(rs["precisions"]) == {"fp32", "int8"} and "bf16" in rs["not_run"]
    assert set(fp32) == {*MODES, "polymorph s0 M2 r0.2", "switching s0 M2 r0.2", "merged s0 M2 r0.2", "plain"}
    for name, r in fp32.items():
        assert r["frames"] == 10 and r["p95_ms"] >= r["p50_ms"] > 0
        if name != "plain":
            assert r["followed"] == 1.0  # every replayed frame took the recorded exit and adapters
    t = report["targets"]
    assert set(t["plots"]) == {"gflops_per_frame", "p50_ms", "mean_ms"} and set(t["noise_floor"]) == {
        "p50_ms",
        "mean_ms",
    }
    ratio = fp32["polymorph"]["p50_ms"] / fp32["full"]["p50_ms"]
    got = t["realsize_polymorph_vs_full"]
    assert (got["ratio"], got["met"]) == (pytest.approx(ratio), ratio <= 0.6)
    cpu = fp32["polymorph"]["cpu_p50_ms"] / fp32["full"]["cpu_p50_ms"]
    assert got["cpu_time_ratio"] == pytest.approx(cpu)
    over = fp32["full"]["inference_p50_ms"] / fp32["plain"]["inference_p50_ms"] - 1
    assert t["realsize_full_vs_plain"]["overhead"] == pytest.approx(over)
    assert t["realsize_full_vs_plain"]["met"] == (over <= 0.05)

    ab = report["ablations"]
    slvit = next(e for e in ab["from_runs"]["exit_variants"] if e["kind"] == "slvit")
    assert (slvit["runs"], slvit["map_mean"], slvit["map_std"]) == (
        2,
        pytest.approx(0.85),
        pytest.approx(0.05),
    )
    assert ab["from_runs"]["lora_rank"] == [{"rank": 4, "runs": 2, "adapter_map_gain_mean": pytest.approx(0.005),
                                            "adapter_map_gain_std": pytest.approx(0.005)}]  # fmt: skip
    assert [r["exit_scale"] for r in ab["temporal_continuity"]["rows"]] == [1.0, 0.0]
    for png in PNGS:
        raw = (out / png).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0  # decodes, and is not blank
    assert report["command"].startswith("polymorphd bench") and "--realsize" in report["command"]


def test_bench_without_realsize_or_runs_says_why(tiny_bundle, dataset, tmp_path):
    out = tmp_path / "b"
    assert bench.cli_bench(bench_args(tiny_bundle, dataset, out, exit_scales=[1.0], max_frames=4)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["realsize"]["available"] is False and "bench/realsize.py" in report["realsize"]["why"]
    assert report["ablations"]["from_runs"]["available"] is False
    assert not (out / "realsize.png").exists()
    with pytest.raises(ConfigError, match=r"no realsize\.json"):
        bench.cli_bench(bench_args(tiny_bundle, dataset, out, realsize=str(tmp_path)))


def test_plain_forward_computes_the_same_model_as_the_segmented_full_path(tiny_realsize):
    import onnxruntime as ort

    engine = load_engine(tiny_realsize / "fp32", mode="full", threads=1)
    img = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    plain = ort.InferenceSession(str(tiny_realsize / "plain.onnx"), providers=["CPUExecutionProvider"])
    probs = plain.run(None, {"image": preprocess(img, engine.spec)})[0][0]
    np.testing.assert_allclose(engine.infer(img).probs, probs, atol=1e-4)


def test_pareto_front_on_hand_made_points():
    cost = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0, 1.0, None]
    qual = [0.5, 0.7, 0.6, 0.7, 0.2, 0.9, 0.5, 1.0]
    # 2 (cost 2, 0.6) is beaten by 1; 3 (cost 3, 0.7) by 1; the duplicate pair 0/6 beat neither each other
    assert pareto_front(cost, qual).tolist() == [True, True, False, False, True, True, True, False]
    assert pareto_front([], []).tolist() == []


def test_dominance_measures_the_gaps():
    def row(point, mode, m, cost):
        return {"point": point, "mode": mode, "map": m, "p50_ms": cost}

    rows = [row("polymorph", "polymorph", 0.8, 2.0), row("switching", "switching", 0.8, 3.0),
            row("merged", "merged", 0.8, 1.5), row("polymorph s0", "polymorph", 0.9, 5.0),
            row("merged s0", "merged", 0.9, 6.0), row("early-exit", "early-exit", 0.85, 2.5),
            row("early-exit s0", "early-exit", 0.9, 5.0)]  # fmt: skip
    d = dominance(rows, "p50_ms")
    assert d["dominates_switching"] == {"met": True, "pairs": 1, "lost": []}
    assert d["dominates_merged"]["met"] is False
    assert d["dominates_merged"]["lost"] == [
        {"point": "merged", "map_gap": 0.0, "cost_ratio": pytest.approx(2 / 1.5)}
    ]
    below = d["on_or_above_early_exit"]["below"]
    assert [b["early_exit_point"] for b in below] == ["early-exit"]
    assert below[0]["map_gap"] == pytest.approx(0.05)


def test_sweep_points_scale_the_thresholds_and_name_each_point_once():
    assert scaled_thresholds([[0.2, 0.7]], 0.5) == [[0.1, pytest.approx(0.85)]]
    assert scaled_thresholds([[0.2, 0.7]], 0.0) == [[0.0, 1.0]]
    with pytest.raises(ConfigError, match=r"exit scale 1\.5 invalid"):
        scaled_thresholds([[0.2, 0.7]], 1.5)
    pts = sweep_points(KNOBS, modes=("full", "early-exit", "polymorph"), exit_scales=(1, 0.5),
                       max_adapters=(1, 2), recalls=(0.2,))  # fmt: skip
    assert list(pts) == ["full", "early-exit", "polymorph", "early-exit s0.5", "polymorph s0.5 M2 r0.2",
                         "polymorph s0.5 M1 r0.2", "polymorph s1 M1 r0.2"]  # fmt: skip
    assert pts["polymorph s0.5 M1 r0.2"] == {"mode": "polymorph", "exit_thresholds": [[0.1, 0.85], [0.2, 0.75]],
                                             "max_adapters": 1, "recall_threshold": 0.2}  # fmt: skip
    with pytest.raises(ConfigError, match="modes"):
        sweep_points(KNOBS, modes=("fast",))


def test_sample_blocks_spreads_contiguous_runs_over_the_stream():
    d = [(i, ()) for i in range(100)]
    s = replay.sample_blocks(d, 20, block=10)
    assert [x[0] for x in s] == [*range(10), *range(90, 100)]
    assert replay.sample_blocks(d[:5], 20) == d[:5]


def test_runs_sharing_their_exits_count_once_and_ranks_group(tmp_path):
    a = fake_run(tmp_path / "a", {(1, "slvit", True): 0.8}, gain=0.02)
    b = fake_run(tmp_path / "b", {(1, "slvit", True): 0.6}, gain=0.04)
    copy = fake_run(tmp_path / "a8", {(1, "slvit", True): 0.8}, gain=0.01, rank=8)
    for run in (a, copy):  # bench/lora_rank.py copies the exits stage's record with the exits
        (tmp_path / run / "stages.json").write_text(json.dumps({"stages": {"exits": {"finished": 1.5}}}))
    ab = ablations_from_runs([a, b, copy])
    (slvit,) = ab["exit_variants"]
    assert (slvit["runs"], slvit["map_mean"]) == (2, pytest.approx(0.7))
    assert [r["exits_of"] for r in ab["runs"]] == [a, b, a]
    assert [(r["rank"], r["runs"]) for r in ab["lora_rank"]] == [(4, 2), (8, 1)]
    assert ab["lora_rank"][1]["adapter_map_gain_mean"] == pytest.approx(0.01)


def test_ablations_from_runs_reject_an_unfinished_run(tmp_path):
    with pytest.raises(ConfigError, match="not a finished training run"):
        ablations_from_runs([tmp_path])


def test_cpu_flags_and_precision_support(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor: 0\nflags\t\t: fpu avx2 avx512_bf16 avx_vnni\n")
    flags = replay.cpu_flags(info)
    assert {"avx512_bf16", "avx_vnni"} <= flags
    support = replay.precision_support(flags)
    assert support["bf16"] == "avx512_bf16" and support["fp16"].startswith("no avx512_fp16")
    assert replay.cpu_flags(tmp_path / "missing") == set()


class FakeMeter(Meter):
    """A meter that reads 2 mJ for every inference window."""

    source = "rapl"

    def sample(self) -> None:
        self.samples = getattr(self, "samples", 0) + 1

    def energy_mj(self, t0_ns: int, t1_ns: int) -> float | None:
        return 2.0 if t1_ns > t0_ns else None


def test_a_meter_measures_energy_and_the_report_says_so(tiny_bundle, dataset, tmp_path, monkeypatch):
    meter = FakeMeter()
    monkeypatch.setattr(bench, "probe_meter", lambda: meter)
    out = tmp_path / "m"
    assert bench.cli_bench(bench_args(tiny_bundle, dataset, out, exit_scales=[1.0], max_frames=4)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["energy"] == {"source": "rapl", "model": None}
    assert {r["energy_mj_per_frame"] for r in report["sweep"]} == {2.0}
    assert meter.samples == 4 * len(report["sweep"])  # one reading per streamed frame, warm-up excluded
    table = (out / "table.md").read_text()
    assert "measured (rapl)" in table and "estimate" not in table
