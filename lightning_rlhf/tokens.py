"""Token-level helpers shared by generation, rewards and training (bottom layer: imports nothing of ours).

The same prompt encoding is used to sample, to score and to train, so that
train and test inputs agree token for token.
"""

from __future__ import annotations

import torch


def prompt_token_ids(tokenizer, prompts: list) -> list[list[int]]:
    """Tokenize prompts: a string through the chat template when the tokenizer has one, a list of messages always.

    A prompt is either text or a conversation (``[{"role": ..., "content": ...}, ...]``,
    as in No Robots' ``messages``) that ends before the turn to generate.

    Raises:
        ValueError: If a prompt is a conversation and the tokenizer has no chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template and all(isinstance(p, str) for p in prompts):
        return tokenizer(list(prompts), add_special_tokens=True)["input_ids"] if prompts else []  # one batched call
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str) and not has_template:
            ids.append(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            continue
        if not has_template:
            raise ValueError(
                "A prompt is a list of chat messages but the tokenizer has no chat template; "
                "use a chat model's tokenizer or give the prompts as text."
            )
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids.append(
            list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        )
    return ids


def encode_prompt_completion(tokenizer, prompts: list, completions: list[str]) -> list[list[int]]:
    """Token ids of prompt (with chat template) + completion + eos, one list per pair.

    Reward models and SFT policies are trained on this encoding, and reward
    models score it.
    """
    return [p + c for p, c in zip(*encode_pairs(tokenizer, prompts, completions))]


def encode_pairs(tokenizer, prompts: list, completions: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """:func:`encode_prompt_completion` in two parts: the prompts' ids and the completions' ids
    (each ending with eos)."""
    prompt_ids = prompt_token_ids(tokenizer, prompts)
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else []
    return prompt_ids, [c + [tokenizer.eos_token_id] for c in completion_ids]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids, attention_mask)``, both (n, max_len).

    One tensor is built from all the tokens and scattered through the mask (a Python loop
    that fills row by row costs about a millisecond a batch of 64 on a CPU core).
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max())
    mask = torch.arange(width) >= (width - lengths)[:, None]  # (n, width): each row's last len(s) places
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    ids[mask] = torch.tensor([token for s in sequences for token in s], dtype=torch.long)  # row-major: in order
    return ids, mask.long()


def real_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows counted over real tokens only, (n, width).

    Each row then sees the positions of its own unpadded sequence, whatever the padding.
    Leading padding gets 0; padding between real tokens (masked out, as between a prompt
    and its continuation in ``rewards.model.score_pairs``) repeats the position before it.
    """
    return (mask.cumsum(-1) - 1).clamp(min=0)
