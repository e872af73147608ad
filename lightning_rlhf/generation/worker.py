"""The generator process itself: what runs inside it, from its entry point (:func:`generator_main`) to its backend.

The trainer starts it through :class:`~lightning_rlhf.generation.process.GeneratorProcess` with a
:class:`GeneratorSpec`. Inside, the process first leaves the terminal's Ctrl-C to the trainer
(:func:`_leave_ctrl_c_to_the_trainer`), makes sure it will not outlive the trainer, sees only
its own GPU(s) (:func:`isolate_cuda_device`), pins itself to its CPU cores, builds its backend (and
scorer), joins the weight-transfer group, and then handles requests strictly in order, so a weight
refresh sent before a generate request is always in place when that request is sampled.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Protocol

import psutil
import torch

from lightning_rlhf.generation.base import Generations
from lightning_rlhf.generation.weights import DEFAULT_BUCKET_BYTES, DEFAULT_TIMEOUT_S


class Scorer(Protocol):
    """What scores completions inside the generator process (``score_on_generator``).

    Built by the strategy (:class:`~lightning_rlhf.scoring.RewardScorer`), so that this layer
    never imports rewards; sent to the process unloaded and set up there.
    """

    def setup(self, device: torch.device) -> None:
        """Load what scoring needs onto ``device``; called once, in the generator process."""

    def __call__(self, rows: list[dict], generations: Generations, share: float | None = None) -> list[float | None]:
        """The raw score of each completion (n*k, prompt-major) of the first ``share`` of the prompts in ``rows``
        (``None``: the scorer's own share); ``None`` where left to the trainer."""


@dataclass
class GeneratorSpec:
    """Everything the generator process needs to build its backend (picklable).

    Args:
        backend: ``"transformers"`` or ``"vllm"``.
        model: Local directory or hub id of the policy (its weights are replaced at the first refresh).
        dtype: Weights dtype in the generator.
        seed: Base seed; request ``i`` is sampled with a seed derived from ``(seed, i)``.
        device: Torch device of the generator (``"cpu"``, ``"cuda:1"``, ...).
        cpu_cores: CPU cores to pin the generator to (``None``: no pinning).
        vllm_kwargs: Extra ``vllm.LLM`` arguments; they override every default of the backend.
        transport: How weights travel: ``"gloo"``, ``"nccl"`` or ``"cuda_ipc"``
            (see :mod:`~lightning_rlhf.generation.weights`).
        bucket_bytes: Size of the packed buckets weights travel in.
        timeout_s: The one limit on every wait for this generator (requests, the side group).
        shares_gpu: The trainer trains on the generator's GPU (sets vLLM's memory default).
        scorer: Scores every training request's completions in the generator process, on ``device``
            (``score_on_generator``); ``None`` leaves scoring to the trainer.
        slot: This generator's place among the node's generators (rank x ``num_generators`` + index);
            it gives a vLLM generator its own range of ports (:func:`own_vllm_port`).
        first_call: The backend's first request counts as this one for its sampling seed. A
            replacement generator continues where the run's requests got to, so the batches it is
            asked for again are not sampled with the run's first seeds.
        lora: A LoRA policy's adapter settings (:class:`~lightning_rlhf.lora.LoRA` as a dict) when refreshes
            send the adapter alone: the generator serves the base model with this adapter, which each refresh
            replaces. ``None``: refreshes send whole weights.
    """

    backend: str = "transformers"
    model: str = ""
    dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"
    cpu_cores: list[int] | None = None
    vllm_kwargs: dict = field(default_factory=dict)
    transport: str = "gloo"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    shares_gpu: bool = False
    scorer: Scorer | None = None
    slot: int = 0
    first_call: int = 0
    lora: dict | None = None

    @property
    def tensor_parallel_size(self) -> int:
        """GPUs of this generator: ``"cuda:1,2"`` is a tensor-parallel generator over GPUs 1 and 2."""
        return len(gpu_indices(self.device)) if self.device.startswith("cuda") else 1

    def build(self):
        from lightning_rlhf.models import load_tokenizer, stop_token_ids

        tokenizer = load_tokenizer(self.model)
        if self.backend == "transformers":
            from lightning_rlhf.generation.transformers_backend import TransformersBackend
            from lightning_rlhf.models import load_policy

            if self.tensor_parallel_size > 1:
                raise ValueError("The transformers backend runs on one device; tensor parallelism needs backend: vllm.")
            model = load_policy(self.model, self.dtype)
            if self.lora is not None:
                from lightning_rlhf.lora import LoRA, wrap

                model = wrap(model, LoRA(**self.lora))
            model = model.to(self.device).eval()
            return TransformersBackend(
                model, stop_token_ids(tokenizer, model), tokenizer.pad_token_id, share_weights=False, seed=self.seed
            )
        if self.backend == "vllm":
            from lightning_rlhf.generation.vllm_backend import VLLMBackend

            return VLLMBackend(
                self.model,
                stop_token_ids(tokenizer, self.model),
                dtype=self.dtype,
                seed=self.seed,
                tensor_parallel_size=self.tensor_parallel_size,
                shares_gpu=self.shares_gpu,
                lora=self.lora,
                **self.vllm_kwargs,
            )
        raise ValueError(f"Unknown generation backend {self.backend!r}; choose 'transformers' or 'vllm'.")


def _pin_to_cores(cores: list[int] | None) -> None:
    if cores:
        os.sched_setaffinity(0, set(cores))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores)) if len(cores) > 1 else str(cores[0])
        torch.set_num_threads(len(cores))


def gpu_indices(device: str) -> list[int]:
    """The GPUs named by a device string: ``"cuda"`` -> [0], ``"cuda:1"`` -> [1], ``"cuda:1,2"`` -> [1, 2]."""
    return [int(i) for i in (device.removeprefix("cuda").removeprefix(":") or "0").split(",")]


def isolate_cuda_device(device: str) -> str:
    """Make the generator's GPU(s) the only ones this process sees (call before CUDA starts); returns its device there.

    vLLM runs on the first visible GPU(s), so the generator's devices are chosen
    through ``CUDA_VISIBLE_DEVICES``: ``"cuda:1"`` shows it GPU 1, ``"cuda:1,2"``
    GPUs 1 and 2 for a tensor-parallel generator. The trainer's numbering (which
    may itself be a ``CUDA_VISIBLE_DEVICES`` subset) is mapped to physical GPUs.
    """
    if not device.startswith("cuda"):
        return device
    indices = gpu_indices(device)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and max(indices) >= len(visible):
        raise ValueError(
            f"Generator device {device} does not exist: CUDA_VISIBLE_DEVICES lists {len(visible)} GPU(s); "
            f"pick among cuda:0 to cuda:{len(visible) - 1}."
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if visible else str(i) for i in indices)
    return "cuda:0"


def _exit_with_trainer() -> None:
    """End this process, and the processes it started, once the trainer that started it is gone.

    A trainer that is killed outright (SIGKILL, the OOM killer, Lightning ending
    the other DDP ranks after Ctrl-C) cannot close its generator; without this
    the generator would wait for requests forever, and vLLM's engine with it.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # re-parented once the trainer is gone
            time.sleep(0.5)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        os._exit(1)

    threading.Thread(target=watch, name="lightning-rlhf-follow-trainer", daemon=True).start()


def _leave_ctrl_c_to_the_trainer() -> None:
    """Move this process (and what it will start) out of the terminal's process group.

    Ctrl-C in a terminal sends SIGINT to every process of its foreground group. The trainer
    handles it (Lightning's "graceful shutdown") and stops its generator in order; this process
    would instead die mid-request with a traceback, and vLLM's engine core and workers, which shut
    down on SIGINT by handlers of their own (``EngineCoreProc.run_engine_core`` in
    ``vllm/v1/engine/core.py``, ``WorkerProc.worker_main`` in ``vllm/v1/executor/multiproc_executor.py``),
    would fail the request they were serving with a page of errors. A session of its own
    (``setsid(2)``) takes the generator and its children out of that group;
    :func:`_exit_with_trainer` still ends them when the trainer goes.
    """
    with contextlib.suppress(PermissionError):  # already leads a group: started by something else than spawn
        os.setsid()


def host_clock() -> float:
    """Seconds on the host's monotonic clock, which every process on this machine shares (Linux ``CLOCK_MONOTONIC``).

    The trainer compares the generator's :attr:`Generations.finished_at` with the moment it asked
    for the batch (``score_on_generator: auto``); ``time.perf_counter`` promises no shared origin.
    """
    return time.clock_gettime(time.CLOCK_MONOTONIC)


VLLM_PORTS_PER_GENERATOR = 50  # vLLM takes a handful of ports from VLLM_PORT up, and reserves 10 more


def own_vllm_port(base: str | None, slot: int) -> str | None:
    """``VLLM_PORT`` for the ``slot``-th generator of a node: each its own range, or unset when the user set none.

    With ``VLLM_PORT`` set, vLLM scans upward from it for free ports (``_get_open_port`` in
    ``vllm/utils/network_utils.py``): generators started together on one node would find the same
    port and race for it. Unset, vLLM asks the operating system for a free port each time.
    """
    return None if not base else str(int(base) + VLLM_PORTS_PER_GENERATOR * slot)


def generator_main(spec: GeneratorSpec, requests, results, port: int, prefix: str) -> None:
    """Entry point of the generator process."""
    _leave_ctrl_c_to_the_trainer()
    _exit_with_trainer()
    if (vllm_port := own_vllm_port(os.environ.get("VLLM_PORT"), spec.slot)) is not None:
        os.environ["VLLM_PORT"] = vllm_port
    backend = None
    try:
        spec.device = isolate_cuda_device(spec.device)
        _pin_to_cores(spec.cpu_cores)
        backend = spec.build()
        backend.calls = spec.first_call  # both backends count their sampled requests in `calls`
        if spec.scorer is not None:
            spec.scorer.setup(torch.device(spec.device if spec.device.startswith("cuda") else "cpu"))
        gc.collect()
        # the models live as long as this process: keep the cyclic collector from walking them again and again
        gc.freeze()
        results.put(("ready", os.getpid()))
        backend.connect(port, prefix, spec.transport, 1 + spec.tensor_parallel_size, spec.timeout_s)
        while True:
            kind, *payload = requests.get()
            if kind == "generate":
                request_id, prompt_ids, sampling, rows, share = payload
                generations = backend.generate(prompt_ids, sampling)
                if rows is not None and spec.scorer is not None:  # a training request: score beside generation
                    start = time.perf_counter()
                    generations.scores = spec.scorer(rows, generations, share)
                    generations.scoring_seconds = time.perf_counter() - start
                generations.finished_at = host_clock()
                results.put(("generations", request_id, generations))
            elif kind == "weights":
                refit, version, probe = payload
                start = time.perf_counter()
                backend.receive_weights(refit, version)
                seconds = time.perf_counter() - start
                # the probe rides on the refresh: scored here, now, it waits behind nothing on the trainer's side
                logprobs = backend.sequence_logprobs(*probe) if probe is not None else None
                results.put(("weights", version, seconds, logprobs))
            elif kind == "logprobs":
                prompt_ids, completion_ids, temperature = payload
                results.put(("logprobs", backend.sequence_logprobs(prompt_ids, completion_ids, temperature)))
            elif kind == "stop":
                break
    except BaseException as exc:  # report, then exit non-zero; the trainer turns it into one error
        sys.stderr.write(traceback.format_exc())
        results.put(("error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:600]}"))
        raise SystemExit(1) from None
    finally:
        if backend is not None:
            backend.close()
        gc.unfreeze()  # frozen objects outlive interpreter shutdown: triton's nanobind types would be reported leaked
