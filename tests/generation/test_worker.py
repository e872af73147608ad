"""What the generator process does to itself before it builds its backend: which GPUs it sees, which vLLM
ports it scans, how many tensor-parallel ranks it joins the side group with."""

import os

import pytest

from lightning_rlhf.generation.worker import VLLM_PORTS_PER_GENERATOR, GeneratorSpec, isolate_cuda_device, own_vllm_port


def test_generator_sees_only_its_own_gpu(monkeypatch):
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


def test_a_tensor_parallel_generator_sees_all_its_gpus_and_joins_as_one_rank_each(monkeypatch):
    """``cuda:1,2``: two vLLM workers, side-group ranks 1 and 2 of 3 (the trainer is rank 0)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert isolate_cuda_device("cuda:1,2") == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert isolate_cuda_device("cuda:2,3") == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert GeneratorSpec(device="cuda:2,3").tensor_parallel_size == 2
    assert GeneratorSpec(device="cuda:1").tensor_parallel_size == 1 == GeneratorSpec(device="cpu").tensor_parallel_size


def test_each_generator_of_a_node_scans_its_own_vllm_ports():
    """With VLLM_PORT set, generators started together would race for the same port (defect g)."""
    assert own_vllm_port(None, 3) is None and own_vllm_port("", 3) is None  # unset: the OS picks
    ports = [own_vllm_port("30000", slot) for slot in range(4)]
    assert ports[0] == "30000" and len(set(ports)) == 4
    assert int(ports[1]) - int(ports[0]) == VLLM_PORTS_PER_GENERATOR
