"""Weight transfer from the trainer to a generator, streamed in packed buckets.

The trainer describes the weights once per refresh (names, shapes, dtypes:
the :class:`RefreshManifest` that travels through the request queue), then packs them
into buckets of about ``bucket_bytes`` each (one flat ``uint8`` buffer per
bucket, every tensor cast to the generator's dtype as it is copied in) and
sends bucket after bucket. The receiver takes one bucket at a time, loads it
and lets it go, so a refresh never holds a second copy of the model; the idea
follows vLLM's own packed transfer (``vllm/distributed/weight_transfer/packed_tensor.py``).

Transports (``weight_transport``):

* ``"gloo"`` (default): a side process group through host memory that neither
  Lightning nor vLLM owns; any devices, the path this project's tests run;
* ``"nccl"``: GPU to GPU, for a generator on GPU(s) of its own (NCCL does not
  join two processes on one device). Sent from the trainer's own thread, and
  only once the generator has reached the refresh (see :func:`send_now`);
* ``"cuda_ipc"``: a generator on the trainer's own GPU: each bucket is packed
  on that GPU and shared by handle (``torch.multiprocessing.reductions.reduce_tensor``,
  as vLLM's ``examples/offline_inference/rlhf_colocate.py`` and
  ``vllm/distributed/weight_transfer/ipc_engine.py`` do), so nothing is copied
  through the host.

The side group has ``1 + tensor_parallel_size`` members: the trainer is rank 0
and the generator's tensor-parallel workers are ranks ``1 + tp_rank``; every
bucket is broadcast to all of them and each loads its own shard.
"""

from __future__ import annotations

import datetime
import math
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_rlhf.dtypes import torch_dtype
from lightning_rlhf.lora import adapter_state, is_lora, merged_state

TensorMeta = tuple[str, tuple[int, ...], str]

TRANSPORTS = ("gloo", "nccl", "cuda_ipc")
DEFAULT_BUCKET_BYTES = 256 * 2**20
# One limit for everything that waits on the generator: a request's result, the side group's
# collectives and its set-up. A refresh waits behind at most one request, so a shorter group
# timeout would read a long generation as a dead generator.
DEFAULT_TIMEOUT_S = 1800.0
# NCCL's own watchdog ends the process when a collective outlives the group's timeout. Our waits
# give up (and abort the group) at DEFAULT_TIMEOUT_S, so the group's limit is set this much later:
# a stuck generator ends in our GeneratorError, not in the watchdog's abort.
NCCL_WATCHDOG_MARGIN_S = 120.0
_ALIGN = 64  # byte offset of every tensor in a bucket, so each slice can be viewed as its dtype


def host_store(timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """A store for the side group on 127.0.0.1 (port 0: the OS picks a free one)."""
    return dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


def join_group(
    port: int,
    prefix: str,
    rank: int,
    world_size: int = 2,
    store: dist.TCPStore | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    transport: str = "gloo",
    device: torch.device | None = None,
) -> dist.ProcessGroup | None:
    """Join the side group ``prefix`` as ``rank`` of ``world_size`` (``None`` for ``cuda_ipc``, which needs none).

    Blocks until every member has joined: gloo at its rendezvous; NCCL, which
    sets its communicator up at the first collective, at a one-element
    broadcast made here by every member, on ``device`` (default: this
    thread's current GPU).
    """
    if transport == "cuda_ipc":
        return None
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    store = dist.PrefixStore(prefix, store)
    if transport == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if transport == "nccl":
        device = device or torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # for this thread: the one joining may not be the one that asked
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout + datetime.timedelta(seconds=NCCL_WATCHDOG_MARGIN_S)  # ours fire first
        group = dist.ProcessGroupNCCL(store, rank, world_size, options)
        group.broadcast(torch.zeros(1, device=device), 0).wait()  # every member meets here, so set-up is watched
        return group
    raise ValueError(f"Unknown weight transport {transport!r}; choose one of {', '.join(TRANSPORTS)}.")


def join_watching(
    join: Callable[[], dist.ProcessGroup | None],
    alive: Callable[[], bool],
    poll_s: float = 0.1,
    timeout_s: float = DEFAULT_TIMEOUT_S,
):
    """Run ``join()`` (which blocks until the other members arrive) while checking that they are ``alive()``.

    A generator that dies before joining would otherwise leave the trainer
    inside the group's set-up (gloo's rendezvous, NCCL's first collective)
    until the timeout. Raises ``RuntimeError`` as soon as ``alive()`` is false,
    or after ``timeout_s`` (before NCCL's watchdog would end the process).
    """
    result: dict = {}

    def run() -> None:
        try:
            result["group"] = join()
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err

    thread = threading.Thread(target=run, name="lightning-rlhf-join-side-group", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive():
        thread.join(poll_s)
        if thread.is_alive() and not alive():
            raise RuntimeError("the generator died before it joined the weight-transfer group")
        if thread.is_alive() and time.monotonic() > deadline:
            raise RuntimeError(f"the generator did not join the weight-transfer group within {timeout_s:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["group"]


def staging_device(transport: str) -> torch.device:
    """Where buckets must be to travel: host memory for gloo, this process's current GPU otherwise."""
    return torch.device("cpu") if transport == "gloo" else torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class Bucket:
    """Consecutive tensors packed into one ``uint8`` buffer: ``(meta, byte offset)`` each, and the buffer's size."""

    entries: tuple[tuple[TensorMeta, int], ...]
    nbytes: int


def _nbytes(meta: TensorMeta) -> int:
    _, shape, dtype = meta
    return math.prod(shape) * torch.empty((), dtype=torch_dtype(dtype)).element_size()


def plan_buckets(meta: list[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Cut ``meta`` into consecutive buckets of at most ``bucket_bytes`` (a larger tensor gets a bucket of its own)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}.")
    buckets: list[Bucket] = []
    entries: list[tuple[TensorMeta, int]] = []
    size = 0
    for item in meta:
        offset = -(-size // _ALIGN) * _ALIGN
        if entries and offset + _nbytes(item) > bucket_bytes:
            buckets.append(Bucket(tuple(entries), size))
            entries, offset = [], 0
        entries.append((item, offset))
        size = offset + _nbytes(item)
    if entries:
        buckets.append(Bucket(tuple(entries), size))
    return buckets


def pack(bucket: Bucket, tensors: Iterator[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Copy the bucket's next tensors from ``tensors`` into one new buffer, each cast to its planned dtype."""
    buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
    for view, tensor in zip(_views(bucket, buffer), tensors, strict=False):
        view[1].copy_(tensor.detach())  # copy_ casts (float32 master weights -> bfloat16) on the way
    return buffer


def unpack(bucket: Bucket, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The bucket's tensors as views of ``buffer`` (valid while ``buffer`` is)."""
    return _views(bucket, buffer)


def _views(bucket: Bucket, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    views = []
    for (name, shape, dtype), offset in bucket.entries:
        n = _nbytes((name, shape, dtype))
        views.append((name, buffer[offset : offset + n].view(torch_dtype(dtype)).view(shape)))
    return views


@dataclass
class WeightStream:
    """The trainer side of one refresh: the tensors' description up front, the tensors themselves lazily, in order.

    ``tensors`` may gather as it goes (ZeRO-3 gathers one parameter at a time),
    so it is read exactly once, by whoever sends, and by every rank that takes
    part in the gathers.
    """

    meta: list[TensorMeta]
    tensors: Iterable[torch.Tensor]

    def drain(self) -> None:
        """Read the tensors without sending them (a rank that only takes part in the gathers)."""
        for _ in self.tensors:
            pass


@dataclass
class RefreshManifest:
    """What a generator is told of one refresh, through the request queue: the tensors it will receive
    (name, shape, dtype each, in order), how they are cut into buckets, and where to find them.

    Plain data only (vLLM's RPC carries lists, ints and bytes, not objects):
    ``handles`` are the buckets' pickled CUDA IPC handles (``cuda_ipc`` only).
    """

    meta: list[TensorMeta]
    bucket_bytes: int
    handles: list[bytes] | None = None

    def __post_init__(self) -> None:
        self.meta = [(name, tuple(shape), dtype) for name, shape, dtype in self.meta]  # lists after an RPC

    def buckets(self) -> list[Bucket]:
        return plan_buckets(self.meta, self.bucket_bytes)


def policy_state(
    model: torch.nn.Module, tied_head: bool = False, lora_refresh: str = "adapter"
) -> list[tuple[str, torch.Tensor]]:
    """The policy's tensors a generator needs: every parameter, and the tied ``lm_head.weight`` when ``tied_head``.

    Hugging Face omits a tied ``lm_head.weight`` from ``named_parameters``.
    vLLM's Llama loaders on GPU skip it (the head shares the embedding), but
    vLLM on CPU keeps a prepacked copy of the output layer that must be sent
    explicitly (see :class:`~lightning_rlhf.generation.vllm_backend.WeightReceiver`).

    A LoRA policy sends its adapter alone (``lora_refresh="adapter"``, PEFT's saved names), or its weights
    merged under the base model's names (``"merged"``, for a generator that cannot take an adapter).
    """
    if is_lora(model):
        return adapter_state(model) if lora_refresh == "adapter" else merged_state(model, tied_head)
    state = [(name, p) for name, p in model.named_parameters()]
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied_head and tied and not any(n == "lm_head.weight" for n, _ in state):
        state.append(("lm_head.weight", model.get_output_embeddings().weight))
    return state


def stream_of(
    named_params: list[tuple[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
    gather: Callable[[torch.Tensor], AbstractContextManager[object]] | None = None,
) -> WeightStream:
    """A :class:`WeightStream` of ``named_params``, floating tensors announced as ``dtype`` (default: their own).

    ``gather(param)`` is a context manager that makes one sharded parameter whole
    while it is copied (ZeRO-3); its shape is then read from ``param.ds_shape``.
    Gathering one parameter at a time keeps the peak at one whole parameter,
    not a whole second model.
    """

    def target(p: torch.Tensor) -> str:
        out = dtype if dtype is not None and p.dtype.is_floating_point else p.dtype
        return str(out).removeprefix("torch.")

    meta = [(name, tuple(getattr(p, "ds_shape", p.shape)), target(p)) for name, p in named_params]

    def tensors() -> Iterator[torch.Tensor]:
        for _, p in named_params:
            if gather is None:
                yield p.detach()
            else:
                with gather(p):
                    yield p.detach()  # copied into its bucket before the next parameter is gathered

    return WeightStream(meta, tensors())


class Transfer:
    """Packed buckets being sent over gloo by a background thread, one at a time, while the trainer goes on.

    Each bucket is dropped once sent, so the host copy shrinks as the
    generator takes it. Gloo only: an NCCL broadcast is never left pending in
    another thread (see :func:`send_now`).
    """

    def __init__(
        self, group: dist.ProcessGroup, buffers: list[torch.Tensor], alive: Callable[[], bool] | None, poll_s: float
    ) -> None:
        self.group, self.buffers = group, list(buffers)  # a list of its own: generators of a pool share buckets
        self.alive, self.poll_s = alive, poll_s
        self.error: BaseException | None = None
        self._abandoned = threading.Event()
        self._thread = threading.Thread(target=self._send, name="lightning-rlhf-send-weights", daemon=True)
        self._thread.start()

    def _send(self) -> None:
        try:
            for i, bucket in enumerate(self.buffers):
                work = self.group.broadcast(bucket, 0)
                while not work.is_completed():
                    if self._abandoned.is_set():
                        return
                    time.sleep(self.poll_s)
                work.wait()  # raises the transport's own error, if it had one
                self.buffers[i] = bucket = None
        except BaseException as err:  # handed to wait(), in the trainer's thread
            self.error = err

    def wait(self) -> None:
        """Block until every bucket is sent; a receiver that died raises ``RuntimeError`` instead of a hang."""
        while self._thread.is_alive():
            if self.alive is not None and not self.alive():
                self._abandoned.set()
                raise RuntimeError("the receiving process died during the weight transfer")
            self._thread.join(self.poll_s)
        self.buffers = []
        if self.error is not None:
            raise RuntimeError(f"the weight transfer failed: {self.error}") from self.error


def pack_stream(stream: WeightStream, bucket_bytes: int, device: torch.device) -> list[torch.Tensor]:
    """Read ``stream`` once into packed buckets on ``device`` (copies, each tensor cast to its announced dtype).

    The buckets are copies, so the caller may change its tensors at once (the
    trainer's next step overlaps the refresh). The stream is read to its end
    even if packing fails, so ranks gathering alongside (ZeRO-3) are not left waiting.
    """
    tensors = iter(stream.tensors)
    try:
        return [pack(bucket, tensors, device) for bucket in plan_buckets(stream.meta, bucket_bytes)]
    finally:
        for _ in tensors:
            pass


def send_buckets(
    group: dist.ProcessGroup,
    buffers: list[torch.Tensor],
    alive: Callable[[], bool] | None = None,
    wait: bool = False,
    poll_s: float = 0.005,
) -> Transfer:
    """Broadcast packed buckets from rank 0 over gloo in the background; returns the transfer (finished when ``wait``).

    Not waiting is what keeps a refresh from waiting behind a generator busy
    with a long request: it takes the buckets when it gets to them.
    """
    transfer = Transfer(group, buffers, alive, poll_s)
    if wait:
        transfer.wait()
    return transfer


def send_now(
    group: dist.ProcessGroup,
    buffers: list[torch.Tensor],
    transport: str,
    alive: Callable[[], bool] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_s: float = 0.005,
    staging: list[torch.Tensor] | None = None,
) -> None:
    """Broadcast packed buckets from rank 0 in the calling thread, while the receiver is known to be waiting.

    NCCL (defect b of the GPU review): NCCL's documentation says operations on
    several communicators of one device must not be issued concurrently from
    several threads ("Using multiple NCCL communicators concurrently": any
    device synchronization waits for a pending NCCL kernel, which blocks until
    its peers arrive). So the trainer broadcasts from its own thread, and only
    when the generator has taken the refresh; it never leaves a broadcast pending
    beside its DDP/ZeRO collectives. ``staging``: two reused buffers on the GPU
    (vLLM's NCCL producer double-buffers the same way,
    ``vllm/distributed/weight_transfer/packed_tensor.py``): bucket ``i + 1`` is
    copied in while bucket ``i`` travels, so the GPU holds two buckets of a
    refresh, never the whole model. ``None``: send ``buffers`` where they are.

    Each broadcast is watched: a receiver that dies, or one that sends nothing
    for ``timeout_s``, raises ``RuntimeError`` here (an NCCL group is aborted
    first), before NCCL's own watchdog would end the process.
    """
    deadline = time.monotonic() + timeout_s
    pending = None
    for i, bucket in enumerate(buffers):
        if staging is not None:
            staged = staging[i % len(staging)][: bucket.numel()]
            staged.copy_(bucket)  # the buffer's last broadcast (two buckets ago) was watched to its end
            bucket = staged
        if pending is not None:
            _watch(pending, group, transport, alive, deadline, poll_s)
        pending = group.broadcast(bucket, 0)
    if pending is not None:
        _watch(pending, group, transport, alive, deadline, poll_s)


def _watch(work, group, transport: str, alive: Callable[[], bool] | None, deadline: float, poll_s: float) -> None:
    while not work.is_completed():
        dead = alive is not None and not alive()
        if dead or time.monotonic() > deadline:
            if transport == "nccl":
                group.abort()  # or the pending broadcast holds this GPU's NCCL stream for good
            raise RuntimeError(
                "the receiving process died during the weight transfer"
                if dead
                else "the receiving process took no weights for the whole timeout"
            )
        time.sleep(poll_s)
    work.wait()  # raises the transport's own error; on NCCL the current stream now waits for the broadcast


def staging_buffers(bucket_bytes: int, device: torch.device, count: int = 2) -> list[torch.Tensor]:
    """``count`` reused buffers of one bucket each on ``device`` for :func:`send_now`."""
    return [torch.empty(bucket_bytes, dtype=torch.uint8, device=device) for _ in range(count)]


def pack_device(transport: str) -> torch.device:
    """Where the trainer packs: its GPU for ``cuda_ipc`` (the generator reads it there), host memory otherwise."""
    return staging_device("cuda_ipc") if transport == "cuda_ipc" else torch.device("cpu")


def ipc_handles(buffers: list[torch.Tensor]) -> list[bytes]:
    """``cuda_ipc``: pickled handles another process opens the buckets with (see :func:`open_ipc_handle`).

    The caller keeps the buckets referenced until the generator has loaded
    them (its acknowledgement), as CUDA IPC requires of the producer.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.synchronize()  # the packing copies are done before another process reads them
    return [pickle.dumps(reduce_tensor(buffer)[1]) for buffer in buffers]


def open_ipc_handle(handle: bytes, device_index: int) -> torch.Tensor:
    """The trainer's bucket, opened in this process on its GPU ``device_index``.

    The handle's device index is the trainer's numbering; this process may see
    the same GPU under another (its own ``CUDA_VISIBLE_DEVICES``), so it is
    replaced, as vLLM's ``vllm/distributed/weight_transfer/ipc_engine.py`` does.
    """
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(pickle.loads(handle))
    args[6] = device_index  # the 7th of reduce_tensor's arguments is the device
    return rebuild_cuda_tensor(*args)


def receive_buckets(
    group: dist.ProcessGroup | None, refit: RefreshManifest, transport: str = "gloo", reuse: bool = False
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The refresh's tensors, one bucket at a time, as views of the bucket's buffer.

    ``reuse``: every bucket arrives in one buffer, overwritten by the next, so
    at most one bucket is ever held; only for a consumer that has copied a
    bucket out before it asks for the next (vLLM's loaders may keep tensors of
    a layer until the layer is complete, so vLLM gets a fresh buffer each time).
    """
    if transport == "cuda_ipc":
        device_index = torch.cuda.current_device()
        for bucket, handle in zip(refit.buckets(), refit.handles or [], strict=True):
            yield unpack(bucket, open_ipc_handle(handle, device_index))  # the trainer's bucket, until acknowledged
        return
    if group is None:
        raise ValueError(f"weight transport {transport!r} needs a side group to receive over.")
    device = staging_device(transport)
    buckets = refit.buckets()
    largest = max((b.nbytes for b in buckets), default=0)
    shared = torch.empty(largest, dtype=torch.uint8, device=device) if reuse else None
    for bucket in buckets:
        if shared is not None:
            buffer = shared[: bucket.nbytes]
        else:
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        group.broadcast(buffer, 0).wait()  # on NCCL: later work on the current stream waits for it
        views = unpack(bucket, buffer)
        del buffer  # held by the views alone, so it can go as soon as the consumer lets them go
        yield views
        del views
