"""bench.gpu_clocks: nvidia-smi's log read back into phases (no GPU needed)."""

import datetime as dt

from bench.gpu_clocks import parse, reason_names, summarize

LOG = """\
2026/11/27 21:40:00.000, 1980, 490.40, 0x0000000000000000
2026/11/27 21:40:00.050, 1755, 692.10, 0x0000000000000004
[N/A], [N/A], [N/A], [N/A]
2026/11/27 21:40:00.300, 1695, 693.00, 0x0000000000000004
2026/11/27 21:40:00.350, 1320, 694.20, 0x0000000000000024
2026/11/27 21:40:01.000, 1980, 80.00, 0x0000000000000001
"""


def at(seconds: float) -> dt.datetime:
    return dt.datetime(2026, 11, 27, 21, 40) + dt.timedelta(seconds=seconds)


def test_parse_skips_lines_that_are_not_samples():
    samples = parse(LOG)
    assert [s.sm_mhz for s in samples] == [1980, 1755, 1695, 1320, 1980]
    assert samples[1].power_w == 692.1
    assert samples[3].reasons == 0x24


def test_a_phase_is_summarized_after_the_clock_settles():
    summary = summarize(parse(LOG), at(0.05), at(0.5))
    # 0.05 s + 0.2 s of settling leaves the samples at 0.30 and 0.35
    assert summary.count == 2
    assert summary.sm_min_mhz == 1320
    assert summary.sm_mhz == (1695 + 1320) / 2
    assert summary.reasons == ("power cap", "SW thermal")
    assert "1508 MHz (min 1320)" in str(summary)


def test_a_phase_without_samples_has_no_summary():
    assert summarize(parse(LOG), at(2.0), at(3.0)) is None


def test_unknown_reason_bits_are_shown_in_hex():
    assert reason_names(0x4 | 0x1000) == ("power cap", "0x1000")
    assert reason_names(0) == ()
