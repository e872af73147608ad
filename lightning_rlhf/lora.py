"""LoRA policies (PEFT): the wrap, the reference as the same weights with the adapter off, and what a refresh sends.

A LoRA policy trains only its adapter. Its reference policy needs no second copy of the base weights: it is the
policy with the adapter switched off (:class:`WithoutAdapter`). A refresh sends either the adapter alone
(:func:`adapter_state`, PEFT's saved names, which vLLM's adapter loader and a PEFT generator both read) or, for a
generator that cannot take an adapter, the merged weights under the base model's names (:func:`merged_state`).

Sources:
    * Hu et al. 2021, "LoRA": ``W + (alpha / r) B A`` with ``B`` started at 0, so the wrapped policy starts as the
      base model.
    * PEFT (``peft/tuners/lora/layer.py``: ``LoraLayer.get_delta_weight``; ``peft/utils/save_and_load.py``:
      ``get_peft_model_state_dict`` drops the adapter's name from the keys): the delta and the saved names.
    * vLLM (``vllm/lora/request.py``, ``vllm/lora/peft_helper.py``): an adapter is loaded from a folder holding
      ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``) and ``adapter_model.safetensors``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_rlhf.errors import ConfigError

ADAPTER = "default"  # PEFT's name for a model's one adapter
REFRESHES = ("adapter", "merged")
PEFT_MISSING = "LoRA needs the peft package: pip install 'lightning-rlhf[lora]' (peft==0.21.2)."


@dataclass
class LoRA:
    """A LoRA adapter on the policy (``lora:`` in a module's ``init_args``).

    Args:
        rank: ``r``, the adapter's rank.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank``.
        dropout: Dropout on the adapter's input while training.
        target_modules: Names of the linear layers that get an adapter (Llama's attention projections by default).
        refresh: What a refresh sends the generator: ``"adapter"`` (its tensors alone; both backends load them) or
            ``"merged"`` (the merged weights under the base model's names, for a generator that cannot take an
            adapter).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    refresh: Literal["adapter", "merged"] = "adapter"

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(
                f"lora needs rank >= 1, alpha > 0 and 0 <= dropout < 1, got rank={self.rank}, alpha={self.alpha}, "
                f"dropout={self.dropout}."
            )
        if self.refresh not in REFRESHES:
            raise ConfigError(f"lora.refresh must be one of {', '.join(REFRESHES)}, got {self.refresh!r}.")
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty; name the linear layers that get an adapter, e.g. q_proj.")

    def adapter_config(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` for this adapter (what vLLM's loader reads)."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "bias": "none",
        }


def check_peft() -> None:
    """Refuse LoRA in one sentence, before any weights are read, when peft is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ConfigError(PEFT_MISSING) from error


def wrap(model: torch.nn.Module, lora: LoRA) -> torch.nn.Module:
    """``model`` with a LoRA adapter on ``lora.target_modules``; only the adapter's parameters train."""
    from peft import LoraConfig, get_peft_model

    targets = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if missing := sorted(set(lora.target_modules) - targets):
        raise ConfigError(
            f"lora.target_modules names {missing[0]!r}, which {type(model).__name__} does not have; "
            f"pick among its linear layers (e.g. q_proj, v_proj)."
        )
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module | None) -> bool:
    """Whether ``model`` is a PEFT model (a LoRA policy)."""
    return model is not None and hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _saved_name(name: str) -> str:
    return name.replace(f".{ADAPTER}.", ".")


def adapter_state(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The adapter's parameters under PEFT's saved names (``...q_proj.lora_A.weight``), in the model's order."""
    return [(_saved_name(name), p) for name, p in model.named_parameters() if ".lora_" in name]


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A PEFT model's adapter parameters by saved name: where a generator copies a received adapter."""
    return dict(adapter_state(model))


@torch.no_grad()
def merged_state(model: torch.nn.Module, tied_head: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The base model's parameters with each adapter merged in, under the base model's names, without touching
    ``model``: ``W + (alpha / r) B A`` for an adapted layer, the parameter itself elsewhere."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {
        f"{name}.base_layer.weight": layer.get_delta_weight(ADAPTER)
        for name, layer in base.named_modules()
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A
    }
    state = []
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        tensor = p.detach() + deltas[name].to(p.dtype) if name in deltas else p.detach()
        state.append((name.replace(".base_layer.", "."), tensor))
    if tied_head and getattr(base.config, "tie_word_embeddings", False):
        state.append(("lm_head.weight", base.get_output_embeddings().weight.detach()))
    return state


class WithoutAdapter(torch.nn.Module):
    """The reference policy of a LoRA policy: the same module called with its adapter switched off, in eval mode.

    It holds the policy without registering it (no parameters of its own, nothing twice in a checkpoint or an
    optimizer); attributes it does not have (``config``, ...) are the policy's.
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.__dict__["_policy"] = policy

    def forward(self, *args, **kwargs):
        policy = self.__dict__["_policy"]
        was_training = policy.training
        policy.eval()  # no dropout in the reference's logprobs, as a frozen copy would have none
        try:
            with policy.disable_adapter():
                return policy(*args, **kwargs)
        finally:
            policy.train(was_training)

    def get_base_model(self) -> torch.nn.Module:
        return self.__dict__["_policy"].get_base_model()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_policy"], name)


def write_adapter(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Save an adapter where vLLM (or PEFT) loads it from: ``adapter_config.json`` (``config``, see
    :meth:`LoRA.adapter_config`) and ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1))


def save_policy(policy: torch.nn.Module, path: str | Path, keep: bool = True) -> None:
    """``policy.save_pretrained(path)``; a LoRA policy is written merged with its adapter alone, in PEFT's format,
    in ``path/adapter``. ``keep`` merges a copy (the policy keeps training as it was); without it the policy itself
    is merged (an export's throwaway model: no second copy in memory)."""
    if is_lora(policy):
        policy.save_pretrained(Path(path) / "adapter")
        policy = (copy.deepcopy(policy) if keep else policy).merge_and_unload()
    policy.save_pretrained(path)


def lora_dict(lora: LoRA | None) -> dict[str, Any] | None:
    """``lora`` as plain data (a generator process's spec is pickled)."""
    return None if lora is None else asdict(lora)
