"""LoRA refreshes to a real generator process, per backend: each version's adapter, and only it, samples.

The trainer's LoRA policy gets adapter values far from 0 (so the adapter changes every logprob), sends the
adapter alone, and the post-refresh probe must equal the trainer's logprobs with that adapter, not the base
model's; a second version must replace the first (a generator that kept sampling with the first, or with the
base model, fails).
"""

import importlib.util
import time

import pytest
import torch

from lightning_rlhf.generation import SamplingConfig
from lightning_rlhf.generation.process import GeneratorProcess
from lightning_rlhf.generation.transformers_backend import sequence_logprobs
from lightning_rlhf.generation.weights import policy_state, stream_of
from lightning_rlhf.generation.worker import GeneratorSpec
from lightning_rlhf.lora import LoRA, adapter_state, lora_dict, wrap
from lightning_rlhf.models import load_policy

pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # starts a process

HAS_VLLM = importlib.util.find_spec("vllm") is not None
LORA = LoRA(rank=8, alpha=16)


def _answer(generator: GeneratorProcess, version: int) -> list[float]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # read without waiting, as WeightSync does
        answer = generator.probe_logprobs(version)
        if answer is not None:
            return answer
        time.sleep(0.05)
    raise AssertionError(f"no probe answer for version {version}")


@pytest.mark.parametrize(
    ("backend", "refresh"),
    [
        ("transformers", "adapter"),
        ("transformers", "merged"),  # a plain generator, sent the merged weights under the base model's names
        pytest.param("vllm", "adapter", marks=pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")),
    ],
)
def test_each_refresh_sends_the_adapter_alone_and_the_generator_samples_with_exactly_it(
    backend, refresh, tiny_model_dir, capfd
):
    base = load_policy(tiny_model_dir, "float32")
    policy = wrap(load_policy(tiny_model_dir, "float32"), LORA)
    spec = GeneratorSpec(
        backend=backend,
        model=tiny_model_dir,
        seed=3,
        lora=lora_dict(LORA) if refresh == "adapter" else None,
        vllm_kwargs={"max_model_len": 64},
    )
    generator = GeneratorProcess(spec, poll_s=0.05)
    generator.start()
    prompt, completion = [5, 6, 7, 8], [10, 11, 12, 13, 14]
    probe = (prompt, completion, 1.0)
    try:
        for version, seed in ((1, 0), (2, 1)):
            with torch.no_grad():
                generator_seed = torch.Generator().manual_seed(seed)
                for _, p in adapter_state(policy):
                    p.copy_(torch.randn(p.shape, generator=generator_seed) * 0.1)
            sent = policy_state(policy, lora_refresh=refresh)
            adapter_only = all(".lora_" in name for name, _ in sent)
            assert adapter_only == (refresh == "adapter")  # the adapter alone travels, or the merged weights
            generator.push_weights(stream_of(sent), version=version, probe=probe)
            generator.submit(version - 1, [prompt], SamplingConfig(k=2, temperature=1.0, max_new_tokens=4))
            assert generator.result(version - 1).policy_version == version  # sampled after the refresh
            answer = torch.tensor(_answer(generator, version))
            with torch.no_grad():
                expected = sequence_logprobs(policy, *probe)
                without_adapter = sequence_logprobs(base, *probe)
            assert (expected - without_adapter).abs().max() > 0.05  # the adapter matters to these tokens
            torch.testing.assert_close(answer, expected.float(), atol=1e-4, rtol=0)
    finally:
        generator.close()
    # a generator that ends cleanly says nothing at exit (objects left frozen by gc.freeze() outlive
    # interpreter shutdown, and triton's bindings reported each as "nanobind: leaked ...")
    assert "leaked" not in capfd.readouterr().err
