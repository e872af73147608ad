"""Weight transfer over a side process group that neither Lightning nor vLLM owns.

The trainer (rank 0 of the side group) hosts a ``TCPStore`` on the loopback
interface and broadcasts each tensor; the generator (rank 1) receives into
fresh buffers. On CPU the group is gloo; the names, shapes and dtypes travel
once per refresh through the request queue, the tensors through the group.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

TensorMeta = tuple[str, tuple[int, ...], str]


def host_store(timeout_s: float = 300.0) -> dist.TCPStore:
    """A store for the side group on 127.0.0.1 (port 0: the OS picks a free one)."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s))


def join_group(port: int, prefix: str, rank: int, store: dist.TCPStore | None = None, timeout_s: float = 300.0) -> dist.ProcessGroup:
    """Join the two-member gloo group ``prefix`` (blocks until the other side joins too)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, timeout)


def tensor_meta(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in named_tensors]


def send_tensors(group: dist.ProcessGroup, tensors: Iterable[torch.Tensor]) -> None:
    """Broadcast each tensor from rank 0, one at a time (one at a time measured faster than one packed buffer).

    The group is gloo, so tensors travel through host memory; an NCCL group for
    GPU-to-GPU transfer is not implemented yet.
    """
    for tensor in tensors:
        group.broadcast(tensor.detach().to("cpu").contiguous(), 0).wait()


def receive_tensors(group: dist.ProcessGroup, meta: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive the tensors described by ``meta`` from rank 0, in order."""
    for name, shape, dtype in meta:
        buffer = torch.empty(shape, dtype=getattr(torch, dtype))
        group.broadcast(buffer, 0).wait()
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
