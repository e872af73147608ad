"""Judges: which of two responses to a prompt is better, for win rates against reference responses.

The paper judged its chat policies against No Robots' human answers with
GPT-4o (Noukhovitch et al. 2025, Sec. 5.1), which needs an API. A
:class:`Judge` is the one small interface behind that: implement
``__call__`` (for an API judge, send both responses and parse the verdict)
and pass it to :class:`~lightning_rlhf.callbacks.GoldEvaluation` as ``judge``
(``class_path`` in YAML).
Two local judges come with the library:

* :class:`RewardJudge`, a reward (e.g. a local reward model): the response
  scoring higher wins; the TL;DR protocol's gold reward model judges this way.
* :class:`GenerativeJudge`, a local instruction-following LLM asked which of
  two responses is better, in both orders (position bias cancels), greedy,
  through the library's transformers generation backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from lightning_rlhf.generation import SamplingConfig, TransformersBackend
from lightning_rlhf.models import freeze, load_policy, load_tokenizer, resolve_source, stop_token_ids
from lightning_rlhf.rewards.base import RewardFunction
from lightning_rlhf.tokens import prompt_token_ids


class Judge(ABC):
    """Compares responses with references: 1 where the response wins, 0 where it loses, 0.5 for a tie (or between)."""

    def setup(self, device: torch.device) -> None:  # noqa: B027 (optional)
        """Load weights and move them to ``device``; called once before the first evaluation."""

    @abstractmethod
    def __call__(
        self, prompts: list, responses: list[str], references: list[str], rows: list[dict] | None = None
    ) -> torch.Tensor:
        """Return outcomes of shape (n,), float32, in [0, 1] (the response's share of the win)."""


class RewardJudge(Judge):
    """The response wins where ``reward`` scores it above the reference (equal scores tie).

    Args:
        reward: Any reward, e.g. ``RewardModelScore`` with a local reward model.
    """

    def __init__(self, reward: RewardFunction) -> None:
        self.reward = reward

    def setup(self, device: torch.device) -> None:
        self.reward.setup(device)

    def __call__(self, prompts, responses, references, rows=None) -> torch.Tensor:
        mine = self.reward(prompts, responses, rows).float().cpu()
        theirs = self.reward(prompts, references, rows).float().cpu()
        return (mine > theirs).float() + 0.5 * (mine == theirs).float()


QUESTION = (
    "Which response answers the user's request better? Reply with the letter A or B only.\n\n"
    "Request:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}"
)


class GenerativeJudge(Judge):
    """A local judge LLM asked "A or B?" in both orders; the response's outcome is the mean of its two
    (1, 0.5 unclear, 0).

    Args:
        model: Hub id or local directory of an instruction-following causal LM with a chat template.
        template: The question, with ``{prompt}``, ``{a}`` and ``{b}``.
        batch_size: Questions generated per batch.
        dtype: Weights dtype.
    """

    def __init__(self, model: str, template: str = QUESTION, batch_size: int = 16, dtype: str = "float32") -> None:
        self.source = resolve_source(model, "judge model")
        self.template = template
        self.batch_size = batch_size
        self.dtype = dtype
        self.backend: TransformersBackend | None = None  # loaded in setup()
        self.tokenizer: Any = None

    def setup(self, device: torch.device) -> None:
        if self.backend is not None:
            return
        self.tokenizer = load_tokenizer(self.source)
        model = freeze(load_policy(self.source, self.dtype)).to(device)
        self.backend = TransformersBackend(
            model, stop_token_ids(self.tokenizer, model), self.tokenizer.pad_token_id, batch_size=self.batch_size
        )

    def _prefers_a(self, prompts: list, a: list[str], b: list[str]) -> list[float]:
        if self.backend is None:
            raise RuntimeError("Call setup(device) before judging.")
        questions = [self.template.format(prompt=_text(p), a=x, b=y) for p, x, y in zip(prompts, a, b)]
        out = self.backend.generate(
            prompt_token_ids(self.tokenizer, questions), SamplingConfig(k=1, temperature=0.0, max_new_tokens=4)
        )
        verdicts = self.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        return [
            1.0 if v.strip().upper().startswith("A") else 0.0 if v.strip().upper().startswith("B") else 0.5
            for v in verdicts
        ]

    def __call__(self, prompts, responses, references, rows=None) -> torch.Tensor:
        if self.backend is None:
            self.setup(torch.device("cpu"))
        first = self._prefers_a(prompts, responses, references)  # the response as A
        second = self._prefers_a(prompts, references, responses)  # the response as B
        return torch.tensor([(x + (1.0 - y)) / 2 for x, y in zip(first, second)])


def _text(prompt) -> str:
    """A conversation as plain text (``role: content`` lines), for the judge's question."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
