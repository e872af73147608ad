"""Bad strategy arguments stop with one sentence, before any process starts."""

import importlib.util

import pytest

from lightning_rlhf.models import ConfigError
from lightning_rlhf.strategies import AsyncRLHFDDPStrategy, AsyncRLHFDeepSpeedStrategy, AsyncRLHFStrategy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="sglang"), "Unknown generation backend 'sglang'"),
        (dict(max_staleness=-1), "max_staleness must be 0"),
        (dict(sync_every=0), "sync_every must be at least 1"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, message):
    for cls in (AsyncRLHFStrategy, AsyncRLHFDDPStrategy):
        with pytest.raises(ConfigError, match=message):
            cls(**kwargs)


def test_a_shared_generator_is_off_by_default_and_can_be_asked_for():
    assert AsyncRLHFDDPStrategy(backend="transformers").shared_generator is False
    assert AsyncRLHFDDPStrategy(backend="transformers", shared_generator=True).shared_generator is True


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_shared_generator_under_zero3_is_refused():
    with pytest.raises(ConfigError, match="ZeRO-3 shards them"):
        AsyncRLHFDeepSpeedStrategy(backend="transformers", stage=3, shared_generator=True)
    assert AsyncRLHFDeepSpeedStrategy(backend="transformers", stage=2, shared_generator=True).shared_generator
