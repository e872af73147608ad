"""The copy task's rules and its gold reward.

* **Task**: the prompt is ``copy d1 d2 ... dn =`` with 4-6 random digits; the
  ideal response is the same digits, then the end-of-sequence token.
* **Gold reward** (:class:`CopyGoldReward`): the fraction of positions copied
  correctly minus half the relative length error; 1 for a perfect copy.
* **Noise** (:func:`noisy_copy`): each digit replaced with probability 0.25,
  a digit dropped or added with probability 0.2 each; what the demonstrations
  and the reference completions are made of.
"""

from __future__ import annotations

import random

import torch

from lightning_rlhf.rewards.base import RewardFunction

DIGITS = [str(d) for d in range(10)]
MIN_DIGITS, MAX_DIGITS = 4, 6


def make_prompt(digits: list[str]) -> str:
    return " ".join(["copy", *digits, "="])


def prompt_digits(prompt: str) -> list[str]:
    words = prompt.split()
    return words[words.index("copy") + 1 : words.index("=")]


def random_digits(rng: random.Random) -> list[str]:
    return [rng.choice(DIGITS) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]


def gold_score(prompt: str, completion: str) -> float:
    """1 for a perfect copy; fraction of positions right minus half the relative length error."""
    target = prompt_digits(prompt)
    response = completion.split()
    n = len(target)
    correct = sum(a == b for a, b in zip(target, response))
    return correct / n - 0.5 * abs(len(response) - n) / n


def noisy_copy(digits: list[str], rng: random.Random, substitute: float = 0.25, indel: float = 0.2) -> list[str]:
    out = [rng.choice(DIGITS) if rng.random() < substitute else d for d in digits]
    if rng.random() < indel and len(out) > 1:
        del out[rng.randrange(len(out))]
    if rng.random() < indel:
        out.insert(rng.randrange(len(out) + 1), rng.choice(DIGITS))
    return out


class CopyGoldReward(RewardFunction):
    """The copy task's gold reward (see :func:`gold_score`)."""

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict] | None = None) -> torch.Tensor:
        return torch.tensor([gold_score(p, c) for p, c in zip(prompts, completions)], dtype=torch.float32)
