"""benchmarks/timing.py, the timing loop bench_compact.py and bench_reader.py share (in-process, no timing)."""

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from timing import interleaved  # noqa: E402


def test_runs_alternate_within_each_round_and_each_keeps_its_best(monkeypatch):
    clock = iter(range(100))  # each perf_counter() call one "second" later than the one before
    monkeypatch.setattr("timing.time.perf_counter", lambda: next(clock))
    calls = []

    def run(name, extra):
        def fn():
            calls.append(name)
            for _ in range(extra):  # burns `extra` clock ticks inside the timed call
                next(clock)
            return 3

        return fn

    best = interleaved({"a": run("a", 2), "b": run("b", 0)}, rows=3, repeats=3)
    assert calls == ["a", "b"] * 3
    assert best == {"a": 3, "b": 1}


def test_a_wrong_row_count_is_an_error_not_a_result():
    with pytest.raises(RuntimeError, match="short: read 2 rows, expected 3"):
        interleaved({"short": lambda: 2}, rows=3, repeats=1)
    with pytest.raises(ValueError, match="repeats"):
        interleaved({"x": lambda: 3}, rows=3, repeats=0)
