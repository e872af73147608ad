import json

import pytest

from lightning_rlhf.data import DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from lightning_rlhf.errors import ConfigError


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
    assert next(iter(PreferenceDataModule(batch_size=2).train_dataloader()))[0].keys() >= {
        "prompt",
        "chosen",
        "rejected",
    }


def _stream(size, batch_size, epochs, rank=0, num_replicas=1):
    """The reference: each epoch's seeded order, this rank's share, cut into whole batches."""
    import torch

    per_rank = size // num_replicas
    batches = []
    for epoch in range(epochs):
        order = torch.randperm(size, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        mine = order[: per_rank * num_replicas][rank::num_replicas]
        batches += [mine[b * batch_size : (b + 1) * batch_size] for b in range(per_rank // batch_size)]
    return batches


def _batches(iterator, batch_size, limit=None):
    items = list(iterator)
    batches = [items[b : b + batch_size] for b in range(0, len(items) - batch_size + 1, batch_size)]
    return batches[:limit] if limit is not None else batches


def test_sampler_continues_the_stream_at_the_position_whatever_the_epoch_cut():
    from lightning_rlhf.data.datamodules import ResumableSampler

    drawn = 0
    sampler = ResumableSampler(
        26, 4, shuffle=True, seed=7, position=lambda: drawn
    )  # 6 whole batches an epoch, 2 rows dropped
    reference = _stream(26, 4, epochs=3)
    trained = []
    # passes cut where a resumed Lightning might cut them: early, at an epoch boundary, or running to the end
    for limit in (2, 3, None, 1, None, None):
        for batch in _batches(iter(sampler), 4, limit):
            trained.append(batch)
            drawn += 1
    assert trained == reference  # 3 epochs: nothing lost, nothing twice, each epoch in its own seeded order
    assert (
        len(_batches(iter(ResumableSampler(26, 4, shuffle=True, seed=7, position=lambda: 6)), 4)) == 6
    )  # a boundary starts the next epoch whole


def test_sampler_shards_ranks_and_starts_part_way_without_a_position():
    from lightning_rlhf.data.datamodules import ResumableSampler

    for rank in (0, 1):
        sampler = ResumableSampler(24, 4, shuffle=True, seed=7, start_batch=2, num_replicas=2, rank=rank)
        assert (
            _batches(iter(sampler), 4) + _batches(iter(sampler), 4)
            == _stream(24, 4, epochs=2, rank=rank, num_replicas=2)[2:]
        )
    # the sampler's own shards (not the reference's): disjoint, and together the whole epoch
    shards = [list(ResumableSampler(24, 4, shuffle=True, seed=7, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 12
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(24))


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("prompts.txt", "copy 1 2 =\n", r"unsupported extension; use one of .*jsonl"),
        (
            "prompts.jsonl",
            '{"prompt": "a"}\n{"prompt": "b\n',
            r"Could not read dataset file '.*prompts.jsonl' \(.*\); it must be one JSON object per line",
        ),
    ],
)
def test_a_prompt_file_that_cannot_be_read_names_the_file_and_the_fix(name, text, message, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        PromptDataModule(str(path))


def test_a_fabric_script_s_ranks_get_disjoint_prompts(jsonl):
    def per_rank(data: PromptDataModule) -> list[list[str]]:
        return [
            [row["prompt"] for batch in data.dataloader(num_replicas=2, rank=rank) for row in batch] for rank in (0, 1)
        ]

    # in file order: rank r takes rows r, r + 2, ... of q0..q9; 5 each, of which 2 whole batches of 2
    in_order = per_rank(PromptDataModule(jsonl, prompt_column="question", batch_size=2, shuffle=False))
    assert in_order == [["q0", "q2", "q4", "q6"], ["q1", "q3", "q5", "q7"]]
    # shuffled: no rank sees a prompt twice, and together they are the epoch's order but its last two rows
    shuffled = per_rank(PromptDataModule(jsonl, prompt_column="question", batch_size=2, seed=7))
    assert all(len(set(prompts)) == len(prompts) == 4 for prompts in shuffled)
    assert not set(shuffled[0]) & set(shuffled[1])
    for rank in (0, 1):  # the reference above, rank by rank
        assert shuffled[rank] == [f"q{i}" for batch in _stream(10, 2, 1, rank, num_replicas=2) for i in batch]


def test_a_prompt_template_is_filled_from_the_row_and_a_conversation_gives_its_last_turn_as_reference(tmp_path):
    from lightning_rlhf.data.datamodules import adapt_prompt

    row = adapt_prompt({"prompt": "2 + 2?", "answer": "#### 4"}, "Problem:\n{question}\nSolution:", "question")
    assert row["prompt"] == "Problem:\n2 + 2?\nSolution:" and row["answer"] == "#### 4"
    with pytest.raises(ConfigError, match="names the column 'title'"):
        adapt_prompt({"prompt": "x"}, "{title}: {prompt}")
    turns = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    row = adapt_prompt({"prompt": turns})
    assert row["prompt"] == turns[:2] and row["reference"] == "a"
    assert adapt_prompt({"prompt": turns[:2]})["prompt"] == turns[:2]  # nothing to split off

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i} + {i}?", "messages": turns}) + "\n" for i in range(4)))
    batch = next(
        iter(PromptDataModule(str(path), "question", batch_size=2, prompt_template="Q: {question}").dataloader())
    )
    assert all(r["prompt"].startswith("Q: ") and r["prompt"].endswith("?") for r in batch)
    batch = next(iter(PromptDataModule(str(path), "messages", batch_size=2).dataloader()))
    assert all(r["prompt"] == turns[:2] and r["reference"] == "a" for r in batch)
    with pytest.raises(ConfigError, match="names the column 'title'"):
        PromptDataModule(str(path), "question", prompt_template="{title}")  # before any model is loaded
