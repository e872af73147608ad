"""What the Fabric recipes share: their arguments and their loop, everything but the algorithm.

The arguments are dataclasses taken by every recipe's ``setup`` as nested options
(``--train.steps 80``, ``--rollout.max_staleness 1``, ``--run.evaluate false``), as litgpt
shares ``TrainArgs``/``EvalArgs`` across its scripts (``litgpt/args.py``,
``litgpt/finetune/lora.py``); each field's docstring is its ``--help``. A recipe's own
hyper-parameters (``--beta``, ``--clip_eps``, ...) stay flat in its ``setup``.
(litgpt documents each field in a docstring below it; ours are Google-style ``Attributes:``,
which jsonargparse reads without ``set_docstring_parse_options(attribute_docstrings=True)``.)

Every recipe differs from its LightningModule in the same ways (each recipe lists its own besides):
    * AdamW, gradients always clipped to norm 1.0 (the modules take any optimizer and ``gradient_clip_val``).
    * The reference is a frozen copy of ``--run.policy`` and the reward a reward model (the modules also take
      another ``ref_policy`` and any ``RewardFunction``, e.g. a rule).
    * ``max_new_tokens`` defaults to 10, sized for the built-in task (the modules': 53).
    * ``micro_batch_size`` splits the whole generated batch (the modules': each of its ``num_mini_batches``).
    * Keeps no checkpoint, so it cannot resume.

The loop is :class:`RolloutLoop`: prompts in, scored rollouts out, one batch per update,
the generator refreshed after each; it also logs, evaluates before and after, and stops the
generator. A recipe writes what is left -- its models and optimizer, its loss and its
update -- and calls :meth:`Learner.optimizer_step` with its loss over micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_rlhf.callbacks.evaluation import evaluate_policy
from lightning_rlhf.data import PromptDataModule, load_rows
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import SamplingConfig
from lightning_rlhf.generation.pipeline import start_source
from lightning_rlhf.models import freeze, load_policy, load_tokenizer
from lightning_rlhf.rewards import RewardModelScore
from lightning_rlhf.rollout_batch import RolloutBatch, build_rollout_batch
from lightning_rlhf.scoring import score_rollouts
from lightning_rlhf.tasks.copy import CopyGoldReward
from lightning_rlhf.tokens import prompt_token_ids

MAX_GRAD_NORM = 1.0  # every recipe clips its gradients to this norm


@dataclass(frozen=True)
class TrainArgs:
    """How the policy is updated.

    Attributes:
        steps: Optimizer steps (the recipe's ``--help`` says how many it takes per generated batch).
        batch_size: Prompts per generated batch.
        micro_batch_size: Sequences per forward and backward, their gradients accumulated into the batch's
            update; ``None``: the whole batch at once.
        lr: AdamW learning rate.
    """

    steps: int = 80
    batch_size: int = 32
    micro_batch_size: int | None = None
    lr: float = 1e-4


@dataclass(frozen=True)
class RolloutArgs:
    """How the completions are generated and scored.

    Attributes:
        k: Completions per prompt.
        temperature: Sampling temperature, also applied to the training logits.
        max_new_tokens: Longest completion (sized for the built-in task; the LightningModules' default is 53).
        missing_eos_penalty: Score of a completion without eos (``None`` keeps the reward).
        max_staleness: ``None`` generates in this process with the current weights; ``N`` runs a generator
            process that samples up to ``N`` policy versions behind (1: the paper's async).
        backend: Generator process backend, ``transformers`` or ``vllm``.
        generator_device: Device of the generator process (e.g. ``cuda:1``); default: the policy's.
    """

    k: int = 4
    temperature: float = 0.7
    max_new_tokens: int = 10
    missing_eos_penalty: float | None = -1.0
    max_staleness: int | None = None
    backend: str = "transformers"
    generator_device: str | None = None

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(k=self.k, temperature=self.temperature, max_new_tokens=self.max_new_tokens)


@dataclass(frozen=True)
class RunArgs:
    """What is trained on what, where, and what is written.

    Attributes:
        policy: Hub id, local directory or ``builtin:sft``.
        reward_model: Reward model (hub id, local directory or ``builtin:reward_model``).
        dataset: Prompt dataset (hub id, local file or ``builtin:prompts``).
        prompt_column: Column with the prompt text.
        evaluate: Measure gold win rate and KL to the reference before and after (built-in task only).
        out_dir: The CSV metrics go to ``<out_dir>/<recipe>/version_<n>/metrics.csv``.
        log_prompts: Write each rank's trained prompts to ``<out_dir>/trained_prompts_rank<r>.jsonl``, a line
            per batch.
        accelerator: Fabric accelerator.
        devices: Fabric devices.
        seed: Random seed.
    """

    policy: str = "builtin:sft"
    reward_model: str = "builtin:reward_model"
    dataset: str = "builtin:prompts"
    prompt_column: str = "prompt"
    evaluate: bool = True
    out_dir: str = "runs/fabric"
    log_prompts: bool = False
    accelerator: str = "cpu"
    devices: int = 1
    seed: int = 0


def check_k(k: int, at_least: int, why: str) -> None:
    """Refuse fewer than ``at_least`` completions per prompt, saying ``why`` the recipe needs them."""
    if k < at_least:
        raise ConfigError(f"{why}, got k={k}; set --rollout.k {at_least} or more.")


def load_models(fabric: L.Fabric, run: RunArgs) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, PreTrainedModel]:
    """Seed, then load the tokenizer, the policy to train and its frozen copy, the reference (on the device)."""
    fabric.seed_everything(run.seed)
    tokenizer = load_tokenizer(run.policy)
    policy = load_policy(run.policy).train()
    ref_policy = freeze(load_policy(run.policy)).to(fabric.device)
    return tokenizer, policy, ref_policy


@dataclass
class Learner:
    """What a recipe's ``update`` works with besides the batch: the policy it trains and how.

    Attributes:
        fabric: The recipe's Fabric.
        policy: The policy being trained, set up by Fabric.
        ref_policy: Its frozen reference.
        optimizer: The optimizer, set up by Fabric.
        train: The training arguments (``micro_batch_size``).
        rollout: The rollout arguments (``k``, ``temperature``).
    """

    fabric: L.Fabric
    policy: torch.nn.Module
    ref_policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train: TrainArgs
    rollout: RolloutArgs

    def optimizer_step(
        self,
        chunks: Sequence[torch.Tensor],
        loss_of: Callable[[torch.Tensor], torch.Tensor],
        also_trained: Sequence[torch.nn.Module] = (),
    ) -> None:
        """One optimizer step over micro-batches: zero the gradients, backward ``loss_of(chunk)`` for each, clip, step.

        Fabric's form of ``GradientAccumulation.optimizer_step_over`` (``lightning_rlhf/modules/accumulation.py``):
        ``loss_of`` returns the chunk's loss times its share of the batch's count (tokens or sequences, whatever
        the loss averages over), so the gradients add up to the whole batch's. Only the last chunk's backward
        reduces gradients across ranks; the others run in ``fabric.no_backward_sync`` of the policy and of the
        modules ``also_trained`` (set up by Fabric, e.g. a critic), as Fabric's gradient accumulation does
        (``Fabric.no_backward_sync``, ``lightning/fabric/fabric.py``).
        """
        fabric, optimizer = self.fabric, self.optimizer
        optimizer.zero_grad()
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            with contextlib.ExitStack() as no_sync:
                for module in (self.policy, *also_trained):
                    no_sync.enter_context(fabric.no_backward_sync(module, enabled=not last))
                fabric.backward(loss_of(chunk))
        fabric.clip_gradients(self.policy, optimizer, max_norm=MAX_GRAD_NORM)  # all the optimizer's parameters
        optimizer.step()


@dataclass
class ScoredBatch:
    """One generated, scored batch: ``n`` prompts with ``k`` completions each, prompt-major, on the device."""

    rows: list[dict]  # the n prompts' dataset rows
    rollouts: RolloutBatch  # (n * k, ...)
    scores: torch.Tensor  # (n * k,) rewards, the missing-eos penalty applied
    staleness: int  # policy versions between sampling and this update (0: on-policy)


class RolloutLoop:
    """The loop every recipe shares, used as ``with RolloutLoop(...) as batches: for batch in batches: ...``.

    Iterating yields ``num_batches`` scored batches, then stops; each one is drawn after the previous one's
    update, the generator refreshed with the updated weights in between (``RolloutSource.after_update``). On
    entry it evaluates the policy (``--run.evaluate``) and starts the generator (``start_source``); on exit it
    stops the generator, evaluates again (unless the loop failed) and closes the logger. :meth:`log` writes a
    step's metrics.

    Args:
        fabric: The recipe's Fabric (launched).
        policy: The policy being trained, unwrapped (the generator reads its weights).
        ref_policy: The frozen reference, for the evaluation's KL.
        tokenizer: The policy's tokenizer.
        num_batches: Generated batches to yield.
        train: The recipe's training arguments (``batch_size``).
        rollout: How to generate and score.
        run: Models, data and outputs.
    """

    def __init__(
        self,
        fabric: L.Fabric,
        policy: PreTrainedModel,
        ref_policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        num_batches: int,
        train: TrainArgs,
        rollout: RolloutArgs,
        run: RunArgs,
    ) -> None:
        self.fabric, self.policy, self.ref_policy, self.tokenizer = fabric, policy, ref_policy, tokenizer
        self.num_batches, self.rollout, self.run = num_batches, rollout, run
        data = PromptDataModule(
            run.dataset, prompt_column=run.prompt_column, batch_size=train.batch_size, seed=run.seed
        )
        self.loader = fabric.setup_dataloaders(data.dataloader(fabric.world_size, fabric.global_rank))  # rank's own
        self.reward = RewardModelScore(run.reward_model)
        self.reward.setup(fabric.device)
        self.prompts_log = (
            Path(run.out_dir, f"trained_prompts_rank{fabric.global_rank}.jsonl") if run.log_prompts else None
        )
        if self.prompts_log is not None:
            self.prompts_log.parent.mkdir(parents=True, exist_ok=True)
            self.prompts_log.write_text("")  # this run's batches only
        self.gold_rows = [dict(r) for r in load_rows("builtin:eval_prompts")] if run.evaluate else []
        self.before: dict[str, float] = {}
        self.start, self.last_step, self.logged = time.perf_counter(), 0, 0

    def __enter__(self) -> RolloutLoop:
        if self.gold_rows:
            self.before = self._evaluate()
            self.fabric.print(f"before: {self.before}")
        rollout = self.rollout
        self.source = start_source(
            self.policy,
            self.tokenizer,
            self.run.policy,
            rollout.max_staleness,
            backend=rollout.backend,
            seed=self.run.seed,
            generator_device=rollout.generator_device,
        )
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.source.close()
        if exc_type is not None:
            return
        if self.gold_rows:
            after = self._evaluate()
            self.fabric.log_dict(after, step=self.last_step)
            self.fabric.print(f"after: {after}")
            self.fabric.print(
                f"gold win rate: {self.before['eval/gold_win_rate']:.3f} -> {after['eval/gold_win_rate']:.3f}; "
                f"KL to reference: {after['eval/kl']:.3f}"
            )
        self.fabric.logger.finalize("success")

    def __iter__(self) -> Iterator[ScoredBatch]:
        sampling, version = self.rollout.sampling, 0
        while True:
            for rows in self.loader:
                prompt_ids = prompt_token_ids(self.tokenizer, [r["prompt"] for r in rows])
                ready = self.source.next_rollouts(rows, prompt_ids, sampling, version)
                if ready is None:
                    continue  # asynchronous: the generator is filling the pipeline
                rows, generations = ready
                rollouts = build_rollout_batch(generations, self.tokenizer.pad_token_id).to(self.fabric.device)
                scores, _, _ = score_rollouts(
                    self.reward, self.tokenizer, generations, rows, self.rollout.missing_eos_penalty
                )
                yield ScoredBatch(rows, rollouts, scores.to(self.fabric.device), version - generations.policy_version)
                version += 1
                self.source.after_update(version)  # refreshes the generator (a no-op when generating in this process)
                if version == self.num_batches:
                    return

    def log(self, step: int, batch: ScoredBatch, metrics: dict[str, float | torch.Tensor]) -> None:
        """Log the update's ``metrics`` at optimizer step ``step``, with the batch's score and staleness."""
        metrics = {
            **{name: float(value) for name, value in metrics.items()},
            "objective/scores": batch.scores.mean().item(),
            "rollout/staleness": float(batch.staleness),
        }
        self.fabric.log_dict(metrics, step=step)
        self.last_step, self.logged = step, self.logged + 1
        if self.prompts_log is not None:
            with self.prompts_log.open("a") as f:
                f.write(json.dumps({"step": step, "prompts": [r["prompt"] for r in batch.rows]}) + "\n")
        if self.logged % 10 == 0 or self.logged == self.num_batches:
            self.fabric.print(
                f"step {step:4d}  loss {metrics['train/loss']:.4f}  score {metrics['objective/scores']:+.3f}  "
                f"kl {metrics['objective/kl']:.3f}  {time.perf_counter() - self.start:.1f}s"
            )

    def _evaluate(self) -> dict[str, float]:
        return evaluate_policy(
            self.policy,
            self.ref_policy,
            self.tokenizer,
            CopyGoldReward(),
            self.gold_rows,
            self.rollout.sampling,
            seed=1234,
        )
