"""Scoring with a learned reward model (``AutoModelForSequenceClassification``, one label)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from lightning_rlhf.forwards import forward_after_prompts, forward_shared_prompts
from lightning_rlhf.models import freeze, load_reward_model, load_tokenizer, resolve_source
from lightning_rlhf.rewards.base import RewardFunction
from lightning_rlhf.tokens import encode_pairs, left_pad, real_token_positions


def score_sequences(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each left-padded sequence: the head's output at the last token, (n,)."""
    return _last_score(model(input_ids=ids, attention_mask=mask, position_ids=real_token_positions(mask)).logits)


def _last_score(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].float() if logits.ndim == 2 else logits[:, -1, 0].float()


# Reward models whose decoder layers are the pre-norm block ``x + attn(norm(x))`` then
# ``h + mlp(norm(h))``, read in transformers' ``LlamaDecoderLayer.forward``
# (``models/llama/modeling_llama.py``) and the same in ``models/{mistral,qwen2,qwen3}``.
_PRE_NORM_DECODERS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def reads_last_position_only(model: torch.nn.Module) -> bool:
    """Whether :func:`score_pairs` may compute ``model``'s last decoder layer at the last position only.

    A score is the head's output at one position, the last. Every layer but the
    last must run at all positions (the next layer's keys and values need them),
    but the last layer's MLP, three quarters of its arithmetic, is needed at that
    one position alone: a quarter of the layers' MLP arithmetic on the built-in
    reward model (4 layers). Holds for the pre-norm decoders above with a linear
    ``score`` head (``GenericForSequenceClassification``, transformers'
    ``modeling_layers.py``); any other model runs whole, and so does a last layer
    whose ``forward`` something has already replaced on the instance (accelerate's
    device hooks do: ours would bypass them).
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _PRE_NORM_DECODERS:
        return False
    layers = getattr(model.base_model, "layers", None)
    return (
        isinstance(getattr(model, "score", None), torch.nn.Linear)
        and layers is not None
        and len(layers) > 0
        and "forward" not in vars(layers[-1])
    )


def _last_position_forward(layer: torch.nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """``layer``'s forward with attention over every position (keys and values go to the cache)
    and the rest at the last one, (b, 1, h)."""
    attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
    last = hidden_states[:, -1:] + attended[:, -1:]
    return last + layer.mlp(layer.post_attention_layernorm(last))


@contextlib.contextmanager
def _last_layer_at_last_position(body: torch.nn.Module):
    """Run ``body``'s last decoder layer with :func:`_last_position_forward` inside the block (one call at a time)."""
    layer = body.layers[-1]
    layer.forward = functools.partial(_last_position_forward, layer)  # the instance's own: parameters and hooks stay
    try:
        yield
    finally:
        del layer.forward


def score_pairs(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_id: int,
    share_prompts: bool = True,
    last_position_only: bool = True,
) -> torch.Tensor:
    """:func:`score_sequences` of each ``prompt + completion``, running each distinct prompt
    through the model once, (n,).

    With k samples per prompt the k sequences share the prompt's keys and values:
    the distinct prompts (left-padded) run once with a cache, the cache rows are
    gathered per sequence (``Cache.batch_select_indices``, transformers'
    ``cache_utils.py``), and the completions (left-padded after the prompt,
    a gap of padding masked out between them) run on top of it with positions
    counted over real tokens only, so each sequence sees exactly the keys,
    values and positions of its own unpadded forward pass. The arithmetic saved is
    the prompt's share of the tokens times ``(k - 1) / k``, most on long prompts
    such as TL;DR's. Measured on the built-in task at k=2 (one CPU thread): 20-25 %
    less time for a call alone, but no gain measurable end to end in
    ``bench/peer_trl.py`` (docs/results.md, section 3).

    With ``last_position_only`` (and :func:`reads_last_position_only`), the last
    decoder layer's MLP runs at the scored position only; the scores are those of
    the whole forward up to float rounding.

    Runs every sequence whole (:func:`score_sequences`) when ``share_prompts`` is
    off, when nothing is shared (all prompts distinct), when the model returns no
    cache, or when a completion ends with ``pad_id`` (a model whose pad and eos
    ids agree: its classifier head reads the last non-pad token of the ids it is
    given, which would then differ from the whole sequence's, and from the last position).
    """
    device = next(model.parameters()).device
    ends_in_pad = any(not c or c[-1] == pad_id for c in completion_ids)
    last_only = last_position_only and not ends_in_pad and reads_last_position_only(model)
    body = model.base_model if last_only else model  # the decoder without its head: its output is (b, 1, h)

    def scores(out) -> torch.Tensor:
        return model.score(out.last_hidden_state[:, -1])[:, -1].float() if last_only else _last_score(out.logits)

    def whole() -> torch.Tensor:
        ids, mask = (t.to(device) for t in left_pad([p + c for p, c in zip(prompt_ids, completion_ids)], pad_id))
        return scores(
            body(input_ids=ids, attention_mask=mask, position_ids=real_token_positions(mask), use_cache=False)
        )

    groups: dict[tuple[int, ...], int] = {}
    index = [groups.setdefault(tuple(p), len(groups)) for p in prompt_ids]
    with _last_layer_at_last_position(body) if last_only else contextlib.nullcontext():
        if not share_prompts or len(groups) == len(prompt_ids) or ends_in_pad:
            return whole()
        shared_ids, shared_mask = (t.to(device) for t in left_pad([list(p) for p in groups], pad_id))
        rows = torch.tensor(index, device=device)
        shared = forward_shared_prompts(body, shared_ids, shared_mask, rows)
        if shared is None:
            return whole()
        _, cache = shared
        ids, completion_mask = (t.to(device) for t in left_pad(completion_ids, pad_id))
        return scores(forward_after_prompts(body, cache, ids, torch.cat([shared_mask[rows], completion_mask], dim=1)))


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
        share_prompts: Run a prompt repeated within a batch (the k samples of one
            prompt) through the model once (:func:`score_pairs`); the scores are the
            same up to float rounding. Off runs every sequence whole.
        last_position_only: Compute the last decoder layer's MLP at the scored
            position only, where :func:`reads_last_position_only` says the model
            allows it; the scores are the same up to float rounding.

    Raises:
        ConfigError: If ``model`` is a path that does not exist.
    """

    def __init__(
        self,
        model: str = "builtin:reward_model",
        batch_size: int = 64,
        dtype: str = "float32",
        normalize: bool = True,
        share_prompts: bool = True,
        last_position_only: bool = True,
    ) -> None:
        if not model.startswith("builtin:"):
            resolve_source(model, "reward model")  # fail fast on a wrong path
        self.source = model
        self.batch_size = batch_size
        self.dtype = dtype
        self.normalize = normalize
        self.share_prompts = share_prompts
        self.last_position_only = last_position_only
        self.shift, self.scale = 0.0, 1.0
        self._model: Any = None  # the loaded model and tokenizer, from setup() on
        self._tokenizer: Any = None

    def setup(self, device: torch.device) -> None:
        if self._model is None:
            self._tokenizer = load_tokenizer(self.source)
            self._model = freeze(load_reward_model(self.source, self.dtype))
            config = self._model.config
            if self.normalize and getattr(config, "reward_mean", None) is not None:
                self.shift, self.scale = float(config.reward_mean), float(config.reward_std)
        self._model.to(device)

    def unloaded_copy(self) -> RewardModelScore:
        return RewardModelScore(
            self.source, self.batch_size, self.dtype, self.normalize, self.share_prompts, self.last_position_only
        )

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict] | None = None) -> torch.Tensor:
        if self._model is None:
            self.setup(torch.device("cpu"))
        if not prompts:
            return torch.zeros(0)
        prompt_ids, completion_ids = encode_pairs(self._tokenizer, prompts, completions)
        order = list(range(len(prompt_ids)))
        if self.share_prompts:  # the samples of one prompt side by side, so that a batch holds them together
            first: dict[tuple[int, ...], int] = {}
            order.sort(key=lambda i: first.setdefault(tuple(prompt_ids[i]), i))
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        scores = torch.cat(
            [
                score_pairs(
                    self._model,
                    [prompt_ids[i] for i in batch],
                    [completion_ids[i] for i in batch],
                    self._tokenizer.pad_token_id,
                    self.share_prompts,
                    self.last_position_only,
                )
                for batch in batches
            ]
        )
        in_order = torch.empty_like(scores)
        in_order[torch.tensor(order, device=scores.device, dtype=torch.long)] = scores
        return (in_order - self.shift) / self.scale


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
