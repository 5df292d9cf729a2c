"""A real Airflow 3.3.2: long mapped instances marked failed while their one-second siblings keep
ending, some after their jobs did (bench/mapped_churn.py, at CI's size: 40 short items, 3 marks;
the 300-item figure is in bench/RESULTS.md). Every mark's remote process group is gone within the
targeted read's bound, and no sibling is stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.mapped_churn import run

pytestmark = pytest.mark.airflow

ITEMS = 40  # one-second mapped instances: churn for about a minute through 4 executor slots
LONG = 3  # long mapped instances, each marked failed once short ones have started ending


def test_marks_among_churning_mapped_siblings_are_stopped_within_the_bound(tmp_path: Path) -> None:
    result = run(tmp_path, items=ITEMS, long=LONG)
    print(json.dumps(result))  # the figures, for the log (-s, or -rP)
    marks = result["marks"]
    assert len(marks) == LONG and all(m["seconds"] is not None for m in marks), result
    assert all(m["short_ended_10s_before"] >= 1 for m in marks), f"no churn around a mark: {result}"
    latency = result["marked_failed_to_gone"]
    # Every mark within the bound; the median is a figure for bench/RESULTS.md (1.16 s seen here with
    # the whole suite on two cores, 0.56 s alone, 2026-12-07), not a claim of this test.
    assert latency["max_s"] <= 2.0, result
    assert result["short_jobs_stopped"] == 0 and result["short_jobs_not_succeeded"] == [], result
