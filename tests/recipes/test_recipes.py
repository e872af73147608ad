"""Each Fabric recipe runs a few steps as a real script (subprocess with a timeout)."""

import csv
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("recipe, extra", [("online_dpo", []), ("rloo", []), ("ppo", ["--num_epochs", "2"])])
def test_recipe_runs_a_few_steps(recipe, extra, builtin_models, tmp_path):
    out = subprocess.run(
        [sys.executable, f"recipes/{recipe}.py", "--steps", "4", "--batch_size", "8", "--evaluate", "false", "--out_dir", str(tmp_path), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / recipe / "version_*" / "metrics.csv"))[0])))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 2 and all(loss == loss for loss in losses)  # logged every batch, no NaN


@pytest.mark.parametrize("recipe", ["online_dpo", "ppo"])
def test_recipe_runs_asynchronously(recipe, builtin_models, tmp_path):
    out = subprocess.run(
        [sys.executable, f"recipes/{recipe}.py", "--steps", "4", "--batch_size", "8", "--evaluate", "false", "--max_staleness", "1", "--out_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / recipe / "version_*" / "metrics.csv"))[0])))
    assert len([r for r in rows if r.get("train/loss")]) >= 1


def test_recipe_refuses_k_below_two(tmp_path):
    out = subprocess.run([sys.executable, "recipes/online_dpo.py", "--k", "1", "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "set --k 2 or more" in out.stderr
