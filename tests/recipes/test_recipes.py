"""Each Fabric recipe runs a few steps as a real script (subprocess with a timeout), in sync and async."""

import csv
import glob
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each test runs a script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRA = {"online_dpo": [], "rloo": [], "ppo": ["--num_epochs", "2"]}
EPOCHS = {"online_dpo": 1, "rloo": 1, "ppo": 2}  # optimizer steps per generated batch; --train.steps counts them


def run_recipe(recipe: str, tmp_path, *args: str) -> list[dict]:
    """Run ``recipes/<recipe>.py`` on 4 generated batches; return its logged rows that carry a loss."""
    out = subprocess.run(
        [
            sys.executable,
            f"recipes/{recipe}.py",
            "--train.steps",
            str(4 * EPOCHS[recipe]),
            "--train.batch_size",
            "8",
            "--run.evaluate",
            "false",
            "--run.out_dir",
            str(tmp_path),
            *EXTRA[recipe],
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / recipe / "version_*" / "metrics.csv"))[0])))
    return [r for r in rows if r.get("train/loss")]


# synchronous: every batch sampled by the weights it trains; asynchronous (max_staleness 1): the first batch
# fills the pipeline with the initial weights, every later one is exactly one version old
@pytest.mark.parametrize(
    "mode, args, staleness",
    [("sync", [], [0.0] * 4), ("async", ["--rollout.max_staleness", "1"], [0.0, 1.0, 1.0, 1.0])],
)
@pytest.mark.parametrize("recipe", ["online_dpo", "rloo", "ppo"])
def test_recipe_trains_four_steps_with_the_staleness_it_was_asked_for(
    recipe, mode, args, staleness, builtin_models, tmp_path
):
    rows = run_recipe(recipe, tmp_path, *args)
    assert [int(r["step"]) for r in rows] == [
        EPOCHS[recipe] * b for b in (1, 2, 3, 4)
    ]  # logged once per generated batch
    assert all(float(r["train/loss"]) == float(r["train/loss"]) for r in rows)  # no NaN
    assert [float(r["rollout/staleness"]) for r in rows] == staleness


def test_two_processes_train_disjoint_prompts(builtin_models, tmp_path):
    # Fabric launches a second rank; each must train on its own shard of the prompts, not the same batches twice
    rows = run_recipe("online_dpo", tmp_path, "--run.devices", "2", "--run.log_prompts", "true")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    trained = []
    for rank in (0, 1):
        lines = [json.loads(line) for line in (tmp_path / f"trained_prompts_rank{rank}.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [1, 2, 3, 4]  # every rank took all 4 updates
        assert all(len(line["prompts"]) == 8 for line in lines)
        trained.append({prompt for line in lines for prompt in line["prompts"]})
    assert trained[0] and trained[1] and not trained[0] & trained[1]


def test_recipe_refuses_k_below_two(tmp_path):
    out = subprocess.run(
        [sys.executable, "recipes/online_dpo.py", "--rollout.k", "1", "--run.out_dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "set --rollout.k 2 or more" in out.stderr
