"""What a reward is: a callable from prompts and completions (text) to scores."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch


class RewardFunction(ABC):
    """Scores completions. Subclasses are picked in YAML by ``class_path``.

    A reward sees text, not token ids, so the policy and the reward model may
    use different tokenizers. ``rows`` are the dataset rows the prompts came
    from (for rule rewards that need an answer column).
    """

    def setup(self, device: torch.device) -> None:  # noqa: B027 (optional: rule rewards have no weights)
        """Load weights and move them to ``device``; called once before training."""

    def unloaded_copy(self) -> RewardFunction:
        """A copy to send to another process (the generator's, with ``score_on_generator``), which sets it up there.

        Rewards that hold weights return one without them, so no weights are pickled.
        """
        return copy.copy(self)

    @abstractmethod
    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict] | None = None) -> torch.Tensor:
        """Return scores of shape (n,) as float32 on the CPU or the setup device."""
