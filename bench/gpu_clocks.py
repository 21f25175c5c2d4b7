"""The SM clock, board power and clock-event reasons that nvidia-smi logs while a benchmark runs.

A compute-bound kernel replayed for long meets the board's power cap, and the GPU lowers its
clock; short bursts of replays (bench_sdpa) run at the boost clock. This module has no torch, so
its parsing is tested on the CPU machine.
"""

from __future__ import annotations

import datetime as dt
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

QUERY = "timestamp,clocks.sm,power.draw,clocks_event_reasons.active"
TIME_FORMAT = "%Y/%m/%d %H:%M:%S.%f"
# NVML's clocks event reasons (nvmlClocksEventReasons), the bits that bear on a benchmark.
REASONS = {
    0x1: "idle",
    0x4: "power cap",
    0x8: "HW slowdown",
    0x20: "SW thermal",
    0x40: "HW thermal",
    0x80: "power brake",
}


@dataclass(frozen=True)
class Sample:
    time: dt.datetime
    sm_mhz: float
    power_w: float
    reasons: int


@dataclass(frozen=True)
class Summary:
    sm_mhz: float  # median
    sm_min_mhz: float
    power_w: float  # median
    reasons: tuple[str, ...]
    count: int

    def __str__(self) -> str:
        why = ", ".join(self.reasons) or "none"
        return f"{self.sm_mhz:.0f} MHz (min {self.sm_min_mhz:.0f}), {self.power_w:.0f} W, {why}"


def parse(text: str) -> list[Sample]:
    """Samples of `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits` output; lines
    that are not samples (a header, "[N/A]" fields) are skipped."""
    samples = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            samples.append(
                Sample(
                    dt.datetime.strptime(fields[0], TIME_FORMAT),
                    float(fields[1]),
                    float(fields[2]),
                    int(fields[3], 16),
                )
            )
        except ValueError:
            continue
    return samples


def reason_names(bits: int) -> tuple[str, ...]:
    named = tuple(name for bit, name in REASONS.items() if bits & bit)
    other = bits & ~sum(REASONS)
    return named + ((f"0x{other:x}",) if other else ())


def summarize(
    samples: list[Sample], start: dt.datetime, end: dt.datetime, settle: float = 0.2
) -> Summary | None:
    """The samples between `start` + `settle` seconds (the clock's reaction) and `end`."""
    inside = [s for s in samples if start + dt.timedelta(seconds=settle) <= s.time <= end]
    if not inside:
        return None
    bits = 0
    for s in inside:
        bits |= s.reasons
    return Summary(
        sm_mhz=statistics.median(s.sm_mhz for s in inside),
        sm_min_mhz=min(s.sm_mhz for s in inside),
        power_w=statistics.median(s.power_w for s in inside),
        reasons=reason_names(bits),
        count=len(inside),
    )


class ClockLog:
    """`with ClockLog() as log:` runs nvidia-smi every `interval_ms` into a file; after the
    block, `log.summary(start, end)` summarizes a phase (datetimes of this machine's clock,
    which nvidia-smi's timestamps use)."""

    def __init__(self, interval_ms: int = 50) -> None:
        self.interval_ms = interval_ms
        self.samples: list[Sample] = []

    def __enter__(self) -> ClockLog:
        self._dir = tempfile.TemporaryDirectory()
        self._path = Path(self._dir.name) / "clocks.csv"
        command = ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"]
        command += ["-lms", str(self.interval_ms), "-f", str(self._path)]
        self._process = subprocess.Popen(command)
        return self

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait()
        if self._path.exists():
            self.samples = parse(self._path.read_text())
        self._dir.cleanup()

    def summary(self, start: dt.datetime, end: dt.datetime) -> Summary | None:
        return summarize(self.samples, start, end)
