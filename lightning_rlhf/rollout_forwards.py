"""Forwards of a :class:`~lightning_rlhf.rollout_batch.RolloutBatch` through the policy, the reference and the critic.

The response tokens' temperature-scaled logprobs (each distinct prompt run once for all its
samples), the last hidden state before each response token, and the critic's value of each.
Shared by the LightningModules and the Fabric recipes, so both compute exactly the same quantities.

Notation: ``b`` rollouts, ``p`` padded prompt length, ``t`` padded response length, ``v`` vocabulary,
``h`` hidden size, ``u`` distinct prompts.
"""

from __future__ import annotations

import torch

from lightning_rlhf.forwards import activation_checkpointing, forward_after_prompts, forward_shared_prompts, last_logits
from lightning_rlhf.losses import token_logprobs
from lightning_rlhf.models import load_reward_model
from lightning_rlhf.rollout_batch import RolloutBatch
from lightning_rlhf.tokens import real_token_positions


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
    5-10 response tokens) that is about a quarter fewer token positions (the time it saves is in
    docs/results.md, section 3, "The numbers behind choices in the code"). With TL;DR's
    ~500-token prompts and ~50-token responses it is about 45 % fewer positions.

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


def value_model(critic: str | None, policy: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """``(critic, value_head)``, one of them ``None``: the critic loaded from ``critic`` (a reward model source),
    or for ``None`` a linear value head on ``policy``'s last hidden state that starts at 0 (no value before it learns
    one)."""
    if critic is not None:
        return load_reward_model(critic).train(), None
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return None, head


def logprobs_and_values(
    policy: torch.nn.Module,
    critic: torch.nn.Module | None,
    value_head: torch.nn.Module | None,
    rollouts: RolloutBatch,
    temperature: float,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's response logprobs and the values of the critic or of the value head on the policy, both (b, t),
    0 on padding; a value head reads the hidden states of the policy's forward, so it costs no second forward."""
    if critic is not None:
        return response_logprobs(policy, rollouts, temperature, share_prompts), critic_values(critic, rollouts)
    assert value_head is not None, "a PPO module has a critic or a value head"
    logprobs, hidden = response_logprobs_and_hidden(policy, rollouts, temperature)
    return logprobs, value_head(hidden).squeeze(-1).float() * rollouts.response_mask
