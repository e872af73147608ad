"""LoRA policies: the wrap, the reference with the adapter off, what a refresh sends, export and one update."""

import copy

import pytest
import torch

from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import TransformersBackend
from lightning_rlhf.generation.vllm_backend import vllm_lora_rank
from lightning_rlhf.generation.weights import policy_state
from lightning_rlhf.lora import LoRA, WithoutAdapter, adapter_state, is_lora, merged_state, wrap
from lightning_rlhf.models import load_policy
from lightning_rlhf.modules import GRPO, OnlineDPO
from lightning_rlhf.rewards import RewardFunction

peft = pytest.importorskip("peft")


def _trained_adapter(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter tensor random values, as training would (B starts at 0, so the adapter does nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_state(model):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 7, 9, 4, 6]])


def test_only_the_adapter_trains_and_the_reference_is_the_base_model(tiny_model_dir):
    base = load_policy(tiny_model_dir)
    policy = wrap(copy.deepcopy(base), LoRA(rank=4, alpha=8))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    torch.testing.assert_close(_logits(policy, IDS), _logits(base, IDS))  # B = 0: the wrapped policy is the base
    _trained_adapter(policy)
    assert not torch.allclose(_logits(policy, IDS), _logits(base, IDS))
    reference = WithoutAdapter(policy)
    torch.testing.assert_close(_logits(reference, IDS), _logits(base, IDS))  # adapter off: the base model
    assert list(reference.parameters()) == [] and reference.config is policy.config
    policy.train()
    _logits(reference, IDS)
    assert policy.training  # the reference's forward runs in eval mode and gives the policy back as it was
    assert not torch.allclose(_logits(policy, IDS), _logits(base, IDS))  # ... and with its adapter on


def test_an_adapter_refresh_sends_peft_s_saved_names_and_a_few_percent_of_the_bytes(tiny_model_dir):
    from peft import get_peft_model_state_dict

    policy = wrap(load_policy(tiny_model_dir), LoRA(rank=16, alpha=32))
    sent = policy_state(policy, lora_refresh="adapter")
    assert [n for n, _ in sent] == list(get_peft_model_state_dict(policy))  # what vLLM's loader and PEFT read
    full = policy_state(policy.get_base_model().__class__(policy.config))
    sent_bytes = sum(t.numel() * t.element_size() for _, t in sent)
    full_bytes = sum(t.numel() * t.element_size() for _, t in full)
    # the tiny model is mostly embedding; the attention adapters are still a small share
    assert 0 < sent_bytes < 0.25 * full_bytes


def test_a_merged_refresh_is_the_merged_model_under_the_base_model_s_names(tiny_model_dir):
    base = load_policy(tiny_model_dir)
    policy = wrap(copy.deepcopy(base), LoRA(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _trained_adapter(policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    merged = dict(merged_state(policy, tied_head=True))
    assert set(merged) == {n for n, _ in base.named_parameters()} | {"lm_head.weight"}
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name])
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())  # the policy itself is untouched
    # a plain model loaded with the merged weights gives the LoRA policy's logits
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged, strict=False)
    torch.testing.assert_close(_logits(plain, IDS), _logits(policy, IDS), rtol=1e-5, atol=1e-5)


def test_a_peft_generator_takes_the_adapter_and_then_samples_as_the_policy(tiny_model_dir):
    policy = wrap(load_policy(tiny_model_dir), LoRA(rank=4, alpha=8))
    _trained_adapter(policy, seed=1)
    generator_model = wrap(load_policy(tiny_model_dir), LoRA(rank=4, alpha=8))  # as GeneratorSpec.build makes it
    backend = TransformersBackend(generator_model, [2], 0, share_weights=False)
    assert is_lora(backend.model)
    backend.load_weights([(n, t.detach().clone()) for n, t in policy_state(policy)], version=1)
    ids = IDS[0].tolist()
    expected = torch.log_softmax(_logits(policy, IDS)[0, 2:-1], -1).gather(-1, IDS[0, 3:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(backend.sequence_logprobs(ids[:3], ids[3:], 1.0)), expected)


class Length(RewardFunction):
    """Varies with the completion's length and characters, so a group of samples rarely scores alike."""

    def __call__(self, prompts, completions, rows=None):
        return torch.tensor([float(len(c) + sum(map(ord, c)) % 7) for c in completions])


@pytest.mark.parametrize("cls", [GRPO, OnlineDPO])
def test_a_lora_module_updates_its_adapter_only_and_keeps_no_second_model(cls, tiny_model_dir, quiet_trainer):
    module = cls(policy=tiny_model_dir, reward=Length(), k=2, max_new_tokens=4, lora=LoRA(rank=4, alpha=8))
    module.configure_model()
    assert isinstance(module.ref_policy, WithoutAdapter)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer = quiet_trainer(2)
    trainer.fit(module, PromptDataModule(batch_size=2, shuffle=False))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    adapter = {id(p) for _, p in adapter_state(module.policy)}
    assert optimized == adapter  # the optimizer sees the adapter and nothing else
    moved = {n for n, p in module.policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_" in n for n in moved)
    # one copy of the base weights in the module's state: the reference holds none of its own
    names = list(module.state_dict())
    assert not any(n.startswith("ref_policy.") for n in names)


def test_export_writes_the_adapter_and_the_merged_model(tiny_model_dir, tmp_path):
    module = GRPO(policy=tiny_model_dir, lora=LoRA(rank=4, alpha=8))
    module.configure_model()
    _trained_adapter(module.policy, seed=2)
    module.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    merged = load_policy(str(tmp_path / "out"))
    torch.testing.assert_close(_logits(merged, IDS), _logits(module.policy, IDS), rtol=1e-5, atol=1e-5)
    reloaded = peft.PeftModel.from_pretrained(load_policy(tiny_model_dir), str(tmp_path / "out" / "adapter"))
    torch.testing.assert_close(_logits(reloaded, IDS), _logits(module.policy, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0), "lora needs rank >= 1"),
        (dict(refresh="both"), "lora.refresh must be one of adapter, merged"),
        (dict(target_modules=[]), "target_modules is empty"),
    ],
)
def test_bad_lora_settings_are_refused_in_one_sentence(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoRA(**kwargs)


def test_vllm_gets_the_smallest_lora_rank_that_holds_the_adapter_and_a_larger_one_is_refused():
    assert [vllm_lora_rank(rank) for rank in (1, 2, 16, 17, 512)] == [1, 8, 16, 32, 512]
    with pytest.raises(ConfigError, match="up to rank 512, got lora.rank=513; lower the rank or set lora.refresh"):
        vllm_lora_rank(513)


def test_a_target_the_model_does_not_have_is_named(tiny_model_dir):
    with pytest.raises(ConfigError, match="names 'qkv', which LlamaForCausalLM does not have"):
        wrap(load_policy(tiny_model_dir), LoRA(target_modules=["qkv"]))


def test_gradient_checkpointing_gives_a_lora_policy_the_same_update(tiny_model_dir, quiet_trainer):
    # non-reentrant checkpointing: the adapter inside a recomputed block still gets its gradient
    adapters = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = GRPO(
            policy=tiny_model_dir,
            reward=Length(),
            k=4,
            max_new_tokens=6,
            missing_eos_penalty=None,  # the untrained model rarely stops: its completions' own scores
            kl_coef=0.0,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
            gradient_checkpointing=checkpointing,
            lora=LoRA(rank=4, alpha=8),
        )
        module.configure_model()
        quiet_trainer(1).fit(module, PromptDataModule(batch_size=2, shuffle=False))
        adapters.append({n: p.detach().clone() for n, p in adapter_state(module.policy)})
    assert any(p.abs().sum() > 0 for n, p in adapters[0].items() if ".lora_B." in n)  # B moved from 0
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=1e-4, atol=1e-6)


def test_sft_trains_a_lora_adapter_and_saves_it_beside_the_merged_model(tiny_model_dir, quiet_trainer, tmp_path):
    from lightning_rlhf.data import DemonstrationDataModule
    from lightning_rlhf.modules import SFT

    module = SFT(policy=tiny_model_dir, lora=LoRA(rank=4, alpha=8))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    quiet_trainer(2).fit(module, DemonstrationDataModule(batch_size=8))
    moved = {n for n, p in module.policy.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_" in n for n in moved)
    module.save_pretrained(tmp_path / "sft")
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").exists()
    merged = load_policy(str(tmp_path / "sft"))
    torch.testing.assert_close(_logits(merged, IDS), _logits(module.policy, IDS), rtol=1e-5, atol=1e-5)
