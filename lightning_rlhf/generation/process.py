"""The generator process: a generation backend in its own (spawned) process, fed through queues.

Requests are handled strictly in order, so a weight refresh sent before a
generate request is always in place when that request is sampled. Tensors go
through the side process group (:mod:`lightning_rlhf.generation.weights`);
prompts, rollouts and acknowledgements through ``multiprocessing`` queues.

The trainer-side :class:`GeneratorProcess` watches the process while it waits:
if it dies, the wait ends within ``poll_s`` seconds with :class:`GeneratorError`
instead of hanging. :meth:`GeneratorProcess.close` ends the process and every
process it started (vLLM's engine core and workers), also after a crash.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import psutil
import torch

from lightning_rlhf.generation.base import Generations, SamplingConfig
from lightning_rlhf.generation.weights import host_store, join_group, send_tensors, tensor_meta

_PREFIXES = itertools.count()


class GeneratorError(RuntimeError):
    """The generator process failed or died."""


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
        vllm_kwargs: Extra ``vllm.LLM`` arguments.
        transport: Side-group transport for weights, ``"gloo"`` or ``"nccl"`` (see :mod:`~lightning_rlhf.generation.weights`).
    """

    backend: str = "transformers"
    model: str = ""
    dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"
    cpu_cores: list[int] | None = None
    vllm_kwargs: dict = field(default_factory=dict)
    transport: str = "gloo"

    def build(self):
        from lightning_rlhf.models import load_tokenizer

        tokenizer = load_tokenizer(self.model)
        if self.backend == "transformers":
            from lightning_rlhf.generation.transformers_backend import TransformersBackend
            from lightning_rlhf.models import load_policy

            model = load_policy(self.model, self.dtype).to(self.device).eval()
            return TransformersBackend(
                model, [tokenizer.eos_token_id], tokenizer.pad_token_id, share_weights=False, seed=self.seed
            )
        if self.backend == "vllm":
            from lightning_rlhf.generation.vllm_backend import VLLMBackend

            return VLLMBackend(
                self.model, [tokenizer.eos_token_id], dtype=self.dtype, seed=self.seed, **self.vllm_kwargs
            )
        raise ValueError(f"Unknown generation backend {self.backend!r}; choose 'transformers' or 'vllm'.")


def _pin(cores: list[int] | None) -> None:
    if cores:
        os.sched_setaffinity(0, set(cores))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores)) if len(cores) > 1 else str(cores[0])
        torch.set_num_threads(len(cores))


def isolate_cuda_device(device: str) -> str:
    """Make ``device`` the only GPU this process sees (call before CUDA starts); returns its name there.

    vLLM always runs on the first visible GPU, so the generator's device is
    chosen through ``CUDA_VISIBLE_DEVICES``; the trainer's numbering (which may
    itself be a ``CUDA_VISIBLE_DEVICES`` subset) is mapped to the physical GPU.
    """
    target = torch.device(device)
    if target.type != "cuda":
        return device
    index = target.index or 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and index >= len(visible):
        raise ValueError(
            f"Generator device {device} does not exist: CUDA_VISIBLE_DEVICES lists {len(visible)} GPU(s); pick cuda:0 to cuda:{len(visible) - 1}."
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    return "cuda:0"


def _follow_parent() -> None:
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


def generator_main(spec: GeneratorSpec, requests, results, port: int, prefix: str) -> None:
    """Entry point of the generator process."""
    _follow_parent()
    backend = None
    try:
        spec.device = isolate_cuda_device(spec.device)
        _pin(spec.cpu_cores)
        backend = spec.build()
        results.put(("ready", os.getpid()))
        backend.connect(port, prefix, spec.transport)
        while True:
            kind, *payload = requests.get()
            if kind == "generate":
                request_id, prompt_ids, sampling = payload
                results.put(("generations", request_id, backend.generate(prompt_ids, sampling)))
            elif kind == "weights":
                meta, version = payload
                start = time.perf_counter()
                backend.receive_weights(meta, version)
                results.put(("weights", version, time.perf_counter() - start))
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


class GeneratorProcess:
    """Trainer-side handle of one generator process.

    Args:
        spec: How to build the backend.
        start_timeout_s: Longest wait for the backend to load.
        request_timeout_s: Longest wait for one result while the process is alive.
        poll_s: How often a wait checks that the process is still alive.
    """

    def __init__(
        self, spec: GeneratorSpec, start_timeout_s: float = 900.0, request_timeout_s: float = 900.0, poll_s: float = 0.2
    ) -> None:
        self.spec = spec
        self.start_timeout_s, self.request_timeout_s, self.poll_s = start_timeout_s, request_timeout_s, poll_s
        self.process: mp.Process | None = None
        self.version: int | None = None  # last version sent
        self.last_refresh_seconds: float | None = None  # generator-side load time of the last acknowledged refresh
        self._transfer = None  # weights still being sent
        self._inbox: dict[tuple, object] = {}
        self._descendants: list[psutil.Process] = []

    def start(self) -> None:
        context = mp.get_context("spawn")
        self._store = host_store()
        prefix = f"lightning_rlhf/{os.getpid()}/{next(_PREFIXES)}"
        self.requests, self.results = context.Queue(), context.Queue()
        # not a daemon: vLLM's engine starts processes of its own
        self.process = context.Process(
            target=generator_main,
            args=(self.spec, self.requests, self.results, self._store.port, prefix),
            name="lightning-rlhf-generator",
            daemon=False,
        )
        self.process.start()
        self._wait(("ready",), self.start_timeout_s)
        # vLLM's engine core and workers, recorded while their parent lives: once it dies they are
        # re-parented, and close() could no longer find them among its children
        self._descendants = self._children()
        self.group = join_group(self._store.port, prefix, 0, store=self._store, transport=self.spec.transport)
        self.version = None

    def _children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def submit(self, request_id: int, prompt_ids: list[list[int]], sampling: SamplingConfig) -> None:
        self._check_alive()
        self.requests.put(("generate", request_id, prompt_ids, sampling))

    def result(self, request_id: int) -> Generations:
        return self._wait(("generations", request_id), self.request_timeout_s)

    def push_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int, snapshot: bool = True) -> float:
        """Send the policy's weights; returns the seconds the trainer was held up.

        Over gloo the weights are copied to host memory (``snapshot``) and sent in
        the background while training goes on; the generator takes them before
        any request made after this call (requests are handled in order). The
        previous transfer is finished first, so at most one copy is in flight.
        ``snapshot=False`` skips the copy, for a caller that will not change the
        weights before the generator answers its next request (a synchronous run).
        """
        self._check_alive()
        start = time.perf_counter()
        self.finish_transfer()
        self.requests.put(("weights", tensor_meta(named_tensors), version))
        try:
            self._transfer = send_tensors(
                self.group,
                (t for _, t in named_tensors),
                self.spec.transport,
                alive=self.alive,
                wait=False,
                snapshot=snapshot,
            )
        except RuntimeError as err:
            raise self._death_error(f"while sending weights ({err})") from err
        self.version = version
        return time.perf_counter() - start

    def finish_transfer(self) -> None:
        """Wait until the last weights sent have left (raises :class:`GeneratorError` if the generator died)."""
        transfer, self._transfer = self._transfer, None
        if transfer is not None:
            try:
                transfer.wait()
            except RuntimeError as err:
                raise self._death_error(f"while sending weights ({err})") from err

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
        """The generator's temperature-scaled logprobs of ``completion_ids`` after ``prompt_ids``."""
        self._check_alive()
        self.requests.put(("logprobs", prompt_ids, completion_ids, temperature))
        return self._wait(("logprobs",), self.request_timeout_s)

    def _check_alive(self) -> None:
        if not self.alive():
            raise self._death_error()

    def _death_error(self, when: str = "") -> GeneratorError:
        detail = self._drain_error()
        code = self.process.exitcode if self.process is not None else None
        return GeneratorError(
            f"The generator process (pid {self.pid}) died{' ' + when if when else ''} with exit code {code}; "
            f"training stopped. {detail}".strip()
        )

    def _drain_error(self) -> str:
        try:
            while True:
                item = self.results.get_nowait()
                if item[0] == "error":
                    return f"Its last error: {item[1]}"
        except (queue.Empty, OSError, ValueError):
            return ""

    def _wait(self, key: tuple, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while key not in self._inbox:
            try:
                item = self.results.get(timeout=self.poll_s)
            except queue.Empty:
                if not self.alive():
                    raise self._death_error() from None
                if time.monotonic() > deadline:
                    raise GeneratorError(
                        f"The generator process (pid {self.pid}) sent no {key[0]} for {timeout_s:.0f} s; it may be stuck."
                    ) from None
                continue
            if item[0] == "error":
                raise GeneratorError(f"The generator process (pid {self.pid}) failed: {item[1]}")
            if item[0] == "weights":
                self.last_refresh_seconds = item[2]
                continue
            if item[0] == "generations":
                self._inbox[("generations", item[1])] = item[2]
            else:
                self._inbox[(item[0],)] = item[1] if len(item) == 2 else item[1:]
        return self._inbox.pop(key)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the process and everything it started; idempotent, safe after a crash."""
        if self.process is None:
            return
        children = {c.pid: c for c in self._descendants + self._children()}.values()
        process, self.process = self.process, None
        self._transfer = None  # not waited for: its receiver is going away
        if process.is_alive():
            with contextlib.suppress(OSError, ValueError):  # the queue may be closed already
                self.requests.put(("stop",))
            process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join(5)
        for child in children:
            with contextlib.suppress(psutil.Error):  # gone already
                child.kill()  # psutil checks the process is the one recorded (not a reused pid)
        psutil.wait_procs(list(children), timeout=5)
        for q in (self.requests, self.results):
            q.cancel_join_thread()
            q.close()
