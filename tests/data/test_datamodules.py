import json

import pytest

from lightning_rlhf.data import DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from lightning_rlhf.models import ConfigError


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(10)))
    return str(path)


def test_local_jsonl_with_a_custom_prompt_column(jsonl):
    data = PromptDataModule(jsonl, prompt_column="question", batch_size=4)
    batch = next(iter(data.train_dataloader()))
    assert len(batch) == 4
    assert batch[0]["prompt"].startswith("q") and batch[0]["answer"].startswith("####")  # other columns kept


def test_local_parquet(tmp_path):
    import datasets

    path = tmp_path / "prompts.parquet"
    datasets.Dataset.from_dict({"prompt": ["a", "b", "c", "d"]}).to_parquet(str(path))
    data = PromptDataModule(str(path), batch_size=2, shuffle=False)
    assert [r["prompt"] for r in next(iter(data.train_dataloader()))] == ["a", "b"]


def test_missing_prompt_column_names_the_column_and_the_fix(jsonl):
    with pytest.raises(ConfigError, match=r"has no column 'prompt' \(columns: question, answer\); set `prompt_column`"):
        PromptDataModule(jsonl)


def test_missing_dataset_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        PromptDataModule(str(tmp_path / "missing.jsonl"))


def test_builtin_datasets_have_their_columns():
    assert next(iter(DemonstrationDataModule(batch_size=2).train_dataloader()))[0].keys() >= {"prompt", "completion"}
    assert next(iter(PreferenceDataModule(batch_size=2).train_dataloader()))[0].keys() >= {"prompt", "chosen", "rejected"}
