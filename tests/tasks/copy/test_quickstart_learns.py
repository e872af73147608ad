"""The quickstart learns: the README's first command raises the gold win rate, for every seed tried.

On a fresh install without vLLM the quickstart samples with transformers, so that is what runs here
(``docs/results/builtin_task.md`` has 5 seeds per backend and instruction set). Each seed is its own
test so that pytest-xdist can share them out.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quickstart_raises_the_gold_win_rate(seed, builtin_models, tmp_path):
    command = [
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--trainer.strategy.init_args.generation.backend",
        "transformers",
    ]
    command += ["--seed_everything", str(seed), "--trainer.default_root_dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-c", "from lightning_rlhf.cli import main; main()", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.load(open(glob.glob(str(tmp_path / "csv" / "version_*" / "eval_summary.json"))[0]))
    before, after = summary["before"]["eval/gold_win_rate"], summary["after"]["eval/gold_win_rate"]
    assert after - before >= 0.10, f"seed {seed}: gold win rate {before:.3f} -> {after:.3f}"
