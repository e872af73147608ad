"""Scoring with a learned reward model (``AutoModelForSequenceClassification``, one label)."""

from __future__ import annotations

import torch

from lightning_rlhf.models import freeze, load_reward_model, load_tokenizer, resolve_source
from lightning_rlhf.rewards.base import RewardFunction
from lightning_rlhf.tokens import encode_prompt_completion, left_pad


def score_sequences(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each left-padded sequence: the head's output at the last token, (n,)."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    return out.logits[:, -1].float() if out.logits.ndim == 2 else out.logits[:, -1, 0].float()


class RewardModelScore(RewardFunction):
    """Scores ``prompt + completion + eos`` with a sequence-classification reward model.

    When the model's config carries ``reward_mean`` and ``reward_std`` (see
    :func:`save_reward_normalization`), scores are normalized with them, so the
    SFT policy's samples score mean 0 and standard deviation 1 (Ziegler et al.
    2019, Sec. 2.2). A fixed missing-EOS score such as -1 is then a penalty;
    on an unnormalized model it may well be a reward.

    Args:
        model: Hub id, local directory or ``"builtin:reward_model"``.
        batch_size: Sequences scored per forward pass.
        dtype: Weights dtype, ``"float32"`` or ``"bfloat16"``.
        normalize: Apply the config's ``reward_mean``/``reward_std`` when present.

    Raises:
        ConfigError: If ``model`` is a path that does not exist.
    """

    def __init__(
        self, model: str = "builtin:reward_model", batch_size: int = 64, dtype: str = "float32", normalize: bool = True
    ) -> None:
        if not model.startswith("builtin:"):
            resolve_source(model, "reward model")  # fail fast on a wrong path
        self.source = model
        self.batch_size = batch_size
        self.dtype = dtype
        self.normalize = normalize
        self.shift, self.scale = 0.0, 1.0
        self._model = None
        self._tokenizer = None

    def setup(self, device: torch.device) -> None:
        if self._model is None:
            self._tokenizer = load_tokenizer(self.source)
            self._model = freeze(load_reward_model(self.source, self.dtype))
            config = self._model.config
            if self.normalize and getattr(config, "reward_mean", None) is not None:
                self.shift, self.scale = float(config.reward_mean), float(config.reward_std)
        self._model.to(device)

    def unloaded_copy(self) -> RewardModelScore:
        return RewardModelScore(self.source, self.batch_size, self.dtype, self.normalize)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict] | None = None) -> torch.Tensor:
        if self._model is None:
            self.setup(torch.device("cpu"))
        device = next(self._model.parameters()).device
        sequences = encode_prompt_completion(self._tokenizer, prompts, completions)
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            ids, mask = left_pad(sequences[start : start + self.batch_size], self._tokenizer.pad_token_id)
            scores.append(score_sequences(self._model, ids.to(device), mask.to(device)))
        return (torch.cat(scores) - self.shift) / self.scale


def save_reward_normalization(folder: str, prompts: list[str], completions: list[str]) -> tuple[float, float]:
    """Store the mean and standard deviation of the raw scores of ``completions`` in ``folder``'s config.

    Pass samples of the policy RLHF starts from (the SFT policy): afterwards
    :class:`RewardModelScore` scores them with mean 0 and standard deviation 1.
    Returns ``(mean, std)``.
    """
    from transformers import AutoConfig

    scores = RewardModelScore(folder, normalize=False)(prompts, completions)
    mean, std = scores.mean().item(), scores.std().item()
    config = AutoConfig.from_pretrained(folder)
    config.reward_mean, config.reward_std = mean, std
    config.save_pretrained(folder)
    return mean, std
