"""Rewards of rollouts: scoring completions with the module's reward, in the trainer or in the generator process.

:func:`score_rollouts` is what a training step calls: it scores every completion the
generator left unscored (:func:`raw_scores`) and applies the missing-EOS penalty.
:class:`RewardScorer` is what the strategy sends to the generator process
(``score_on_generator``) to score part of each batch there, beside generation.

Notation: ``n`` prompts, ``k`` samples per prompt, ``b = n * k`` completions, prompt-major.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_rlhf.generation.base import Generations
from lightning_rlhf.rewards.base import RewardFunction
from lightning_rlhf.rewards.rules import apply_missing_eos_penalty


def raw_scores(
    reward: RewardFunction, rows: list[dict], completions: list[str], k: int, known: list[float | None] | None = None
) -> torch.Tensor:
    """``reward``'s scores of ``completions`` (n*k, prompt-major) of the prompts in ``rows`` (n), float32 on the CPU.

    Entries of ``known`` that are not ``None`` (scored already, in the generator) are kept, not scored again.
    """
    todo = [j for j in range(len(completions)) if known is None or known[j] is None]
    scores = torch.tensor([float("nan") if s is None else s for s in known] if known else [0.0] * len(completions))
    if todo:
        expanded_rows = [rows[j // k] for j in todo]
        scored = reward([row["prompt"] for row in expanded_rows], [completions[j] for j in todo], expanded_rows)
        scores[todo] = scored.float().cpu()
    return scores


class RewardScorer:
    """Scores in the generator process (``score_on_generator``): decodes with the policy's tokenizer,
    scores with ``reward``.

    Args:
        reward: An unloaded copy of the module's reward (:meth:`RewardFunction.unloaded_copy`).
        tokenizer_source: Where the policy's tokenizer loads from (the generator's model).
        fraction: Of each batch's prompts, the share scored here (the first ones, with all their
            samples) unless a request says otherwise; the rest is left as ``None`` for the trainer to score.
    """

    def __init__(self, reward: RewardFunction, tokenizer_source: str, fraction: float = 1.0) -> None:
        self.reward, self.tokenizer_source, self.fraction = reward, tokenizer_source, fraction
        self.tokenizer: Any = None  # loaded in setup(), in the generator process

    def setup(self, device: torch.device) -> None:
        from lightning_rlhf.models import load_tokenizer

        self.tokenizer = load_tokenizer(self.tokenizer_source)
        self.reward.setup(device)

    def __call__(self, rows: list[dict], generations: Generations, share: float | None = None) -> list[float | None]:
        n, k = round((self.fraction if share is None else share) * len(rows)), generations.k
        completions = self.tokenizer.batch_decode(generations.completion_ids[: n * k], skip_special_tokens=True)
        scores = raw_scores(self.reward, rows[:n], completions, k).tolist() if n else []
        return scores + [None] * (len(generations.completion_ids) - n * k)


def score_rollouts(
    reward: RewardFunction,
    tokenizer,
    generations: Generations,
    rows: list[dict],
    missing_eos_penalty: float | None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Score every completion with ``reward`` (but those the generator scored), then apply the missing-EOS penalty.

    Returns:
        ``(scores, raw_scores, completions)``: the penalised and raw scores, (b,),
        and the decoded completion texts.
    """
    completions = tokenizer.batch_decode(generations.completion_ids, skip_special_tokens=True)
    raw = raw_scores(reward, rows, completions, generations.k, generations.scores)
    finished = torch.tensor([r == "stop" for r in generations.finish_reasons])
    return apply_missing_eos_penalty(raw, finished, missing_eos_penalty), raw, completions
