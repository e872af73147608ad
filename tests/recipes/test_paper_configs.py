"""Every paper recipe in configs/tldr, configs/gsm8k and configs/chat runs two steps on CPU with stand-ins.

Tiny models and a few rows in each dataset's real schema (local jsonl files)
replace the hub ids on the command line; everything else is the recipe's own:
its module and hyperparameters, data adapter (columns, GSM8k's prompt
template, No Robots' conversations), reward, evaluation callback and
asynchronous strategy (ZeRO-2/3 and the shared generator included), on CPU,
with the transformers backend and one rank. The runs of a dataset share one
subprocess, with a timeout (each process spends seconds importing), one after
the other as `lightning-rlhf fit` runs them; each reports its own failure.
"""

import glob
import json
import os

import pytest
from cli_in_one_process import run_each

pytestmark = pytest.mark.slow  # each test runs the CLI

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny policies (with and without a chat template) and rows shaped like the paper's datasets."""
    from lightning_rlhf.tasks.copy import make_base_model, make_tokenizer

    root = tmp_path_factory.mktemp("stand_ins")
    paths = {}
    for name, template in (("policy", None), ("chat_policy", CHAT_TEMPLATE)):
        tokenizer = make_tokenizer()
        if template:
            tokenizer.chat_template = template
        make_base_model(tokenizer, seed=1).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    post = "SUBREDDIT: r/copy\n\nTITLE: copy 1 2 3\n\nPOST: copy 1 2 3 =\n\nTL;DR:"
    paths["tldr"] = _jsonl(  # vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144
        root / "tldr.jsonl",
        [{"id": str(i), "subreddit": "copy", "query": post, "reference_response": " 1 2 3"} for i in range(8)],
    )
    paths["tldr_preferences"] = _jsonl(  # mnoukhov/summarize_from_feedback_oai_preprocessing_..._relabel_pythia6.9b
        root / "tldr_preferences.jsonl", [{"query": post, "chosen": " 1 2 3", "rejected": " 3"} for _ in range(8)]
    )
    paths["gsm8k"] = _jsonl(  # openai/gsm8k, config main
        root / "gsm8k.jsonl",
        [{"question": f"copy {i} {i} =", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(8)],
    )
    paths["no_robots"] = _jsonl(  # HuggingFaceH4/no_robots
        root / "no_robots.jsonl",
        [
            {
                "prompt": f"copy {i} =",
                "prompt_id": str(i),
                "category": "Generation",
                "messages": [
                    {"role": "system", "content": "copy"},
                    {"role": "user", "content": f"copy {i} ="},
                    {"role": "assistant", "content": f"{i}"},
                ],
            }
            for i in range(8)
        ],
    )
    return paths


def _fit_each(runs: list[tuple[str, object, list[str]]]) -> list[dict]:
    """Run each recipe ``(config, folder, overrides)`` for 2 steps on CPU, all in one subprocess; return each
    one's eval summary (``{}`` for a stage without one)."""
    roots, commands = [], []
    for config, tmp_path, overrides in runs:
        root = str(tmp_path / "run")
        roots.append(root)
        commands.append(
            [
                "fit",
                "--config",
                config,
                "--trainer.accelerator",
                "cpu",
                "--trainer.devices",
                "1",
                "--trainer.precision",
                "32-true",
                "--trainer.max_steps",
                "2",
                "--trainer.log_every_n_steps",
                "1",
                "--trainer.default_root_dir",
                root,
                *overrides,
            ]
        )
    summaries = []
    for (config, _, _), root, result in zip(runs, roots, run_each(commands, timeout=150 * len(runs)), strict=True):
        assert result["code"] == 0, f"{config}:\n{result['stderr'][-3000:]}"
        assert glob.glob(os.path.join(root, "csv", "version_*", "metrics.csv")), f"{config}: no metrics under {root}"
        found = glob.glob(os.path.join(root, "csv", "version_*", "eval_summary.json"))
        summaries.append(json.load(open(found[0])) if found else {})
    return summaries


def _async_cpu() -> list[str]:
    """The recipe's asynchronous strategy, on CPU: transformers backend, generator beside the trainer."""
    return [
        "--trainer.strategy.init_args.generation.backend",
        "transformers",
        "--trainer.strategy.init_args.generation.generator_devices",
        "[]",  # the trainer's device (a nested `null` would reach the config as the text 'None')
    ]


def _policy(policy: str, reward: str | None, max_new_tokens: int = 6) -> list[str]:
    args = ["--model.init_args.policy", policy, "--model.init_args.max_new_tokens", str(max_new_tokens)]
    if reward is not None:
        args += ["--model.init_args.reward.init_args.model", reward]
    return args


# the recipes drop prompts over 512 tokens, more than the stand-in policies' 64 positions hold
STAND_IN_PROMPT_LIMIT = ("--data.init_args.max_prompt_tokens", "48")


def _tldr_rl(stand_ins) -> list[str]:
    return [
        *_async_cpu(),
        *_policy(stand_ins["policy"], stand_ins["policy"]),
        "--data.init_args.dataset",
        stand_ins["tldr"],
        "--data.init_args.batch_size",
        "2",
        *STAND_IN_PROMPT_LIMIT,
        "--trainer.callbacks.init_args.gold.init_args.model",
        stand_ins["policy"],
        "--trainer.callbacks.init_args.dataset",
        stand_ins["tldr"],
        "--trainer.callbacks.init_args.num_prompts",
        "2",
    ]


def test_tldr_recipes_their_synchronous_variant_and_the_sft_and_reward_model_stages(stand_ins, tmp_path):
    critic = ["--model.init_args.critic", stand_ins["policy"]]
    sft = ["--model.init_args.policy", stand_ins["policy"], "--data.init_args.dataset", stand_ins["tldr"]]
    rm = ["--model.init_args.model", stand_ins["policy"], "--data.init_args.dataset", stand_ins["tldr_preferences"]]
    *algorithms, synchronous, _, _ = _fit_each(
        [
            ("configs/tldr/online_dpo.yaml", tmp_path / "online_dpo", _tldr_rl(stand_ins)),
            ("configs/tldr/rloo.yaml", tmp_path / "rloo", _tldr_rl(stand_ins)),
            ("configs/tldr/ppo.yaml", tmp_path / "ppo", _tldr_rl(stand_ins) + critic),
            (
                "configs/tldr/online_dpo.yaml",
                tmp_path / "sync",
                ["--config", "configs/tldr/synchronous.yaml", *_tldr_rl(stand_ins)],
            ),
            ("configs/tldr/sft.yaml", tmp_path / "sft", [*sft, "--data.init_args.batch_size", "2"]),
            ("configs/tldr/reward_model.yaml", tmp_path / "rm", [*rm, "--data.init_args.batch_size", "2"]),
        ]
    )
    for summary in algorithms:
        assert summary["after"]["step"] == 2 and 0.0 <= summary["after"]["eval/gold_win_rate"] <= 1.0
    assert synchronous["after"]["step"] == 2
    config = open(glob.glob(str(tmp_path / "sync" / "run" / "csv" / "version_*" / "config.yaml"))[0]).read()
    assert "max_staleness: 0" in config


GSM8K_RECIPES = ["online_dpo", "rloo", "ppo", "async_online_dpo", "grpo"]


def test_gsm8k_recipes_run_with_stand_ins(stand_ins, tmp_path):
    common = [
        *_async_cpu(),
        *_policy(stand_ins["policy"], None),
        "--data.init_args.dataset",
        stand_ins["gsm8k"],
        "--data.init_args.batch_size",
        "2",
        "--trainer.callbacks.init_args.dataset",
        stand_ins["gsm8k"],
        "--trainer.callbacks.init_args.num_prompts",
        "3",
        "--trainer.callbacks.init_args.max_new_tokens",
        "6",
    ]
    critic = ["--model.init_args.critic", stand_ins["policy"]]
    summaries = _fit_each(
        [
            (f"configs/gsm8k/{recipe}.yaml", tmp_path / recipe, common + (critic if recipe == "ppo" else []))
            for recipe in GSM8K_RECIPES
        ]
    )
    for recipe, summary in zip(GSM8K_RECIPES, summaries, strict=True):
        after = summary["after"]
        assert after["step"] == 2, recipe
        assert {"eval/accuracy", "eval/format_rate", "eval/accuracy_sampled"} <= set(after), recipe


def test_chat_recipe_runs_with_stand_ins(stand_ins, tmp_path):
    chat = [
        *_async_cpu(),
        *_policy(stand_ins["chat_policy"], stand_ins["chat_policy"]),
        "--data.init_args.dataset",
        stand_ins["no_robots"],
        "--data.init_args.batch_size",
        "2",
        *STAND_IN_PROMPT_LIMIT,
        "--trainer.callbacks.init_args.judge.init_args.model",
        stand_ins["chat_policy"],
        "--trainer.callbacks.init_args.judge.init_args.dtype",
        "float32",
        "--trainer.callbacks.init_args.dataset",
        stand_ins["no_robots"],
        "--trainer.callbacks.init_args.num_prompts",
        "2",
    ]
    (summary,) = _fit_each([("configs/chat/online_dpo.yaml", tmp_path, chat)])
    after = summary["after"]
    assert after["step"] == 2 and 0.0 <= after["eval/gold_win_rate"] <= 1.0 and after["eval/response_length"] > 0
