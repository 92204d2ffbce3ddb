"""The cache_hit benchmark runs and prints the shared benchmark JSON shape (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cache_hit.py"


def test_cache_hit_benchmark_prints_one_json_object() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--n", "50", "--entries", "20"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    doc = json.loads(out)  # exactly one object: json.loads refuses trailing text
    assert doc["benchmark"] == "cache_hit"
    assert set(doc) == {"benchmark", "results", "ratios", "notes"}
    names = [r["name"] for r in doc["results"]]
    assert {"key_only", "lookup_only", "hit"} <= set(names)
    for row in doc["results"]:
        assert set(row) == {"name", "unit", "p50", "p95", "n"}
        assert row["unit"] == "us" and 0 < row["p50"] <= row["p95"] and row["n"] >= 10
    assert "hit/key_only" in doc["ratios"] and all(v > 0 for v in doc["ratios"].values())
    assert isinstance(doc["notes"], str) and doc["notes"]
