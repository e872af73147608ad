"""Smoke test of the benchmark (a few steps; speed is measured by running it, never asserted here)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_async_speedup_quick_smoke_writes_json_and_markdown(builtin_models, tmp_path):
    out = tmp_path / "speedup.json"
    proc = subprocess.run(
        [sys.executable, "bench/async_speedup.py", "--quick", "--backends", "transformers", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.load(open(out))["results"]
    keys = {
        "backend",
        "sync_episodes_per_s",
        "async_episodes_per_s",
        "speedup",
        "gen_seconds",
        "train_seconds",
        "sync_seconds",
        "ideal_speedup",
    }
    assert keys <= result.keys()
    # the benchmark's own formulas, recomputed: this checks the fields are consistent, not that anything is fast
    assert result["speedup"] == result["async_episodes_per_s"] / result["sync_episodes_per_s"]
    assert result["ideal_speedup"] == (result["gen_seconds"] + result["train_seconds"]) / max(
        result["gen_seconds"], result["train_seconds"]
    )
    assert "| transformers |" in (tmp_path / "speedup.md").read_text()
