"""Smoke tests of the evidence benchmarks' --quick modes: each runs end to end and writes what docs/results.md reads.

A few steps each; nothing here says anything about speed or learning (the full runs do). Where a test
recomputes a benchmark's own formula it checks that the written fields agree, nothing more.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each test runs a benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script: str, out, *extra: str) -> None:
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", "--quick", "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").read_text().startswith("|")


def test_offpolicy_sweep_quick_smoke(builtin_models, tmp_path):
    out = tmp_path / "offpolicy_sweep.json"
    _run("offpolicy_sweep.py", out)
    grid = json.loads((tmp_path / "offpolicy_grid.json").read_text())  # the tuning grid, written beside the sweep
    assert sorted(r["algo"] for r in grid) == ["online_dpo", "ppo", "rloo"] and all(r["n"] == 1 for r in grid)
    records = json.loads(out.read_text())
    variants = {(r["algo"], r["is_correction"], r["n"]) for r in records}
    assert variants == {
        (algo, is_correction, n)
        for algo, is_correction in [
            ("online_dpo", False),
            ("rloo", False),
            ("ppo", False),
            ("rloo", True),
            ("ppo", True),
        ]
        for n in (1, 2)
    }
    for r in records:
        assert (
            {"algo", "n", "seed", "policy_params", "is_correction", "gold_win_rate", "kl"} <= r.keys()
            and r["updates"] == 2
            and 0.0 <= r["gold_win_rate"] <= 1.0
            and r["policy_params"] > 0
            and r["lr"] == next(g["lr"] for g in grid if g["algo"] == r["algo"])  # the grid's choice
        )
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "offpolicy_sweep_win_vs_kl.png").stat().st_size > 0 and (
            tmp_path / "offpolicy_sweep_by_n.png"
        ).stat().st_size > 0


def test_sync_vs_async_quick_smoke(builtin_models, tmp_path):
    out = tmp_path / "sync_vs_async.json"
    _run("sync_vs_async.py", out, "--backend", "transformers")
    payload = json.loads(out.read_text())
    assert [r["max_staleness"] for r in payload["runs"]] == [0, 1]
    for run in payload["runs"]:
        assert [p["version"] for p in run["curve"]] == [0, 2, 4]
        assert all(b["seconds"] > a["seconds"] for a, b in zip(run["curve"], run["curve"][1:]))  # wall time only grows
    summary = payload["summary"]
    assert summary["target_gold_win_rate"] == summary["sync_final_gold_win_rate"]
    assert summary["sync_seconds_to_target"] is not None  # the sync curve reaches its own final value
    assert summary["sync_seconds_to_target_per_seed"] == [summary["sync_seconds_to_target"]]  # one seed: its mean


def test_task_studies_tradeoffs_quick_smoke(builtin_models, tmp_path):
    out = tmp_path / "tradeoffs.json"
    _run("task_studies.py", out, "--study", "tradeoffs")
    runs = json.loads(out.read_text())["runs"]
    assert [(r["k"], r["num_epochs"]) for r in runs] == [(2, 1), (2, 2), (2, 4), (4, 1)]
    for r in runs:  # evaluated every batch (4 batches): updates are batches x epochs, time only grows
        assert [p["batches"] for p in r["curve"]] == [0, 1, 2, 3, 4]
        assert [p["updates"] for p in r["curve"]] == [b * r["num_epochs"] for b in range(5)]
        assert all(b["seconds"] > a["seconds"] for a, b in zip(r["curve"], r["curve"][1:]))
    assert out.with_suffix(".png").exists()


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl (the bench extra)")
def test_peer_trl_quick_smoke(builtin_models, tmp_path):
    out = tmp_path / "peer_trl.json"
    _run("peer_trl.py", out)
    summary = json.loads(out.read_text())
    runs = ["trl", "sync_in_process", "sync", "async", "async_score_auto"]  # --quick: one scoring variant
    assert [run["name"] for run in summary["runs"]] == runs
    assert all(summary[f"{name}_episodes_per_s"] > 0 for name in runs)
    assert summary["async_over_trl"] == summary["async_episodes_per_s"] / summary["trl_episodes_per_s"]
    assert summary["async_over_best_trl"] == summary["async_over_trl"]  # --quick runs one TRL row: it is the fastest
    assert [len(run["repeats"]) for run in summary["runs"]] == [1] * len(runs)  # --quick: one repeat of each run


def test_scaling_quick_smoke(builtin_models, tmp_path):
    out = tmp_path / "scaling.json"
    _run("scaling.py", out, "--backend", "transformers")
    results = json.loads(out.read_text())["results"]
    assert [(r["sweep"], r["batch_size"]) for r in results] == [("size", 8), ("batch", 4), ("batch", 8)]
    for r in results:
        assert (
            r["step_seconds"] > 0
            and r["gen_tokens_per_s"] > 0
            and r["refresh_seconds"] > 0
            and r["trainer_peak_rss_gb"] > 0
            and r["generator_peak_rss_gb"] > 0
        )


def test_weight_transfer_quick_smoke(tmp_path):
    out = tmp_path / "weight_transfer"
    proc = subprocess.run(
        [sys.executable, "bench/weight_transfer.py", "--quick", "--out", str(out), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, *lora = json.loads(out.with_suffix(".json").read_text())["rows"]
    keys = {"transport", "backend", "params", "bytes", "bucket_bytes", "seconds", "trainer_hold_seconds"}
    assert keys | {"generator_peak_extra_bytes", "note"} <= row.keys()
    assert row["transport"] == "gloo" and row["buckets"] > 1 and row["seconds"] > 0
    assert "| tiny | gloo | transformers | no (full) |" in out.with_suffix(".md").read_text()
    if importlib.util.find_spec("peft"):  # a rank-8 adapter alone, beside the full refresh
        (adapter,) = lora
        assert adapter["lora"] == 8 and 0 < adapter["bytes"] < row["bytes"] / 10 and adapter["seconds"] > 0
