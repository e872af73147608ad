"""Torch dtypes by name, the one place a config's or a message's dtype string becomes a ``torch.dtype``."""

from __future__ import annotations

import torch

from lightning_rlhf.errors import ConfigError

MODEL_DTYPES = ("float32", "bfloat16", "float16")  # what models load and generators run in


def torch_dtype(name: str | torch.dtype, allowed: tuple[str, ...] | None = None) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (a dtype is returned as it is); ``allowed`` limits the names.

    Raises:
        ConfigError: On a name that is not a torch dtype, or not in ``allowed``.
    """
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or (allowed is not None and name not in allowed):
        names = [repr(n) for n in allowed or ()]
        choices = (
            ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "a torch dtype name such as 'float32'"
        )
        raise ConfigError(f"Unknown dtype {name!r}; use {choices}.")
    return dtype
