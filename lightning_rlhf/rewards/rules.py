"""Rule rewards and the missing-EOS penalty."""

from __future__ import annotations

import re
import warnings

import torch

from lightning_rlhf.rewards.base import RewardFunction

_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after the last ``####`` (commas removed), or None."""
    found = _ANSWER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


class GSM8kExactMatch(RewardFunction):
    """1 when the completion's ``#### <number>`` equals the reference answer's, else 0.

    The paper's GSM8k reward (Noukhovitch et al. 2025, Sec. 5.2): exact match of
    the final answer, which GSM8k writes after ``####``.

    Args:
        answer_column: Dataset column holding the reference solution or number.
    """

    def __init__(self, answer_column: str = "answer") -> None:
        self.answer_column = answer_column

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict] | None = None) -> torch.Tensor:
        if rows is None or any(self.answer_column not in r for r in rows):
            raise ValueError(
                f"GSM8kExactMatch needs the dataset column '{self.answer_column}'; "
                "set `answer_column` to the column with the reference answers."
            )
        scores = []
        for completion, row in zip(completions, rows):
            reference = str(row[self.answer_column])
            expected = extract_gsm8k_answer(reference) or reference.strip().replace(",", "")
            predicted = extract_gsm8k_answer(completion)
            scores.append(float(predicted is not None and _same_number(predicted, expected)))
        return torch.tensor(scores)


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def apply_missing_eos_penalty(scores: torch.Tensor, finished: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Replace the score of every response that did not end with the stop token by ``penalty``.

    The paper's code (async_rlhf, from TRL 0.11 ``non_eos_penalty``/``penalty_reward_value``)
    *replaces* the score rather than subtracting from it. ``penalty=None`` turns it off.
    That is only a penalty when it is below the usual scores (normalized reward
    models score about N(0, 1)); a warning says so when it is not.

    Args:
        scores: (n,) reward scores.
        finished: (n,) bool, True where the response ended with the stop token.
        penalty: The score given to unfinished responses, e.g. -1.0.
    """
    if penalty is None:
        return scores
    finished = finished.to(scores.device)
    if finished.any() and (~finished).any() and penalty >= scores[finished].mean().item():
        warnings.warn(
            f"missing_eos_penalty={penalty} is above the mean score {scores[finished].mean().item():.2f} "
            "of completions that did end, so it rewards a missing stop token; normalize the reward model "
            "(RewardModelScore uses reward_mean/reward_std from its config) or lower the penalty.",
            stacklevel=2,
        )
    return torch.where(finished, scores, torch.full_like(scores, penalty))
