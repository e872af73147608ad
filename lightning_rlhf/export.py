"""Take a trained policy away: a Lightning checkpoint (DeepSpeed's sharded ZeRO folders included)
to Hugging Face format.

``lightning-rlhf export CHECKPOINT OUT_DIR`` writes ``OUT_DIR/config.json``, the
weights (safetensors) and the tokenizer, which ``AutoModelForCausalLM.from_pretrained``
and vLLM load as they load any model. The architecture and tokenizer come from where
the module loaded its policy (its ``policy`` hyperparameter, kept in the checkpoint);
the weights from the checkpoint's ``policy.*`` entries (the reward model's ``model.*``
for a :class:`~lightning_rlhf.modules.RewardModel` checkpoint).

A DeepSpeed checkpoint is a folder of parameter and optimizer shards; Lightning's
``convert_zero_checkpoint_to_fp32_state_dict`` (``lightning/pytorch/utilities/deepspeed.py``,
over DeepSpeed's ``zero_to_fp32``) consolidates it into one float32 state dict first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.lora import LoRA, check_peft, save_policy, wrap
from lightning_rlhf.models import load_policy, load_reward_model, load_tokenizer


def read_checkpoint(checkpoint: str | os.PathLike) -> dict:
    """A Lightning checkpoint's contents (``state_dict``, ``hyper_parameters``, ...), consolidating a DeepSpeed folder.

    Raises:
        ConfigError: If ``checkpoint`` does not exist.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(
            f"Checkpoint '{checkpoint}' does not exist; pass a .ckpt file or a DeepSpeed checkpoint folder."
        )
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as scratch:
        return convert_zero_checkpoint_to_fp32_state_dict(str(path), os.path.join(scratch, "consolidated.pt"))


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the policy (or reward model) of ``checkpoint`` and its tokenizer to ``out_dir`` in Hugging Face format.

    A LoRA policy is written merged, with its adapter alone (PEFT's format) in ``out_dir/adapter``.

    Raises:
        ConfigError: If the checkpoint does not exist, holds no policy or reward model, or its weights
            do not fit the architecture its module was built from.
    """
    contents = read_checkpoint(checkpoint)
    hparams, state = contents.get("hyper_parameters", {}), contents["state_dict"]
    if "policy" in hparams:
        source, prefix, load = hparams["policy"], "policy.", load_policy
    elif "model" in hparams:
        source, prefix, load = hparams["model"], "model.", load_reward_model
    else:
        raise ConfigError(
            f"Checkpoint '{checkpoint}' has no policy or reward model to export "
            f"(hyperparameters: {', '.join(hparams) or 'none'}); pass a checkpoint of an RL module, SFT or RewardModel."
        )
    model = load(source)  # the architecture (and initial weights), then the trained weights
    lora = hparams.get("lora")
    if lora is not None:  # a LoRA policy: the same adapter on the base model, then its trained tensors
        check_peft()
        model = wrap(model, lora if isinstance(lora, LoRA) else LoRA(**lora))
    weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [key for key in missing if key not in _tied(model)]
    if missing or unexpected:
        raise ConfigError(
            f"The weights in '{checkpoint}' do not fit {source} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "export with the model the run trained."
        )
    out = Path(out_dir)
    save_policy(model, out, keep=False)
    load_tokenizer(source).save_pretrained(out)
    return out


def _tied(model: torch.nn.Module) -> set[str]:
    """Parameter names that share another's storage (a tied ``lm_head.weight``): a state dict may omit them."""
    names = getattr(model, "_tied_weights_keys", None) or {}
    return set(names if isinstance(names, list | tuple | set) else names.keys())
