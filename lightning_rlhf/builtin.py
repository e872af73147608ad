"""The built-in artifacts: the names a ``"builtin:<name>"`` source may give, and where they are prepared.

:func:`lightning_rlhf.tasks.prepare` writes them once into :func:`builtin_root` (the CLI, the
recipes and the benchmarks call it first); :func:`builtin_path` finds one, or says how to prepare it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_rlhf.errors import ConfigError

BUILTIN_PREFIX = "builtin:"
BUILTIN_TASK = "copy-v6"  # folder of the built-in artifacts; a new version when they change
# name -> (path under that folder, folder whose ``.done`` marks it prepared)
COPY_ARTIFACTS = {  # the built-in copy task (lightning_rlhf.tasks.copy)
    "base": ("base", "base"),
    "sft": ("sft", "sft"),
    "base_large": ("base_large", "base_large"),
    "sft_large": ("sft_large", "sft_large"),
    "reward_model": ("reward_model", "reward_model"),
    "prompts": ("data/prompts.jsonl", "data"),
    "eval_prompts": ("data/eval_prompts.jsonl", "data"),
    "demonstrations": ("data/demonstrations.jsonl", "data"),
    "preferences": ("data/preferences.jsonl", "data"),
}
BUILTIN_ARTIFACTS = {
    **COPY_ARTIFACTS,
    # the arithmetic task with a real model (lightning_rlhf.tasks.arithmetic)
    "arithmetic_prompts": ("arithmetic/prompts.jsonl", "arithmetic"),
    "arithmetic_eval": ("arithmetic/eval.jsonl", "arithmetic"),
    "smollm2": ("smollm2-135m-instruct", "smollm2-135m-instruct"),
}
PREPARE_COMMAND = "python -m lightning_rlhf.tasks.copy"


def builtin_root() -> Path:
    """The built-in task's folder: ``$LIGHTNING_RLHF_CACHE`` (unset or empty: ``~/.cache/lightning_rlhf``)
    / ``BUILTIN_TASK``."""
    root = os.environ.get("LIGHTNING_RLHF_CACHE") or Path.home() / ".cache" / "lightning_rlhf"
    return Path(root) / BUILTIN_TASK


def builtin_path(source: str) -> str:
    """Path of the prepared built-in artifact ``"builtin:<name>"``.

    Raises:
        ConfigError: If the name is unknown, or the artifact has not been prepared.
    """
    name = source.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_ARTIFACTS:
        raise ConfigError(
            f"Unknown built-in artifact '{source}'; "
            f"choose one of {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_ARTIFACTS)}."
        )
    path, marker = BUILTIN_ARTIFACTS[name]
    if not (builtin_root() / marker / ".done").exists():
        command = PREPARE_COMMAND if name in COPY_ARTIFACTS else f"python -m lightning_rlhf.tasks {source}"
        raise ConfigError(
            f"The built-in artifact '{source}' is not prepared yet in {builtin_root()}; prepare it once with "
            f"`{command}` (the lightning-rlhf CLI and the recipes do this by themselves)."
        )
    return str(builtin_root() / path)
