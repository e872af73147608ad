"""Loading policies, reward models and tokenizers by hub id or local path.

Every loader accepts three kinds of source:

* a local directory written by ``save_pretrained``;
* a Hugging Face Hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``;
* ``"builtin:<name>"`` for an artifact of the built-in task, which
  :func:`lightning_rlhf.tasks.copy.prepare` writes into the cache folder
  (the CLI, the recipes and the benchmarks call it first; :mod:`lightning_rlhf.builtin`).

Problems are reported as one :class:`ConfigError` sentence that names the
source and the fix, before any weights are read.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

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

from lightning_rlhf.builtin import BUILTIN_PREFIX, builtin_path
from lightning_rlhf.dtypes import MODEL_DTYPES, torch_dtype
from lightning_rlhf.errors import ConfigError

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
