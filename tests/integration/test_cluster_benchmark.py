"""The cluster benchmark runs end to end at a small size and prints its ratio (timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def test_the_cluster_benchmark_prints_its_ratio():
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "benchmarks/cluster_overhead.py", "--n", "1", "--burst", "4", "--json"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(doc["rows"]) == {"local_submit_to_completed", "ray_submit_to_completed", "ray_burst_drain",
                                "local_burst_drain"}
    assert doc["ratios"]["ray_over_local"] > 0 and doc["ratios"]["ray_burst_over_local_burst"] > 0
    assert 0 < doc["burst_gpu_utilisation"] <= 1 and 0 < doc["local_burst_gpu_utilisation"] <= 1
    assert isinstance(doc["goal"]["met"], bool)
