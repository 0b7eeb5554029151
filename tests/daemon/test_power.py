"""Energy meters against fake sysfs trees: INA3221 hwmon, RAPL (with wraparound), jtop, and none."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest

from polymorphd.daemon.power import Meter, PowerMeter, probe_meter


class Clock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def hwmon(root: Path, name: str, rails: dict[int, tuple[str | None, int, int]], idx: int = 0) -> Path:
    d = root / "class" / "hwmon" / f"hwmon{idx}"
    write(d / "name", name)
    for ch, (label, mv, ma) in rails.items():
        write(d / f"in{ch}_input", str(mv))
        write(d / f"curr{ch}_input", str(ma))
        if label:
            write(d / f"in{ch}_label", label)
    return d


def test_none_when_nothing_exists(tmp_path, caplog):
    caplog.set_level(logging.INFO, "polymorphd.daemon.power")
    m = probe_meter(tmp_path / "sys", tmp_path / "run")
    assert type(m) is Meter and m.source == "none"
    assert m.energy_mj(0, 10**9) is None
    msgs = [r.getMessage() for r in caplog.records if "energy metering off" in r.getMessage()]
    assert len(msgs) == 1
    assert "jtop: " in msgs[0] and "jtop.sock not found" in msgs[0]
    assert "hwmon: no ina3221 rails" in msgs[0] and "rapl: no intel-rapl domains" in msgs[0]


def test_hwmon_ina3221_input_rail_integrated(tmp_path):
    root = tmp_path / "sys"
    hwmon(root, "cpu_thermal", {1: (None, 1, 1)}, idx=0)  # not an ina3221: ignored
    d = hwmon(root, "ina3221", {1: ("VDD_IN", 5000, 1000), 2: ("VDD_CPU_GPU_CV", 5000, 400)}, idx=1)
    clock = Clock()
    m = probe_meter(root, tmp_path / "run", clock)  # takes a first sample at t=0: 5 W
    assert m.source == "hwmon"
    clock.t = 10**9
    write(d / "curr1_input", "2000")  # 10 W at t=1 s
    # VDD_IN only (the other rail is inside it): trapezoid (5 W + 10 W) / 2 * 1 s = 7.5 J
    assert m.energy_mj(0, 10**9) == pytest.approx(7500.0)
    # half the window: interpolated on the cumulative curve
    assert m.energy_mj(0, 5 * 10**8) == pytest.approx(3750.0)


def test_hwmon_without_an_input_rail_sums_channels(tmp_path):
    root = tmp_path / "sys"
    hwmon(root, "ina3221", {1: ("GPU", 1000, 1000), 2: (None, 2000, 500), 3: ("SOC", 1000, 1000)})
    (root / "class/hwmon/hwmon0/curr3_input").unlink()  # a channel without a current reading is skipped
    clock = Clock()
    m = probe_meter(root, tmp_path / "run", clock)
    clock.t = 2 * 10**9
    assert m.energy_mj(0, 2 * 10**9) == pytest.approx(4000.0)  # (1 W + 1 W) * 2 s


def rapl(root: Path, domain: str, uj: int, max_uj: int) -> Path:
    d = root / "class" / "powercap" / domain
    write(d / "energy_uj", str(uj))
    write(d / "max_energy_range_uj", str(max_uj))
    write(d / "name", "package-0")
    return d


def test_rapl_counter_with_wraparound(tmp_path):
    root = tmp_path / "sys"
    d = rapl(root, "intel-rapl:0", 999_000, 1_000_000)
    sub = rapl(root, "intel-rapl:0:0", 5, 1_000_000)  # a sub-domain: already counted in the package
    clock = Clock()
    m = probe_meter(root, tmp_path / "run", clock)
    assert m.source == "rapl"
    clock.t = 10**9
    write(d / "energy_uj", "4000")  # wrapped: 1_000 uJ to the top + 4_000 uJ = 5 mJ
    write(sub / "energy_uj", "999999")
    assert m.energy_mj(0, 10**9) == pytest.approx(5.0)
    clock.t = 2 * 10**9
    write(d / "energy_uj", "10000")
    assert m.energy_mj(10**9, 2 * 10**9) == pytest.approx(6.0)


def test_rapl_not_readable_falls_back_with_reason(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "polymorphd.daemon.power")
    root = tmp_path / "sys"
    d = rapl(root, "intel-rapl:0", 1, 10)
    real = Path.read_text

    def read_text(self, *a, **k):
        if self == d / "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    m = probe_meter(root, tmp_path / "run")
    assert m.source == "none"
    assert "energy_uj is not readable (root only" in caplog.text


def test_jtop_preferred_when_its_service_runs(tmp_path, monkeypatch):
    class FakeJtop:
        def __init__(self):
            self.power = {"tot": {"power": 3000}}
            self.closed = False

        def start(self):
            pass

        def close(self):
            self.closed = True

    made = []
    monkeypatch.setitem(
        sys.modules, "jtop", types.SimpleNamespace(jtop=lambda: made.append(FakeJtop()) or made[-1])
    )
    run = tmp_path / "run"
    write(run / "jtop.sock", "")
    hwmon(tmp_path / "sys", "ina3221", {1: ("VDD_IN", 5000, 1000)})
    clock = Clock()
    m = probe_meter(tmp_path / "sys", run, clock)
    assert m.source == "jtop"
    clock.t = 10**9
    assert m.energy_mj(0, 10**9) == pytest.approx(3000.0)
    m.close()
    assert made[0].closed


def test_jtop_socket_without_the_package_falls_through(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "jtop", None)  # import jtop -> ImportError
    run = tmp_path / "run"
    write(run / "jtop.sock", "")
    hwmon(tmp_path / "sys", "ina3221", {1: ("VDD_IN", 5000, 1000)})
    assert probe_meter(tmp_path / "sys", run).source == "hwmon"


def test_energy_window_before_any_second_sample_is_unknown():
    m = PowerMeter(lambda: 1000.0, "hwmon", Clock())
    assert m.energy_mj(0, 0) is None  # one sample: no interval yet
    assert m.energy_mj(0, 0) == 0.0
