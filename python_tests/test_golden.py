"""The golden trace (python_tests/golden/trace.json): one session's numbers never change with the runtime.

10 steps of seed 0 in layer and bottleneck mode, in one process (``SimulatedSplit``) and over TCP.
Bit-identical to the recorded losses on the machine and torch build that recorded them (the file
names them).  On another CPU or torch build float reductions may round differently, so there the
four traces must still agree with each other bit for bit (simulated == TCP) and with the recording
to 2e-5.
"""
from __future__ import annotations

import pytest

import golden_trace


@pytest.fixture(scope="module")
def traces():
    return golden_trace.compute()


def test_golden_trace_is_bit_identical(traces):
    rec = golden_trace.load()
    assert set(traces) == set(rec["losses"])
    for mode in golden_trace.MODES:
        assert traces[f"tcp/{mode}"] == traces[f"simulated/{mode}"], f"{mode}: TCP run differs from the simulated one"
    same_machine = {k: v for k, v in golden_trace.machine().items() if k != "python"} == \
        {k: v for k, v in rec["machine"].items() if k != "python"}
    for key, want in rec["losses"].items():
        got = traces[key]
        assert len(got) == len(want) == golden_trace.STEPS
        if same_machine:
            assert [x.hex() for x in got] == [x.hex() for x in want], f"{key}: losses changed"
        else:
            assert got == pytest.approx(want, abs=2e-5), f"{key}: losses changed beyond cross-machine rounding"
