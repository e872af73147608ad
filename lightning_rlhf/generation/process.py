"""The trainer's side of a generator process: starting it, feeding it through queues, and stopping it.

The process runs :func:`~lightning_rlhf.generation.worker.generator_main` with a
:class:`~lightning_rlhf.generation.worker.GeneratorSpec`; it handles requests strictly in order, so a
weight refresh sent before a generate request is always in place when that request is sampled.
Tensors go through the side process group (:mod:`lightning_rlhf.generation.weights`); prompts,
rollouts and acknowledgements through ``multiprocessing`` queues.

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
import pickle
import queue
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from typing import NamedTuple, Protocol

import psutil
import torch
import torch.distributed as dist

from lightning_rlhf.generation.base import Generations, Probe, SamplingConfig
from lightning_rlhf.generation.weights import (
    RefreshManifest,
    Transfer,
    WeightStream,
    host_store,
    ipc_handles,
    join_group,
    join_watching,
    pack_device,
    pack_stream,
    send_buckets,
    send_now,
    staging_buffers,
    staging_device,
)
from lightning_rlhf.generation.worker import GeneratorSpec, generator_main

_PREFIXES = itertools.count()
# Transports whose buckets the trainer broadcasts from its own thread, once the generator has reached
# the refresh in its queue (see weights.send_now); gloo sends from a background thread at once.
SENT_WHEN_REACHED = frozenset({"nccl"})


@contextlib.contextmanager
def main_not_rerun_unless_needed(payload: object) -> Iterator[None]:
    """Processes spawned inside skip running the parent's ``__main__`` again, unless ``payload`` refers to it.

    ``spawn`` runs the parent's main module once more in the child (as ``__mp_main__``), so that what was
    pickled from it can be found: CPython's ``Lib/multiprocessing/spawn.py`` records ``__main__.__spec__``
    or ``__file__`` in ``get_preparation_data`` and the child runs it in ``prepare``; a main module with
    neither is left alone. The generator's target and spec live in this package, so that run only costs:
    the ``lightning-rlhf`` command and training scripts import Lightning again (about a second per generator
    start, ``docs/results.md``), and a script without an ``if __name__ == "__main__":`` guard would run its
    top level again in the generator. Only when ``payload`` pickles something defined in ``__main__``
    (a reward class written in the training script, say) does the child run it, as before.
    """
    if b"__main__" in pickle.dumps(payload):
        yield
        return
    main = sys.modules["__main__"]
    with _EDITING_MAIN:  # one start at a time
        hidden: dict[str, object] = {
            key: main.__dict__.pop(key) for key in ("__spec__", "__file__") if key in main.__dict__
        }
        main.__spec__ = None
        try:
            yield
        finally:
            del main.__spec__
            main.__dict__.update(hidden)


_EDITING_MAIN = threading.Lock()


class GeneratorError(RuntimeError):
    """The generator process failed or died."""


class GeneratorHandle(Protocol):
    """What a rollout source asks of its generator: one process (:class:`GeneratorProcess`) or several
    (:class:`~lightning_rlhf.generation.pool.GeneratorPool`), with the same signatures."""

    @property
    def version(self) -> int | None:
        """The last version sent (``None`` before the first refresh)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def last_refresh_seconds(self) -> float | None:
        """Generator-side load time of the last acknowledged refresh."""

    def start(self) -> None: ...

    def alive(self) -> bool: ...

    def submit(
        self,
        request_id: int,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        rows: list[dict] | None = None,
        score_share: float | None = None,
    ) -> None: ...

    def result(self, request_id: int) -> Generations: ...

    def push_weights(self, stream: WeightStream, version: int, probe: Probe | None = None) -> float: ...

    def probe_logprobs(self, version: int) -> list[float] | None: ...

    def finish_transfer(self) -> None: ...

    def wait_loaded(self) -> None: ...

    def sequence_logprobs(
        self, prompt_ids: list[int], completion_ids: list[int], temperature: float
    ) -> list[float]: ...

    def close(self) -> None: ...


class _Due(NamedTuple):
    """A refresh's buckets, held until the generator reaches it (after the result of request ``after``)."""

    after: int | None
    buffers: list[torch.Tensor]


class GeneratorProcess:
    """Trainer-side handle of one generator process.

    Args:
        spec: How to build the backend; ``spec.timeout_s`` bounds every wait for a result.
        start_timeout_s: Longest wait for the backend to load.
        poll_s: How often a wait checks that the process is still alive.
    """

    def __init__(self, spec: GeneratorSpec, start_timeout_s: float = 900.0, poll_s: float = 0.2) -> None:
        self.spec = spec
        self.start_timeout_s, self.request_timeout_s, self.poll_s = start_timeout_s, spec.timeout_s, poll_s
        self.process: BaseProcess | None = None
        self.version: int | None = None  # last version sent
        self.acknowledged: int | None = None  # last version the generator has loaded
        self.last_refresh_seconds: float | None = None  # generator-side load time of the last acknowledged refresh
        self.probe_answers: dict[int, list[float]] = {}  # version -> the generator's logprobs of the refresh's probe
        self._transfer: Transfer | None = None  # gloo: weights still being sent by a background thread
        self._due: _Due | None = None  # nccl / cuda_ipc: a refresh's buckets, until the generator has reached it
        self._staging: list[torch.Tensor] = []  # nccl: two reused bucket buffers on the trainer's GPU
        self._outstanding: list[int] = []  # requests submitted whose results are not read yet, in order
        self._inbox: dict[tuple, object] = {}
        self._last_error = ""  # the generator's last reported error, for the death message
        self._descendants: list[psutil.Process] = []
        self._store: dist.TCPStore | None = None  # hosts the side group's rendezvous
        self.group: dist.ProcessGroup | None = None  # the side group weights travel over (None for cuda_ipc)

    def start(self) -> None:
        context = mp.get_context("spawn")
        self._store = store = host_store(self.spec.timeout_s)
        prefix = f"lightning_rlhf/{os.getpid()}/{next(_PREFIXES)}"
        self.requests, self.results = context.Queue(), context.Queue()
        # not a daemon: vLLM's engine starts processes of its own
        self.process = process = context.Process(
            target=generator_main,
            args=(self.spec, self.requests, self.results, store.port, prefix),
            name="lightning-rlhf-generator",
            daemon=False,
        )
        with main_not_rerun_unless_needed(self.spec):
            process.start()
        self._wait(("ready",), self.start_timeout_s)
        # vLLM's engine core and workers, recorded while their parent lives: once it dies they are
        # re-parented, and close() could no longer find them among its children
        self._descendants = self._children()
        world_size = 1 + self.spec.tensor_parallel_size
        # the trainer's GPU, read in this thread: the joining thread would start on cuda:0
        device = staging_device("nccl") if self.spec.transport == "nccl" else None
        try:
            self.group = join_watching(
                lambda: join_group(
                    store.port,
                    prefix,
                    0,
                    world_size,
                    store,
                    self.spec.timeout_s,
                    self.spec.transport,
                    device,
                ),
                self.alive,
                self.poll_s,
                self.spec.timeout_s,
            )

        except RuntimeError as err:
            raise self._death_error(f"before joining the weight-transfer group ({err})") from err
        self.version = self.acknowledged = None

    def _children(self) -> list[psutil.Process]:
        if self.process is None:
            return []
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def submit(
        self,
        request_id: int,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        rows: list[dict] | None = None,
        score_share: float | None = None,
    ) -> None:
        """Ask for completions of ``prompt_ids``; with ``rows`` (the prompts' dataset rows) they are also scored,
        when the spec has a scorer.

        ``score_share``: the share of the prompts to score here (``None``: the scorer's own).
        """
        self._check_alive()
        rows = rows if self.spec.scorer is not None else None  # rows travel only to be scored
        self.requests.put(("generate", request_id, prompt_ids, sampling, rows, score_share))
        self._outstanding.append(request_id)

    def result(self, request_id: int) -> Generations:
        return self._wait(("generations", request_id), self.request_timeout_s)

    def push_weights(self, stream: WeightStream, version: int, probe: Probe | None = None) -> float:
        """Send the policy's weights as ``version``; returns the seconds the trainer was held up.

        ``probe``: a sequence the generator scores right after loading them; its
        logprobs come back with the acknowledgement (:meth:`probe_logprobs`).
        """
        start = time.perf_counter()
        self._check_alive()
        buffers = pack_stream(stream, self.spec.bucket_bytes, pack_device(self.spec.transport))
        self.push_packed(RefreshManifest(stream.meta, self.spec.bucket_bytes), buffers, version, probe)
        return time.perf_counter() - start

    def push_packed(
        self, refit: RefreshManifest, buffers: list[torch.Tensor], version: int, probe: Probe | None = None
    ) -> None:
        """Send weights already packed into ``refit``'s buckets (several generators share one packing).

        The generator takes them before any request made after this call
        (requests are handled in order), even if it is busy with a long request
        now, and the trainer goes on meanwhile:

        * gloo: a background thread sends the host buckets as the generator takes them;
        * nccl: the buckets wait in host memory until the generator has reached the
          refresh (the result of the request before it is read), then the trainer
          broadcasts them from its own thread through two reused GPU buffers;
        * cuda_ipc: the buckets, packed on the GPU, are freed as soon as the generator
          has loaded them; the trainer waits for that when it reads the result of the
          request before the refresh, so they never live through a training step that
          follows it (with one request in flight).

        The previous refresh is finished first, so at most one is in flight.
        """
        self._check_alive()
        self.finish_transfer()
        after = self._outstanding[-1] if self._outstanding else None  # the generator reaches the refresh after it
        try:
            if self.spec.transport == "cuda_ipc":
                refit = RefreshManifest(refit.meta, refit.bucket_bytes, ipc_handles(buffers))
            self.requests.put(("weights", refit, version, probe))
            self.version = version
            if self.spec.transport in SENT_WHEN_REACHED or self.spec.transport == "cuda_ipc":
                self._due = _Due(after, buffers)
                if after is None:
                    self._reached()
            else:
                self._transfer = send_buckets(self.group, buffers, alive=self.alive)
        except RuntimeError as err:
            raise self._death_error(f"while sending weights ({err})") from err

    def _reached(self) -> None:
        """The generator has taken (or is about to take) the due refresh: send its buckets, or free them once loaded."""
        due, self._due = self._due, None
        if due is None:
            return
        if self.spec.transport in SENT_WHEN_REACHED:
            device = staging_device(self.spec.transport)
            largest = max((b.numel() for b in due.buffers), default=0)
            if device.type == "cuda" and (not self._staging or self._staging[0].numel() < largest):
                self._staging = staging_buffers(largest, device)
            try:
                send_now(
                    self.group,
                    due.buffers,
                    self.spec.transport,
                    self.alive,
                    self.spec.timeout_s,
                    staging=self._staging or None,
                )
            except RuntimeError as err:
                raise self._death_error(f"while sending weights ({err})") from err
        else:  # cuda_ipc: the generator reads the trainer's buckets until it acknowledges them
            self.wait_loaded()
            del due
            torch.cuda.ipc_collect()  # release the memory the generator's handles pinned

    def finish_transfer(self) -> None:
        """Wait until the last weights sent have left (raises :class:`GeneratorError` if the generator died)."""
        transfer, self._transfer = self._transfer, None
        if transfer is not None:
            try:
                transfer.wait()
            except RuntimeError as err:
                raise self._death_error(f"while sending weights ({err})") from err
        deadline = time.monotonic() + self.request_timeout_s
        while self._due is not None:  # the generator is still busy with the request before the refresh
            self._read_one(deadline, "result before a refresh")

    def wait_loaded(self) -> None:
        """Block until the generator has loaded the last weights sent (its acknowledgement)."""
        self.finish_transfer()
        deadline = time.monotonic() + self.request_timeout_s
        while self.version is not None and self.acknowledged != self.version:
            self._read_one(deadline, "acknowledgement")

    def probe_logprobs(self, version: int) -> list[float] | None:
        """The generator's logprobs of the probe sent with ``version``'s refresh, once its acknowledgement is in;
        never waits."""
        self._read_ready()
        return self.probe_answers.pop(version, None)

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
        """The generator's temperature-scaled logprobs of ``completion_ids`` after ``prompt_ids``.

        Queued like any request: it waits for the requests before it. To check
        a refresh without waiting, pass a probe to :meth:`push_weights`.
        """
        self._check_alive()
        self.requests.put(("logprobs", prompt_ids, completion_ids, temperature))
        return self._wait(("logprobs",), self.request_timeout_s)

    def _check_alive(self) -> None:
        if not self.alive():
            raise self._death_error()

    def _death_error(self, when: str = "") -> GeneratorError:
        detail = self._drain_error() or (f"Its last error: {self._last_error}" if self._last_error else "")
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
            self._read_one(deadline, key[0])
        return self._inbox.pop(key)

    def _read_one(self, deadline: float, waiting_for: str) -> None:
        """Take one message from the generator (at most ``poll_s``), checking that it lives and the deadline."""
        try:
            item = self.results.get(timeout=self.poll_s)
        except queue.Empty:
            if not self.alive():
                raise self._death_error() from None
            if time.monotonic() > deadline:
                raise GeneratorError(
                    f"The generator process (pid {self.pid}) sent no {waiting_for} for {self.request_timeout_s:.0f} s; "
                    "it may be stuck."
                ) from None
            return
        self._take(item)

    def _read_ready(self) -> None:
        """Take every message already there, without waiting."""
        while True:
            try:
                item = self.results.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            self._take(item)

    def _take(self, item: tuple) -> None:
        if item[0] == "error":
            self._last_error = item[1]
            raise GeneratorError(f"The generator process (pid {self.pid}) failed: {item[1]}")
        if item[0] == "weights":
            version, self.last_refresh_seconds, logprobs = item[1:]
            self.acknowledged = version
            if logprobs is not None:
                self.probe_answers[version] = logprobs
                for old in sorted(self.probe_answers)[:-4]:  # answers nobody asked for do not pile up
                    del self.probe_answers[old]
        elif item[0] == "generations":
            self._inbox[("generations", item[1])] = item[2]
            if item[1] in self._outstanding:
                self._outstanding.remove(item[1])
            if self._due is not None and self._due.after == item[1]:
                self._reached()  # the generator's next request is the refresh
        else:
            self._inbox[(item[0],)] = item[1] if len(item) == 2 else item[1:]

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the process and everything it started; idempotent, safe after a crash."""
        if self.process is None:
            return
        children = {c.pid: c for c in self._descendants + self._children()}.values()
        process, self.process = self.process, None
        self._transfer = self._due = None  # not waited for: the receiver is going away
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
        # the side group and its store go now, while the interpreter lives: a gloo group's worker threads
        # destroyed during interpreter shutdown can abort the process (pytorch/pytorch#190489)
        self.group = self._store = None
