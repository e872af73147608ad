import json
import os

import pytest

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.models import load_policy, load_tokenizer, no_progress_bars, resolve_source
from lightning_rlhf.tokens import prompt_token_ids


def test_missing_local_path_is_one_clear_sentence(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass an existing local directory"):
        resolve_source(str(tmp_path / "no_such_model"), "policy model")
    with pytest.raises(ConfigError, match="is a file"):
        (tmp_path / "weights.bin").write_text("x")
        resolve_source(str(tmp_path / "weights.bin"))


def test_unknown_builtin_names_the_choices():
    with pytest.raises(ConfigError, match="builtin:sft"):
        resolve_source("builtin:nope")


def test_unreachable_hub_id_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="Could not load the policy model 'no-such-org/no-such-model'"):
        load_policy("no-such-org/no-such-model")


def _copy_tokenizer(src: str, dst, **overrides):
    tokenizer = load_tokenizer(src)
    tokenizer.save_pretrained(dst)
    config_path = os.path.join(dst, "tokenizer_config.json")
    config = json.load(open(config_path))
    config.update(overrides)
    json.dump(config, open(config_path, "w"))
    return dst


def test_tokenizer_without_pad_and_eos_is_rejected(tiny_model_dir, tmp_path):
    path = _copy_tokenizer(tiny_model_dir, tmp_path / "tok", eos_token=None, pad_token=None)
    with pytest.raises(ConfigError, match="neither a pad token nor an eos token"):
        load_tokenizer(str(path))


def test_tokenizer_without_pad_falls_back_to_eos_and_pads_left(tiny_model_dir, tmp_path):
    path = _copy_tokenizer(tiny_model_dir, tmp_path / "tok", pad_token=None)
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_chat_template_is_used_when_present(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    plain = prompt_token_ids(tokenizer, ["1 2 3"])[0]
    assert plain == tokenizer("1 2 3")["input_ids"]
    tokenizer.chat_template = (
        "{% for m in messages %}copy {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    templated = prompt_token_ids(tokenizer, ["1 2 3"])[0]
    assert tokenizer.decode(templated) == "copy 1 2 3 ="
    conversation = [
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "3"},
    ]
    assert tokenizer.decode(prompt_token_ids(tokenizer, [conversation])[0]) == "copy 1 copy 2 copy 3 ="


def test_text_prompts_are_tokenized_in_one_call_with_the_same_ids(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = ["1 2 3", "4", "5 6 7 8 9"]  # different lengths: no padding may leak into the batched ids
    assert prompt_token_ids(tokenizer, prompts) == [tokenizer(p)["input_ids"] for p in prompts]
    assert prompt_token_ids(tokenizer, []) == []


def test_a_conversation_needs_a_chat_template(tiny_model_dir):
    with pytest.raises(ValueError, match="no chat template"):
        prompt_token_ids(load_tokenizer(tiny_model_dir), [[{"role": "user", "content": "1"}]])


def test_a_reward_model_started_from_a_policy_loads_without_the_load_report(tiny_model_dir):
    import logging

    from transformers.utils import logging as hf_logging

    from lightning_rlhf.models import load_reward_model

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger("transformers").addHandler(handler)  # transformers' own root logger (it does not propagate)
    try:
        model = load_reward_model(tiny_model_dir)  # a causal LM checkpoint: the score head is new by design
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
    assert model.config.num_labels == 1
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]
    assert hf_logging.get_verbosity() == hf_logging.WARNING  # restored afterwards


@pytest.mark.parametrize("enabled", [True, False])
def test_no_progress_bars_restores_transformers_and_hub_bars(enabled):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        state = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
        with no_progress_bars():
            assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        assert (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()) == state
    finally:
        (hf_logging.enable_progress_bar if before[0] else hf_logging.disable_progress_bar)()
