"""The benchmark harness runs end to end in --quick mode and writes valid results (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_quick_bench_writes_results(tmp_path: Path) -> None:
    """`python -m bench --quick` measures floor, Decide, Settle, the guarded call; writes JSON, plot."""
    plot = importlib.util.find_spec("matplotlib") is not None
    argv = [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)]
    if not plot:
        argv.append("--no-plot")
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sequential p50 ms" in done.stdout

    document = json.loads((tmp_path / "latest.json").read_text())
    assert document["machine"]["cpu_count"] >= 1
    assert {"python", "grpcio", "redis_py", "redis_server"} <= set(document["versions"])
    for rpc in ("decide", "settle"):
        for key in ("floor", "redis-w1", "memory-w1"):
            figures = document[rpc][key]
            assert figures["sequential"]["ok"] > 0
            assert figures["closed"]["ok"] > 0
            assert [p["fraction_of_floor"] for p in figures["open"]] == [0.5, 0.9]
    assert document["decide_ratios"]["redis-w1"]["sequential"]["p50"] > 0
    assert all(math.isfinite(n) for n in _numbers(document))
    assert document["wrapper_overhead"]["status"] in ("ok", "missing", "error")
    guarded = document["guarded_call"]
    assert guarded["status"] == "ok", guarded
    assert guarded["figures"]["sequential"]["wrapped"]["ok"] == 60
    assert guarded["figures"]["sequential_errors"] == {"plain": 0, "wrapped": 0, "floor": 0}
    assert guarded["figures"]["settled"]["wrapped"] >= 60  # every wrapped call settled (and the warm-up's)
    assert guarded["figures"]["closed"]["wrapped"]["runs"][0]["flushed"]
    assert "Guarded call (JournaledAnthropic" in done.stdout
    overload = document["overload"]
    assert overload["status"] == "ok", overload
    for key in ("redis-w1", "redis-w1-unbounded"):
        run = overload["figures"][key]
        assert run["ok"] + run["errors"] == int(overload["figures"]["offered_rps"] * 1.0)
    assert "Overload: Decide at 1.5x capacity" in done.stdout
    noisy = document["noisy_neighbour"]
    assert noisy["status"] == "ok", noisy
    assert noisy["figures"]["calls"] == {"alone": 100, "noisy": 100}
    assert noisy["figures"]["noise"]["runs"][0]["streams_open"] == 20
    assert "noisy neighbour (quiet tenant's Decide, ms)" in done.stdout
    if plot:
        assert (tmp_path / "latency_vs_load.png").read_bytes().startswith(b"\x89PNG")
