"""The `lightning-rlhf` CLI: every YAML instantiates, the quickstart runs, bad input gets one sentence."""

import csv
import glob
import json
import os
import subprocess
import sys

import pytest
from cli_in_one_process import run_each

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
PAPER = ("tldr", "gsm8k", "chat")  # hub models and data, GPU layouts: parsed here, run with stand-ins in tests/recipes
OVERLAYS = ["configs/tldr/synchronous.yaml", "configs/smollm2/lora.yaml"]  # added after a recipe, not run alone
RECIPES = [c for c in CONFIGS if os.path.relpath(c, ROOT) not in OVERLAYS]
RUNNABLE = [c for c in RECIPES if os.path.relpath(c, os.path.join(ROOT, "configs")).split(os.sep)[0] not in PAPER]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # a subprocess, like a user's shell, with a timeout so a hang fails the test
    code = "from lightning_rlhf.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_there_is_a_config_per_algorithm_and_stage():
    names = {os.path.relpath(c, os.path.join(ROOT, "configs")) for c in CONFIGS}
    assert {
        "quickstart.yaml",
        "builtin/online_dpo.yaml",
        "builtin/rloo.yaml",
        "builtin/ppo.yaml",
        "builtin/sft.yaml",
        "builtin/reward_model.yaml",
    } <= names


def _cli(*args: str, run: bool = False):
    from lightning_rlhf.cli import RLHFCLI

    return RLHFCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=list(args),
        run=run,
    )


@pytest.mark.parametrize("config", [c for c in RECIPES if c not in RUNNABLE], ids=lambda c: os.path.relpath(c, ROOT))
def test_every_paper_recipe_parses_with_its_synchronous_overlay(config, capsys):
    with open(config) as f:
        assert f.readline().startswith(f"# lightning-rlhf fit --config {os.path.relpath(config, ROOT)}")
    asynchronous = "strategy:" in open(config).read()  # the RL recipes; SFT and reward model have no generator
    for overlay in ([], ["--config", OVERLAYS[0]]) if asynchronous else ([],):
        with pytest.raises(SystemExit) as exit_info:  # every key and class checked, nothing loaded
            _cli("fit", "--config", config, *overlay, "--print_config", run=True)
        assert exit_info.value.code in (0, None)
        printed = capsys.readouterr().out
        assert "class_path: lightning_rlhf.modules." in printed
        assert ("max_staleness: 0" in printed) == bool(overlay)


@pytest.mark.parametrize("config", RUNNABLE, ids=lambda c: os.path.relpath(c, ROOT))
def test_every_config_parses_and_instantiates(config, tmp_path):
    import lightning as L

    with open(config) as f:
        first_line = f.readline()
    assert first_line.startswith(f"# lightning-rlhf fit --config {os.path.relpath(config, ROOT)}")
    cli = _cli("--config", config, "--trainer.default_root_dir", str(tmp_path))
    assert isinstance(cli.model, L.LightningModule) and isinstance(cli.datamodule, L.LightningDataModule)
    assert {type(lg).__name__ for lg in cli.trainer.loggers} == {"CSVLogger", "TensorBoardLogger"}
    assert all(lg.save_dir.startswith(str(tmp_path)) for lg in cli.trainer.loggers)


@pytest.mark.slow
def test_quickstart_runs_and_reports_gold_win_rate(builtin_models, tmp_path):
    short = tmp_path / "short.yaml"  # a list in a later config replaces the earlier one
    short.write_text(
        "trainer:\n  max_steps: 4\n  callbacks:\n    - class_path: lightning_rlhf.callbacks.GoldEvaluation\n"
        "      init_args:\n        gold: lightning_rlhf.tasks.copy.CopyGoldReward\n"
        "        num_prompts: 32\n        every_n_steps: 2\n"
    )
    out = run_cli(
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--config",
        str(short),
        "--trainer.default_root_dir",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gold win rate:" in out.stdout
    for noise in ("in eval mode at the start of training", "LeafSpec", "LOAD REPORT"):  # a quiet run: none of these
        assert noise not in out.stdout + out.stderr, noise
    summary = json.load(open(glob.glob(str(tmp_path / "csv" / "version_*" / "eval_summary.json"))[0]))
    assert [h["step"] for h in summary["history"]] == [0, 2, 4]
    assert summary["before"]["eval/kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert summary["after"]["eval/kl"] != 0.0
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "csv" / "version_*" / "metrics.csv"))[0])))
    keys = set().union(*(r.keys() for r in rows))
    assert {"train/loss", "objective/scores", "objective/kl", "eval/gold_win_rate", "rollout/staleness"} <= keys
    assert glob.glob(str(tmp_path / "tensorboard" / "version_*" / "events.*"))


BAD_INPUTS = [  # (arguments after the quickstart's config, the sentence the one error line must hold)
    (["--model.init_args.betta", "0.3"], "Unknown key 'betta' under model.init_args"),
    (["--trainer.max_stepz", "3"], "Unknown key 'trainer.max_stepz'"),
    (["--model.init_args.k", "1"], "set k >= 2"),
    (["--model.init_args.policy", "./no/such/model"], "The policy model path './no/such/model' does not exist"),
    (["--data.init_args.prompt_column", "question"], "has no column 'question' (columns: prompt); set `prompt_column`"),
    # raised inside constructors that jsonargparse reports as a union of choices: still one sentence
    (["--data.init_args.dataset", "{tmp}/broken.jsonl"], "broken.jsonl' (JSON parse error"),
    (
        ["--trainer.strategy.init_args.generation.max_staleness", "-1"],
        "AsyncRLHFStrategy: max_staleness must be 0 (synchronous) or more, got -1.",
    ),
    (["--config", "{tmp}/bad.yaml"], "Unknown key 'betta'"),  # in a YAML file, not on the command line
]


@pytest.mark.slow  # a CLI subprocess
def test_bad_input_is_one_sentence_before_training(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "copy 1 2 ="}\n{"prompt": "copy 3\n')  # the 2nd line is cut off
    (tmp_path / "bad.yaml").write_text("model:\n  init_args:\n    betta: 0.3\n")
    cases = [
        ["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(tmp_path / f"run{i}")]
        + [a.format(tmp=tmp_path) for a in args]
        for i, (args, _) in enumerate(BAD_INPUTS)
    ]
    results = run_each(cases, timeout=300)  # every case in one subprocess
    for i, ((args, sentence), result) in enumerate(zip(BAD_INPUTS, results, strict=True)):
        error_lines = [line for line in result["stderr"].splitlines() if line.startswith("lightning-rlhf: error:")]
        assert result["code"] == 2, (args, result["stderr"][-2000:])
        assert len(error_lines) == 1 and sentence in error_lines[0], (args, result["stderr"][-2000:])
        assert "Traceback" not in result["stderr"], args
        assert not glob.glob(str(tmp_path / f"run{i}" / "csv" / "version_*" / "metrics.csv")), args  # nothing trained


def test_the_lora_overlay_instantiates_on_its_recipe(tmp_path):
    recipe, overlay = (os.path.join(ROOT, "configs", "smollm2", name) for name in ("arithmetic.yaml", "lora.yaml"))
    with open(overlay) as f:
        assert f.readline().startswith(
            "# lightning-rlhf fit --config configs/smollm2/arithmetic.yaml --config " + OVERLAYS[1]
        )
    cli = _cli("--config", recipe, "--config", overlay, "--trainer.default_root_dir", str(tmp_path))
    assert cli.model.lora is not None and (cli.model.lora.rank, cli.model.lora.refresh) == (16, "merged")
    assert cli.model.hparams["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
