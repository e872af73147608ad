"""Weight transfer over a side process group that neither Lightning nor vLLM owns.

The trainer (rank 0 of the side group) hosts a ``TCPStore`` on the loopback
interface and broadcasts each tensor; the generator (rank 1) receives into
fresh buffers. The names, shapes and dtypes travel once per refresh through
the request queue, the tensors through the group, whose transport is

* ``"gloo"`` (default): through host memory; works on CPU and on GPU, also with
  trainer and generator on one GPU;
* ``"nccl"``: GPU to GPU, for a generator on a GPU of its own (NCCL does not
  join two processes on one device). Not yet run on GPUs by this project's
  tests: the machines they had held one GPU each.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

TensorMeta = tuple[str, tuple[int, ...], str]


def host_store(timeout_s: float = 300.0) -> dist.TCPStore:
    """A store for the side group on 127.0.0.1 (port 0: the OS picks a free one)."""
    return dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


TRANSPORTS = ("gloo", "nccl")


def join_group(
    port: int,
    prefix: str,
    rank: int,
    store: dist.TCPStore | None = None,
    timeout_s: float = 300.0,
    transport: str = "gloo",
) -> dist.ProcessGroup:
    """Join the two-member group ``prefix`` (gloo blocks until the other side joins; NCCL meets at the first broadcast)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    store = dist.PrefixStore(prefix, store)
    if transport == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    if transport == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)  # bound to the current CUDA device
    raise ValueError(f"Unknown weight transport {transport!r}; choose one of {', '.join(TRANSPORTS)}.")


def staging_device(transport: str) -> torch.device:
    """Where tensors must be to travel: host memory for gloo, this process's current GPU for NCCL."""
    return torch.device("cuda", torch.cuda.current_device()) if transport == "nccl" else torch.device("cpu")


def tensor_meta(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in named_tensors]


class Transfer:
    """Broadcasts in flight, with the tensors they send (kept referenced until they are done)."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        works: list,
        tensors: list[torch.Tensor],
        transport: str,
        alive: Callable[[], bool] | None,
        poll_s: float,
    ) -> None:
        self.group, self.works, self.tensors = group, works, tensors
        self.transport, self.alive, self.poll_s = transport, alive, poll_s

    def wait(self) -> None:
        """Block until every broadcast is done; a receiver that died raises ``RuntimeError`` instead of a hang."""
        while not all(work.is_completed() for work in self.works):
            if self.alive is not None and not self.alive():
                if self.transport == "nccl":
                    self.group.abort()  # or the pending broadcasts block this GPU's work for good
                raise RuntimeError("the receiving process died during the weight transfer")
            time.sleep(self.poll_s)
        for work in self.works:
            work.wait()  # raises the transport's own error, if it had one
        self.tensors = []


def send_tensors(
    group: dist.ProcessGroup,
    tensors: Iterable[torch.Tensor],
    transport: str = "gloo",
    alive: Callable[[], bool] | None = None,
    wait: bool = True,
    snapshot: bool = True,
    poll_s: float = 0.005,
) -> Transfer:
    """Broadcast each tensor from rank 0; returns the transfer (already finished when ``wait``).

    Over gloo with ``snapshot`` each tensor is first copied to host memory, so
    with ``wait=False`` the caller may go on and even change its tensors while
    gloo's threads send the copies (the trainer's next step overlaps the
    refresh). Without ``snapshot`` CPU tensors are sent as they are: only for
    callers that leave them alone until the transfer is done. Over NCCL the
    transfer is always waited for, polling ``alive()``: NCCL itself would wait
    for a dead receiver until its timeout, and its pending broadcast would hold
    up every later kernel on the trainer's GPU.
    """
    device = staging_device(transport)
    if transport == "gloo":
        staged = [
            tensor.detach().to(device, copy=snapshot).contiguous() for tensor in tensors
        ]  # snapshot: a copy the caller cannot change
    else:
        staged = [tensor.detach().to(device).contiguous() for tensor in tensors]
    transfer = Transfer(group, [group.broadcast(tensor, 0) for tensor in staged], staged, transport, alive, poll_s)
    if wait or transport == "nccl":
        transfer.wait()
    return transfer


def receive_tensors(
    group: dist.ProcessGroup, meta: list[TensorMeta], transport: str = "gloo"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive the tensors described by ``meta`` from rank 0, in order."""
    device = staging_device(transport)
    for name, shape, dtype in meta:
        buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        group.broadcast(buffer, 0).wait()  # on NCCL: later work on the current stream waits for it
        yield name, buffer


def policy_state(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors a generator needs: every parameter, plus ``lm_head.weight`` when embeddings are tied.

    Hugging Face omits the tied ``lm_head.weight`` from ``named_parameters``; vLLM on
    CPU keeps a prepacked copy of the output layer, so it must be sent explicitly.
    """
    state = [(name, p.detach()) for name, p in model.named_parameters()]
    if getattr(model.config, "tie_word_embeddings", False) and not any(n == "lm_head.weight" for n, _ in state):
        state.append(("lm_head.weight", model.get_output_embeddings().weight.detach()))
    return state
