"""The trainer-side handle of a real generator process (transformers backend, a tiny model, CPU).

One process serves every check, so the file pays for one start: requests in
order, a refresh sent only once the generator has reached it (the NCCL path,
run here over gloo), the probe answered with the acknowledgement, and a death
noticed within seconds.
"""

import threading
import time

import pytest
import torch

from lightning_rlhf.generation import SamplingConfig, process
from lightning_rlhf.generation.process import GeneratorError, GeneratorProcess
from lightning_rlhf.generation.transformers_backend import sequence_logprobs
from lightning_rlhf.generation.weights import policy_state, stream_of
from lightning_rlhf.generation.worker import GeneratorSpec
from lightning_rlhf.models import load_policy

pytestmark = pytest.mark.slow  # starts a process

SAMPLING = SamplingConfig(k=2, temperature=1.0, max_new_tokens=24)


def test_a_generator_process_takes_refreshes_in_order_without_stalling_the_trainer(tiny_model_dir, monkeypatch):
    # the trainer side of the NCCL path (broadcast from the caller's thread once the generator has reached
    # the refresh) over gloo, the only group this machine has; the generator's side is the same for both
    monkeypatch.setattr(process, "SENT_WHEN_REACHED", frozenset({"gloo"}))
    sends = []
    send_now = process.send_now
    monkeypatch.setattr(
        process,
        "send_now",
        lambda *a, **kw: sends.append(threading.current_thread().name) or send_now(*a, **kw),
    )
    policy = load_policy(tiny_model_dir, "float32")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))  # weights the generator cannot have loaded from disk
    generator = GeneratorProcess(GeneratorSpec(model=tiny_model_dir, seed=3, bucket_bytes=2**16), poll_s=0.05)
    generator.start()
    try:
        prompts = [[5, 6, 7], [8, 9]]
        generator.submit(0, prompts, SAMPLING)
        probe = (prompts[0], [10, 11, 12], 1.0)
        start = time.perf_counter()
        generator.push_weights(stream_of(policy_state(policy)), version=1, probe=probe)
        pushed_in = time.perf_counter() - start
        assert sends == []  # request 0 comes first: nothing is sent before the generator has finished it
        generator.submit(1, prompts, SAMPLING)
        first = generator.result(0)
        assert sends == [threading.current_thread().name]  # sent in the trainer's own thread, on reading request 0
        second = generator.result(1)
        assert (first.policy_version, second.policy_version) == (0, 1)  # request 1 was sampled after the refresh
        answer = None
        deadline = time.monotonic() + 30
        while answer is None and time.monotonic() < deadline:  # read without waiting, as WeightSync does
            answer = generator.probe_logprobs(1)
            time.sleep(0.05)
        expected = sequence_logprobs(policy, *probe)
        assert answer is not None and torch.allclose(torch.tensor(answer), expected, atol=1e-5)
        assert generator.probe_logprobs(1) is None  # each answer is handed over once
        assert pushed_in < 5.0  # packing only; the send waited for the generator, not the trainer for it

        generator.process.kill()
        start = time.monotonic()
        with pytest.raises(GeneratorError, match="died"):
            generator.submit(2, prompts, SAMPLING)
            generator.result(2)
        assert time.monotonic() - start < 5.0
    finally:
        generator.close()
    assert generator.process is None


@pytest.mark.parametrize("spec_name", [None, "train"], ids=["a script run by path", "a module run with -m"])
def test_a_generator_started_from_a_script_runs_it_again_only_when_its_spec_needs_it(spec_name, monkeypatch):
    import importlib.machinery
    import multiprocessing.spawn as spawn
    import sys
    import types

    script = types.ModuleType("__main__")  # the training script, as the interpreter runs it
    script.__file__ = "/runs/train.py"
    script.__spec__ = importlib.machinery.ModuleSpec(spec_name, None) if spec_name else None
    monkeypatch.setitem(sys.modules, "__main__", script)
    ran_again = ("init_main_from_path", "init_main_from_name")  # what spawn's child runs before the target
    assert any(key in spawn.get_preparation_data("generator") for key in ran_again)  # spawn's default

    with process.main_not_rerun_unless_needed(GeneratorSpec(model="policy")):
        assert not any(key in spawn.get_preparation_data("generator") for key in ran_again)
    assert script.__file__ == "/runs/train.py" and getattr(script.__spec__, "name", None) == spec_name  # restored

    script.Reward = type("Reward", (), {"__module__": "__main__"})  # a reward class written in the script
    with process.main_not_rerun_unless_needed(GeneratorSpec(model="policy", scorer=script.Reward())):
        assert any(key in spawn.get_preparation_data("generator") for key in ran_again)  # it must be found
