"""The rollout batch: from :class:`Generations` to training tensors (padding, scoring, logprobs, values, mini-batches).

Shared by the LightningModules and the Fabric recipes, so both compute
exactly the same quantities.

Notation: ``n`` prompts, ``k`` samples per prompt, ``b = n * k`` rollouts,
``p`` padded prompt length, ``t`` padded response length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from lightning_rlhf.generation.base import Generations
from lightning_rlhf.losses import token_logprobs
from lightning_rlhf.models import activation_checkpointing, forward_after_prompts, forward_shared_prompts, last_logits
from lightning_rlhf.rewards.base import RewardFunction
from lightning_rlhf.rewards.rules import apply_missing_eos_penalty
from lightning_rlhf.tokens import left_pad, real_token_positions


@dataclass
class RolloutBatch:
    """Padded rollouts. ``input_ids`` is the left-padded prompt followed by the right-padded response."""

    input_ids: torch.Tensor  # (b, p + t)
    attention_mask: torch.Tensor  # (b, p + t)
    response_ids: torch.Tensor  # (b, t)
    response_mask: torch.Tensor  # (b, t), 1 on real response tokens (the stop token included)
    behavior_logprobs: torch.Tensor  # (b, t), 0 on padding
    finished: torch.Tensor  # (b,), True where the response ended with the stop token
    policy_version: torch.Tensor  # (b,), version of the weights that sampled each rollout

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, index: torch.Tensor) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def build_rollout_batch(generations: Generations, pad_token_id: int) -> RolloutBatch:
    """Pad :class:`Generations` into a :class:`RolloutBatch` (each prompt repeated ``k`` times)."""
    k = generations.k
    prompts, prompt_mask = left_pad([p for p in generations.prompt_ids for _ in range(k)], pad_token_id)  # (b, p)
    b = len(generations.completion_ids)
    lengths = torch.tensor([len(c) for c in generations.completion_ids], dtype=torch.long)
    t = max(1, int(lengths.max()))
    filled = torch.arange(t) < lengths[:, None]  # (b, t): each row's first len(c) places
    response_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    response_ids[filled] = torch.tensor([x for c in generations.completion_ids for x in c], dtype=torch.long)
    response_mask = filled.long()
    behavior = torch.zeros((b, t))
    logprob_lengths = torch.tensor([len(lp) for lp in generations.behavior_logprobs], dtype=torch.long)
    behavior[torch.arange(t) < logprob_lengths[:, None]] = torch.tensor(
        [x for lp in generations.behavior_logprobs for x in lp], dtype=torch.float32
    )
    return RolloutBatch(
        input_ids=torch.cat([prompts, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_ids=response_ids,
        response_mask=response_mask,
        behavior_logprobs=behavior,
        finished=torch.tensor([r == "stop" for r in generations.finish_reasons]),
        policy_version=torch.full((b,), generations.policy_version, dtype=torch.long),
    )


def _forward(model: torch.nn.Module, rollouts: RolloutBatch, **kwargs):
    position_ids = real_token_positions(rollouts.attention_mask)  # (b, p + t)
    return model(
        input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask, position_ids=position_ids, **kwargs
    )


def response_logprobs(
    model: torch.nn.Module, rollouts: RolloutBatch, temperature: float, share_prompts: bool = True
) -> torch.Tensor:
    """Temperature-scaled logprobs of the response tokens under ``model``, (b, t), 0 on padding.

    The logits are divided by the *sampling* temperature before the softmax, as
    the paper's code does (async_rlhf / TRL 0.11 ``logits /= args.temperature + 1e-7``),
    so that the trained distribution is the one that was sampled.

    With ``share_prompts`` (the default; pass ``False`` for one sample per prompt) the
    rollouts that share a prompt (the k samples of one prompt, a DPO pair) run it through
    the model once: see :func:`_shared_prompt_logits`. The logprobs and their gradients are
    the whole forward's up to float rounding; ``False`` runs every sequence whole.
    """
    t = rollouts.response_ids.shape[1]
    logits = _shared_prompt_logits(model, rollouts) if share_prompts else None
    if logits is None:
        logits = _forward(model, rollouts, **last_logits(model, t + 1)).logits[:, -t - 1 : -1]  # (b, t, v)
    return token_logprobs(logits, rollouts.response_ids, temperature) * rollouts.response_mask


def _shared_prompt_logits(model: torch.nn.Module, rollouts: RolloutBatch) -> torch.Tensor | None:
    """The logits that predict each response token, (b, t, v), running each distinct prompt once; ``None`` to run whole.

    Two forwards: the u distinct (left-padded) prompts with a key/value cache, whose last
    position predicts the first response token; then every rollout's response but its
    last token, attending to its prompt's cached keys and values (``Cache.batch_select_indices``
    repeats them, ``transformers/cache_utils.py``), with positions counted on from the
    prompt's real tokens. Causal attention makes this the whole forward's arithmetic, and
    autograd carries the gradients of all k rollouts back through the one prompt pass.
    With k = 2 and prompts about as long as responses (the built-in task: 7-9 prompt and
    5-10 response tokens) that is about a quarter fewer token positions; measured on one CPU
    core, 10-30 % less time for the reference forward and 15-30 % for the policy's forward and
    backward (docs/results.md, section 3). With TL;DR's ~500-token prompts and ~50-token
    responses it is about 45 % fewer positions.

    The number of forwards never depends on the data: always these two (a one-token response
    still runs the second, its logits unused), even when no prompt repeats. Under ZeRO-3 each
    forward gathers parameters collectively, and ranks whose batches differ must still make
    the same calls. ``None`` (run whole, decided the same way on every rank) when gradient
    checkpointing is on (transformers then drops the cache) or the model returns no cache it
    can select from.
    """
    p, t = rollouts.prompt_length, rollouts.response_ids.shape[1]
    if activation_checkpointing(model):
        return None
    prompt_rows = torch.cat([rollouts.input_ids[:, :p], rollouts.attention_mask[:, :p]], dim=1)  # (b, 2p)
    distinct, inverse = torch.unique(prompt_rows, dim=0, return_inverse=True)  # (u, 2p), (b,)
    shared = forward_shared_prompts(model, distinct[:, :p], distinct[:, p:], inverse, **last_logits(model, 1))
    if shared is None:
        return None
    out, cache = shared
    first = out.logits[:, -1][inverse]  # (b, v): the prediction of each rollout's first response token
    fed = max(t - 1, 1)  # response tokens fed; with t = 1 one, whose prediction is dropped
    rest = forward_after_prompts(
        model, cache, rollouts.response_ids[:, :fed], rollouts.attention_mask[:, : p + fed]
    ).logits[:, : t - 1]  # (b, t - 1, v): the predictions of response tokens 2..t
    return torch.cat([first[:, None], rest], dim=1)


def response_logprobs_and_hidden(
    model: torch.nn.Module, rollouts: RolloutBatch, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`response_logprobs`, plus the last hidden state before each response token, (b, t, h)."""
    t = rollouts.response_ids.shape[1]
    out = _forward(model, rollouts, output_hidden_states=True, **last_logits(model, t + 1))
    logits = out.logits[:, -t - 1 : -1]  # (b, t, v)
    hidden = out.hidden_states[-1][:, rollouts.prompt_length - 1 : -1]  # (b, t, h)
    return token_logprobs(logits, rollouts.response_ids, temperature) * rollouts.response_mask, hidden


def critic_values(critic: torch.nn.Module, rollouts: RolloutBatch) -> torch.Tensor:
    """Per-token values from a sequence-classification model used as critic, (b, t), 0 on padding.

    As in TRL 0.11's PPOv2 (which the paper's code forks): the backbone's hidden
    state before each response token goes through the scalar ``score`` head. A
    critic started from a normalized reward model (``reward_mean``/``reward_std``
    in its config, see :class:`~lightning_rlhf.rewards.RewardModelScore`) is
    normalized the same way, so it predicts in the units of the rewards it learns.
    """
    backbone = getattr(critic, critic.base_model_prefix)
    head = getattr(critic, "score", None) or critic.classifier
    position_ids = real_token_positions(rollouts.attention_mask)
    hidden = backbone(
        input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask, position_ids=position_ids
    ).last_hidden_state
    values = head(hidden[:, rollouts.prompt_length - 1 : -1]).squeeze(-1).float()  # (b, t)
    config = critic.config
    if getattr(config, "reward_mean", None) is not None:
        values = (values - config.reward_mean) / config.reward_std
    return values * rollouts.response_mask


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


def micro_batches(indices: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    """``indices`` in consecutive chunks of ``size`` (the last may be shorter); ``None``: one chunk, all of them."""
    if size is None or size >= len(indices):
        return [indices]
    return list(indices.split(size))


def in_micro_batches(fn, rollouts: RolloutBatch, size: int | None) -> torch.Tensor:
    """``fn(rollouts)`` for a function of the rollouts row by row (no gradient), ``size`` rollouts per forward at most.

    The reference, old-policy and critic forwards of a generated batch hold the same
    activations and logits as a training forward; run in micro-batches their peak is that
    of ``size`` rollouts whatever the batch. Rows stay in order; ``None``: one forward.
    """
    chunks = micro_batches(torch.arange(len(rollouts)), size)
    if len(chunks) == 1:
        return fn(rollouts)
    return torch.cat([fn(rollouts[chunk]) for chunk in chunks])


def minibatches(size: int, num_mini_batches: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random split of ``range(size)`` into ``num_mini_batches`` equal parts.

    Raises:
        ValueError: If ``size`` is not divisible by ``num_mini_batches``.
    """
    if num_mini_batches < 1 or size % num_mini_batches:
        raise ValueError(
            f"{size} samples cannot be split into num_mini_batches={num_mini_batches} equal parts; "
            f"pick a divisor of {size}."
        )
    return list(torch.randperm(size, generator=generator).chunk(num_mini_batches))
