"""The built-in "copy" task: the paper's TL;DR protocol in miniature, offline and CPU-sized.

Rules and gold reward in :mod:`~lightning_rlhf.tasks.copy.rules`; datasets,
models and their training in :mod:`~lightning_rlhf.tasks.copy.artifacts`.
``python -m lightning_rlhf.tasks.copy`` prepares everything once.
"""

from lightning_rlhf.tasks.copy.artifacts import make_base_model, make_tokenizer, prepare
from lightning_rlhf.tasks.copy.rules import CopyGoldReward, gold_score, make_prompt, noisy_copy, prompt_digits

__all__ = [
    "CopyGoldReward",
    "gold_score",
    "make_base_model",
    "make_prompt",
    "make_tokenizer",
    "noisy_copy",
    "prepare",
    "prompt_digits",
]
