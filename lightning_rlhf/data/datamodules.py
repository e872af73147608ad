"""Datasets of prompts, demonstrations and preference pairs, from the hub, local files or the built-in task.

A ``dataset`` is one of:

* ``"builtin:<name>"``, a dataset of the built-in task (:mod:`lightning_rlhf.tasks.copy`);
* a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a folder of them;
* a Hugging Face Hub dataset id (optionally ``"id:config"``).

Rows are yielded as plain dicts with canonical keys (``prompt``, and
``completion`` or ``chosen``/``rejected``) plus every other column, so rule
rewards can read e.g. GSM8k's ``answer``. The columns are checked when the
data module is built, before any model is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler

from lightning_rlhf.builtin import BUILTIN_PREFIX, builtin_path
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.tokens import prompt_token_ids

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@contextlib.contextmanager
def no_dataset_progress_bars() -> Iterator[None]:
    """datasets' progress bars ("Generating train split") off inside the block, as they were after
    (``datasets.disable_progress_bars``, ``datasets/utils/tqdm.py``)."""
    import datasets

    if datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def load_rows(dataset: str, split: str = "train"):
    """Load a dataset split as a ``datasets.Dataset``.

    Raises:
        ConfigError: If a local path does not exist or has an unsupported format.
    """
    import datasets

    if dataset.startswith(BUILTIN_PREFIX):
        with no_dataset_progress_bars():  # a few thousand rows, read in milliseconds
            return datasets.load_dataset("json", data_files=builtin_path(dataset), split="train")
    path = os.path.expanduser(dataset)
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _FILE_BUILDERS:
            raise ConfigError(
                f"Dataset file '{dataset}' has an unsupported extension; use one of {', '.join(_FILE_BUILDERS)}."
            )
        try:
            return datasets.load_dataset(_FILE_BUILDERS[ext], data_files=path, split="train")
        except (
            Exception
        ) as err:  # datasets wraps the parser's error in its own ("An error occurred while generating the dataset")
            cause = err.__cause__ or err.__context__ or err
            detail = " ".join(str(cause).split())[:200]
            shape = "one JSON object per line" if ext == ".jsonl" else f"a valid {ext[1:]} file"
            raise ConfigError(f"Could not read dataset file '{dataset}' ({detail}); it must be {shape}.") from err
    if os.path.isdir(path):
        return datasets.load_dataset(path, split=split)
    if dataset.startswith((".", "/", "~")) or dataset.endswith(tuple(_FILE_BUILDERS)):
        raise ConfigError(
            f"Dataset path '{dataset}' does not exist; "
            "pass an existing file or folder, a hub dataset id or 'builtin:prompts'."
        )
    name, _, config = dataset.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # datasets raises many types for unreachable ids
        raise ConfigError(
            f"Could not load dataset '{dataset}' (split '{split}'): {str(err).splitlines()[0]}; "
            "pass a local file or a reachable hub id."
        ) from err


def check_context_length(max_prompt_tokens: int | None, max_new_tokens: int, context: int | None, whose: str) -> None:
    """Refuse, before any process starts, prompts plus completions that may not fit the generator's ``context``.

    Raises:
        ConfigError: If ``max_prompt_tokens + max_new_tokens`` exceeds ``context`` (``None``s: nothing to check).
    """
    if max_prompt_tokens is None or context is None or max_prompt_tokens + max_new_tokens <= context:
        return
    raise ConfigError(
        f"max_prompt_tokens={max_prompt_tokens} plus max_new_tokens={max_new_tokens} exceeds {whose} "
        f"of {context} tokens; lower one of them so their sum is at most {context}."
    )


def _collate(rows: list[dict]) -> list[dict]:
    return rows


def adapt_prompt(row: dict, template: str | None = None, prompt_column: str = "prompt") -> dict:
    """A row whose ``prompt`` is ready to tokenize: the task's data adapter.

    * ``template`` (e.g. the paper's GSM8k ``"[MATH_TASK] Problem:\\n{question}\\n\\nSolution:"``)
      is filled from the row's columns; the prompt column is also there under its
      own name (``prompt_column``).
    * A conversation (a list of ``{"role", "content"}`` messages, like No Robots'
      ``messages``) that ends with the assistant's turn becomes the prompt without
      that turn, and the turn's text becomes ``reference`` (what a judge compares against).

    Raises:
        ConfigError: If the template names a column the row does not have.
    """
    row = dict(row)
    if template is not None:
        try:
            row["prompt"] = template.format(**{**row, prompt_column: row["prompt"]})
        except KeyError as err:
            raise ConfigError(
                f"prompt_template names the column {err} that the dataset does not have (columns: {', '.join(row)})."
            ) from None
    prompt = row["prompt"]
    if isinstance(prompt, list) and prompt and prompt[-1].get("role") == "assistant":
        row["prompt"], row["reference"] = prompt[:-1], prompt[-1]["content"]
    return row


def _adapt_batch(rows: list[dict], template: str | None, prompt_column: str) -> list[dict]:
    return [adapt_prompt(row, template, prompt_column) for row in rows]


def _is_conversation(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


class ResumableSampler(DistributedSampler):
    """One seeded stream of prompts, epoch after epoch (epoch ``e`` shuffled with ``seed + e``), sharded over ranks.

    Each ``iter()`` continues the stream at a batch position and yields up to
    the end of that position's epoch. The position is read from ``position``
    when it is given: the RL modules hand their data module their count of
    batches drawn (:meth:`PromptDataModule.follow`), which their checkpoints
    keep, so a resumed run goes on with the next prompt, none lost and none twice. Reading it at every
    ``iter()`` makes the stream independent of how Lightning counts epochs on
    resume (it may restore a finished epoch as unfinished, or an unfinished one
    as finished, and it drops a prefetched batch when an epoch or a run ends);
    an epoch of Lightning's may therefore be shorter than ``len()``. Without
    ``position`` the sampler starts at ``start_batch`` and then goes epoch by
    epoch itself. Lightning's ``set_epoch`` is ignored.

    Under DDP or DeepSpeed each rank takes every ``num_replicas``-th prompt of
    the epoch's order; being a ``DistributedSampler`` already, Lightning leaves
    it as it is instead of wrapping it.

    Args:
        size: Number of rows.
        batch_size: Rows per batch (per rank); an epoch's incomplete last batch is dropped.
        shuffle: Shuffle each epoch (seeded); otherwise row order.
        seed: Base seed of the shuffles.
        start_batch: Batches (per rank) already drawn, when ``position`` is not given.
        num_replicas: Number of ranks.
        rank: This rank.
        position: Returns the batches (per rank) already drawn, read at each ``iter()``.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        start_batch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        position: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.size = size
        self.batch_size = batch_size
        self.per_epoch = max(1, (size // num_replicas) // batch_size)  # batches per rank and epoch
        self.position = position
        self.next_batch = start_batch

    def __iter__(self):
        start = self.position() if self.position is not None else self.next_batch
        epoch, offset = divmod(start, self.per_epoch)
        self.epoch = epoch
        self.next_batch = (epoch + 1) * self.per_epoch
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.size))
        mine = order[: len(self) * self.num_replicas][self.rank :: self.num_replicas]
        return iter(mine[offset * self.batch_size : self.per_epoch * self.batch_size])

    def __len__(self) -> int:
        return self.size // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the epoch follows from the stream position (see the class docstring)."""


class _TextDataModule(L.LightningDataModule):
    """Shared loading, column checks and the (shuffled) dataloader; see the subclasses."""

    def __init__(
        self,
        dataset: str,
        columns: dict[str, str],
        split: str,
        batch_size: int,
        shuffle: bool,
        num_workers: int,
        seed: int,
        prompt_template: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
        self.dataset_name = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.seed = seed
        rows = load_rows(dataset, split)
        missing = [(key, column) for key, column in columns.items() if column not in rows.column_names]
        if missing:
            key, column = missing[0]
            raise ConfigError(
                f"Dataset '{dataset}' has no column '{column}' (columns: {', '.join(rows.column_names)}); "
                f"set `{key}_column` to the column that holds the {key}s."
            )
        renames = {column: key for key, column in columns.items() if column != key}
        self.rows = rows.rename_columns(renames) if renames else rows
        self.position: Callable[[], int] | None = None
        self.collate = _collate
        if prompt_template is not None or _is_conversation(self.rows[0]["prompt"] if len(self.rows) else None):
            adapt_prompt(
                self.rows[0], prompt_template, columns["prompt"]
            )  # a template naming a missing column fails now
            self.collate = functools.partial(_adapt_batch, template=prompt_template, prompt_column=columns["prompt"])

    def follow(self, position: Callable[[], int]) -> None:
        """Start every training ``iter()`` at ``position()`` batches into the stream (see :class:`ResumableSampler`)."""
        self.position = position

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return self.dataloader(world_size, rank, self.position)

    def dataloader(self, num_replicas: int = 1, rank: int = 0, position: Callable[[], int] | None = None) -> DataLoader:
        """The training loader of one of ``num_replicas`` ranks (its own shard of each epoch).

        Under a Trainer, :meth:`train_dataloader` passes the trainer's ranks; a Fabric
        script passes ``fabric.world_size`` and ``fabric.global_rank`` (Fabric leaves a
        sampler that is already distributed as it is, so a loader built for one rank
        would feed every rank the same prompts).
        """
        sampler = ResumableSampler(
            len(self.rows),
            self.batch_size,
            self.shuffle,
            self.seed,
            num_replicas=num_replicas,
            rank=rank,
            position=position,
        )
        return DataLoader(
            self.rows,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )


class PromptDataModule(_TextDataModule):
    """Prompts for RL (online DPO, RLOO, PPO).

    Each row is adapted by :func:`adapt_prompt`: the prompt template filled in,
    a conversation's final assistant turn split off as its reference.

    Args:
        dataset: ``builtin:prompts``, a local file/folder, or a hub id.
        prompt_column: Column that holds the prompt: text, or a conversation (a list of chat messages).
        split: Split to read from a hub dataset or folder.
        batch_size: Prompts per training step (each gets ``k`` completions).
        shuffle: Shuffle every epoch (seeded by ``seed``).
        num_workers: DataLoader worker processes.
        seed: Seed of the shuffling order.
        prompt_template: Format string filled from each row's columns, e.g.
            ``"[MATH_TASK] Problem:\\n{question}\\n\\nSolution:"``; ``None`` takes the prompt column as it is.
        max_prompt_tokens: Drop the prompts longer than this many tokens (the policy's tokenizer,
            chat template included) before training, and say how many (the paper's code filters
            TL;DR and chat prompts at 512). The RL modules hand over their tokenizer in ``setup``
            (:meth:`drop_long_prompts`) and refuse a ``max_prompt_tokens + max_new_tokens`` longer
            than the generator's context. ``None`` (default): keep every prompt.

    Raises:
        ConfigError: If the dataset cannot be found, lacks the prompt column, the template names a missing
            column, ``max_prompt_tokens`` is below 1, or every prompt is longer than ``max_prompt_tokens``.
    """

    def __init__(
        self,
        dataset: str = "builtin:prompts",
        prompt_column: str = "prompt",
        split: str = "train",
        batch_size: int = 16,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        prompt_template: str | None = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ConfigError(
                f"max_prompt_tokens must be at least 1 (or null to keep every prompt), got {max_prompt_tokens}."
            )
        super().__init__(
            dataset, {"prompt": prompt_column}, split, batch_size, shuffle, num_workers, seed, prompt_template
        )
        self.max_prompt_tokens = max_prompt_tokens
        self.dropped: int | None = None  # prompts dropped as too long, once drop_long_prompts has run

    def drop_long_prompts(self, tokenizer) -> None:
        """Drop the prompts longer than ``max_prompt_tokens`` tokens of ``tokenizer``, once, and say how many.

        Every rank drops the same rows (the filter is deterministic), so the shards and a
        resumed run's position stay as they were.

        Raises:
            ConfigError: If no prompt is short enough.
        """
        if self.max_prompt_tokens is None or self.dropped is not None:
            return
        prompts = [row["prompt"] for row in self.collate(list(self.rows))]
        keep = [i for i, ids in enumerate(prompt_token_ids(tokenizer, prompts)) if len(ids) <= self.max_prompt_tokens]
        self.dropped = len(prompts) - len(keep)
        if not keep:
            raise ConfigError(
                f"Every prompt of '{self.dataset_name}' is longer than max_prompt_tokens={self.max_prompt_tokens} "
                "tokens; raise max_prompt_tokens or use shorter prompts."
            )
        if self.dropped:
            self.rows = self.rows.select(keep)
            rank_zero_info(
                f"lightning-rlhf: dropped {self.dropped} of {len(prompts)} prompts "
                f"longer than max_prompt_tokens={self.max_prompt_tokens} tokens."
            )


class DemonstrationDataModule(_TextDataModule):
    """Prompt/completion pairs for supervised fine-tuning.

    Args:
        dataset: ``builtin:demonstrations``, a local file/folder, or a hub id.
        prompt_column: Column that holds the prompt text.
        completion_column: Column that holds the demonstrated completion.
        split: Split to read from a hub dataset or folder.
        batch_size: Pairs per step.
        shuffle: Shuffle every epoch.
        num_workers: DataLoader worker processes.
        seed: Seed of the shuffling order.
    """

    def __init__(
        self,
        dataset: str = "builtin:demonstrations",
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        split: str = "train",
        batch_size: int = 32,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset,
            {"prompt": prompt_column, "completion": completion_column},
            split,
            batch_size,
            shuffle,
            num_workers,
            seed,
        )


class PreferenceDataModule(_TextDataModule):
    """Preference pairs (prompt, chosen, rejected) for reward-model training.

    Args:
        dataset: ``builtin:preferences``, a local file/folder, or a hub id.
        prompt_column: Column that holds the prompt text.
        chosen_column: Column that holds the preferred completion.
        rejected_column: Column that holds the other completion.
        split: Split to read from a hub dataset or folder.
        batch_size: Pairs per step.
        shuffle: Shuffle every epoch.
        num_workers: DataLoader worker processes.
        seed: Seed of the shuffling order.
    """

    def __init__(
        self,
        dataset: str = "builtin:preferences",
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        split: str = "train",
        batch_size: int = 32,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset,
            {"prompt": prompt_column, "chosen": chosen_column, "rejected": rejected_column},
            split,
            batch_size,
            shuffle,
            num_workers,
            seed,
        )
