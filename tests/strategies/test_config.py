"""Bad strategy arguments stop with one sentence, before any process starts."""

import importlib.util
import os

import pytest

from lightning_rlhf.errors import ConfigError
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
    assert AsyncRLHFDDPStrategy(backend="transformers").generation.shared_generator is False
    assert AsyncRLHFDDPStrategy(backend="transformers", shared_generator=True).generation.shared_generator is True


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_shared_generator_under_zero3_is_refused():
    with pytest.raises(ConfigError, match="ZeRO-3 shards them"):
        AsyncRLHFDeepSpeedStrategy(backend="transformers", stage=3, shared_generator=True)
    assert AsyncRLHFDeepSpeedStrategy(
        backend="transformers", stage=2, shared_generator=True
    ).generation.shared_generator


def test_unknown_weight_transport_is_refused():
    with pytest.raises(ConfigError, match="Unknown weight_transport 'ucx'"):
        AsyncRLHFStrategy(backend="transformers", weight_transport="ucx")


def test_nccl_needs_two_different_gpus():
    import torch

    from lightning_rlhf.strategies.async_rlhf import check_transport

    with pytest.raises(ConfigError, match="needs the trainer and the generator on GPUs"):
        check_transport("nccl", torch.device("cpu"), "cpu")
    with pytest.raises(ConfigError, match="cannot join two processes on one GPU"):
        check_transport("nccl", torch.device("cuda", 0), "cuda:0")
    check_transport("nccl", torch.device("cuda", 0), "cuda:1")  # the paper's layout: accepted
    check_transport("gloo", torch.device("cuda", 0), "cuda:0")  # gloo goes through host memory: any layout


def test_generator_sees_only_its_own_gpu(monkeypatch):
    from lightning_rlhf.generation.process import isolate_cuda_device

    monkeypatch.setenv(
        "CUDA_VISIBLE_DEVICES", ""
    )  # records the original state, so what the function sets is undone after
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert isolate_cuda_device("cpu") == "cpu" and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert isolate_cuda_device("cuda:3") == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # the trainer's cuda:1 is physical GPU 6
    assert isolate_cuda_device("cuda:1") == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    with pytest.raises(ValueError, match="lists 2 GPU"):
        isolate_cuda_device("cuda:2")
