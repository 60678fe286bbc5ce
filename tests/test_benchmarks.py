"""Smoke runs of the GPU benchmarks at the tiny size on a CPU: they run end to end, write their JSON, and the
qlora_step comparison trains both ways on the same examples to the same loss."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_qlora_step_tiny_runs_both_ways_to_the_same_loss(tmp_path):
    import qlora_step

    out = tmp_path / "q.json"
    qlora_step.main(["--size", "tiny", "--steps", "1", "--json", str(out), "--cache-dir", str(tmp_path / "cache")])
    result = json.loads(out.read_text())
    ways = {w["way"]: w for w in result["ways"]}
    assert set(ways) == {"old", "new"} and not any("error" in w for w in ways.values())
    assert ways["new"]["grad_accum"] < ways["old"]["grad_accum"] and ways["new"]["loss"] == "answer"
    assert result["same_loss"] and result["speedup"] > 0
    assert ways["old"]["planned_peak_gib"] > 0


def test_memory_peaks_runs_its_training_steps(tmp_path):
    import memory_peaks

    out = tmp_path / "m.json"
    memory_peaks.main(["--size", "tiny", "--stages", "projection", "--dry-run", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all("note" not in r or not r["note"] for r in rows)
    assert all(r["planned_accum"] >= r["planned_first"] for r in rows)
    del sys.modules["memory_peaks"]
