"""Replacement generators: one that fails to start is closed, and the next one continues the run's sampling seeds."""

from types import SimpleNamespace

import pytest

from lightning_rlhf.generation.process import GeneratorError
from lightning_rlhf.strategies import AsyncRLHFStrategy, GenerationConfig, async_rlhf


class StandInGenerator:
    """Records every generator the strategy makes; the second one fails to start."""

    made: list["StandInGenerator"] = []

    def __init__(self, spec) -> None:
        self.spec, self.started, self.closed = spec, False, False
        StandInGenerator.made.append(self)

    def start(self) -> None:
        self.started = True
        if len(StandInGenerator.made) == 2:
            raise GeneratorError("the replacement could not start")

    def close(self) -> None:
        self.closed = True


def test_a_replacement_that_fails_to_start_is_closed_and_the_next_continues_the_seed_counter(
    monkeypatch, tiny_model_dir
):
    StandInGenerator.made = []
    monkeypatch.setattr(async_rlhf, "GeneratorProcess", StandInGenerator)
    strategy = AsyncRLHFStrategy(generation=GenerationConfig(backend="transformers"))
    module = SimpleNamespace(generation_seed=7, policy_source=tiny_model_dir, lora=None)  # a full-weight policy
    monkeypatch.setattr(strategy, "_rl_module", lambda: module)

    first = strategy._new_generator()  # the run's generator
    strategy._pipeline = SimpleNamespace(request_ids=12)  # it served 12 requests, then died
    first.close()  # as the pipeline does before asking for a replacement
    with pytest.raises(GeneratorError):
        strategy._new_generator()  # the first replacement fails to start
    strategy._new_generator()  # the pipeline tries again
    strategy.stop_generator()  # the end of fit

    assert [g.started for g in StandInGenerator.made] == [True, True, True]
    assert all(g.closed for g in StandInGenerator.made)  # the failed one too
    assert [g.spec.first_call for g in StandInGenerator.made] == [0, 12, 12]
    assert {g.spec.seed for g in StandInGenerator.made} == {7}
