"""Energy per frame, from the best meter the board has.

Probe order: jtop (jetson-stats; needs the jtop service's /run/jtop.sock) ->
INA3221 rails in hwmon sysfs (Jetson, no service needed) -> RAPL powercap energy
counters (x86; often root-only) -> none. Every meter keeps a short history of
(monotonic ns, cumulative mJ); a frame's energy is the cumulative curve
interpolated at the ends of its inference window, so power samples and energy
counters are handled alike. Roots are parameters so tests use fake sysfs trees.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ClockNs = Callable[[], int]
_TOTAL_RAILS = {"VDD_IN", "POM_5V_IN"}  # board input rails: already the sum of the others


class Meter:
    """No meter: energy is unknown (null in messages)."""

    source = "none"

    def __init__(self, clock_ns: ClockNs = time.monotonic_ns, history: int = 64) -> None:
        self._clock = clock_ns
        self._t: deque[int] = deque(maxlen=history)
        self._cum: deque[float] = deque(maxlen=history)

    def sample(self) -> None:
        """Take a reading now (call it just before an inference; energy_mj takes one after)."""

    def energy_mj(self, t0_ns: int, t1_ns: int) -> float | None:
        """Energy used between two time.monotonic_ns() instants, or None when unknown."""
        self.sample()
        if len(self._t) < 2:
            return None
        t = np.fromiter(self._t, dtype=np.float64)
        c = np.fromiter(self._cum, dtype=np.float64)
        return max(0.0, float(np.interp(t1_ns, t, c) - np.interp(t0_ns, t, c)))

    def close(self) -> None:
        """Release the meter's resources."""


class PowerMeter(Meter):
    """A power reading (mW) integrated with the trapezoid rule between samples."""

    def __init__(
        self, read_mw: Callable[[], float], source: str, clock_ns: ClockNs = time.monotonic_ns
    ) -> None:
        super().__init__(clock_ns)
        self.source = source
        self._read = read_mw
        self._last_mw: float | None = None

    def sample(self) -> None:
        now, mw = self._clock(), float(self._read())
        if self._last_mw is None:
            cum = 0.0
        else:
            cum = self._cum[-1] + (self._last_mw + mw) / 2 * (now - self._t[-1]) / 1e9
        self._t.append(now)
        self._cum.append(cum)
        self._last_mw = mw


class RaplMeter(Meter):
    """Sum of package energy counters, unwrapped at max_energy_range_uj."""

    source = "rapl"

    def __init__(self, domains: list[Path], clock_ns: ClockNs = time.monotonic_ns) -> None:
        super().__init__(clock_ns)
        self._domains = domains
        self._range = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self._prev: list[int | None] = [None] * len(domains)
        self._total_uj = 0

    def sample(self) -> None:
        now = self._clock()
        for i, d in enumerate(self._domains):
            uj = int((d / "energy_uj").read_text())
            prev = self._prev[i]
            if prev is not None:
                self._total_uj += uj - prev if uj >= prev else uj + self._range[i] - prev
            self._prev[i] = uj
        self._t.append(now)
        self._cum.append(self._total_uj / 1000.0)


def _ina3221_rails(sys_root: Path) -> list[tuple[str, Path, Path]]:
    """(label, millivolt file, milliamp file) for every INA3221 channel; only the input rail if there is one."""
    rails = []
    for hw in sorted((sys_root / "class" / "hwmon").glob("hwmon*")):
        try:
            if (hw / "name").read_text().strip() != "ina3221":
                continue
        except OSError:
            continue
        for volt in sorted(hw.glob("in*_input")):
            n = re.fullmatch(r"in(\d+)_input", volt.name)
            curr = hw / f"curr{n.group(1)}_input" if n else None
            if curr is None or not curr.exists():
                continue
            label_file = hw / f"in{n.group(1)}_label"
            label = label_file.read_text().strip() if label_file.exists() else f"{hw.name}/in{n.group(1)}"
            rails.append((label, volt, curr))
    total = [r for r in rails if r[0] in _TOTAL_RAILS]
    return total or rails


def _probe_jtop(run_root: Path, clock_ns: ClockNs) -> Meter:
    if not (run_root / "jtop.sock").exists():
        raise LookupError(f"{run_root / 'jtop.sock'} not found (jtop service not running)")
    try:
        from jtop import jtop  # jetson-stats is AGPL and optional: imported only here
    except ImportError as exc:
        raise LookupError("jetson-stats is not installed (pip install 'polymorphd[jetson]')") from exc
    client = jtop()
    try:
        client.start()
    except Exception as exc:  # jtop raises its own JtopException types
        raise LookupError(f"jtop did not start: {exc}") from exc

    def read() -> float:
        return float(client.power["tot"]["power"])

    meter = PowerMeter(read, "jtop", clock_ns)
    meter.close = client.close  # type: ignore[method-assign]
    meter.sample()
    return meter


def _probe_hwmon(sys_root: Path, clock_ns: ClockNs) -> Meter:
    rails = _ina3221_rails(sys_root)
    if not rails:
        raise LookupError(f"no ina3221 rails under {sys_root / 'class' / 'hwmon'}")

    def read() -> float:
        return sum(int(v.read_text()) * int(c.read_text()) / 1000.0 for _, v, c in rails)

    meter = PowerMeter(read, "hwmon", clock_ns)
    meter.sample()
    log.info("hwmon ina3221 rails: %s", ", ".join(r[0] for r in rails))
    return meter


def _probe_rapl(sys_root: Path, clock_ns: ClockNs) -> Meter:
    base = sys_root / "class" / "powercap"
    # Top-level domains only (intel-rapl:N): sub-domains (intel-rapl:N:M) are already inside them.
    domains = sorted(d for d in base.glob("intel-rapl:*") if re.fullmatch(r"intel-rapl:\d+", d.name))
    if not domains:
        raise LookupError(f"no intel-rapl domains under {base}")
    try:
        meter = RaplMeter(domains, clock_ns)
        meter.sample()
    except PermissionError as exc:
        raise LookupError(
            f"{exc.filename} is not readable (root only; run as root or grant read access to energy_uj)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise LookupError(f"cannot read RAPL counters: {exc}") from exc
    return meter


def probe_meter(
    sys_root: str | Path = "/sys", run_root: str | Path = "/run", clock_ns: ClockNs = time.monotonic_ns
) -> Meter:
    """The first meter that works; a no-meter Meter (and one INFO line saying why) otherwise."""
    reasons = []
    for name, probe, root in (
        ("jtop", _probe_jtop, Path(run_root)),
        ("hwmon", _probe_hwmon, Path(sys_root)),
        ("rapl", _probe_rapl, Path(sys_root)),
    ):
        try:
            meter = probe(root, clock_ns)
        except (LookupError, OSError) as exc:
            reasons.append(f"{name}: {exc}")
            continue
        log.info("energy meter: %s", meter.source)
        return meter
    log.info("energy metering off (energy_mj will be null): %s", "; ".join(reasons))
    return Meter(clock_ns)
