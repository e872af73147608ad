"""The side group's weight transfer, with both ends in this process (two threads, one gloo group)."""

import threading

import torch

from lightning_rlhf.generation.weights import host_store, join_group, receive_tensors, send_tensors, tensor_meta


def _pair():
    store = host_store(timeout_s=30)
    groups = {}
    joiner = threading.Thread(target=lambda: groups.__setitem__(1, join_group(store.port, "test", 1, timeout_s=30)))
    joiner.start()
    groups[0] = join_group(store.port, "test", 0, store=store, timeout_s=30)
    joiner.join(30)
    return store, groups[0], groups[1]


def test_a_background_send_delivers_the_weights_as_they_were_when_sent():
    store, sender, receiver = _pair()
    weights = [("a", torch.arange(6.0).view(2, 3)), ("b", torch.full((1000,), 2.0))]
    expected = [(name, t.clone()) for name, t in weights]
    received = []
    transfer = send_tensors(sender, (t for _, t in weights), wait=False)
    for _, t in weights:  # the trainer's next optimizer step changes the weights in place right away
        t.add_(100.0)
    thread = threading.Thread(target=lambda: received.extend(receive_tensors(receiver, tensor_meta(expected))))
    thread.start()
    transfer.wait()
    thread.join(30)
    assert [name for name, _ in received] == ["a", "b"]
    for (_, got), (_, want) in zip(received, expected):
        assert torch.equal(got, want)  # the snapshot taken at send time, not the changed tensors
    assert transfer.tensors == []  # the copies are released once sent


def test_a_send_gives_up_when_the_receiver_dies_instead_of_waiting():
    """A real gloo group whose receiver is there but never receives; the sender's liveness check ends the wait."""
    import time

    import pytest

    store, sender, receiver = _pair()
    weights = [torch.zeros(16 * 2**20)]  # 64 MiB: too much to leave in a socket buffer, so the send stays pending
    died_at = time.monotonic() + 0.5
    transfer = send_tensors(sender, weights, wait=False, alive=lambda: time.monotonic() < died_at, poll_s=0.01)
    with pytest.raises(RuntimeError, match="died during the weight transfer"):
        transfer.wait()
    assert time.monotonic() - died_at < 1.0  # noticed at the next poll, not at the group's timeout
    list(
        receive_tensors(receiver, tensor_meta([("w", weights[0])]))
    )  # let the pending broadcast finish before the group goes


def test_nccl_transfer_aborts_its_group_when_the_receiver_dies(monkeypatch):
    """The NCCL-only step (aborting the group, or its pending broadcast blocks the GPU) with a stand-in group: no GPUs here."""
    import pytest

    from lightning_rlhf.generation import weights

    class NeverDone:
        def is_completed(self):
            return False

    class Group:
        aborted = False

        def broadcast(self, tensor, root):
            return NeverDone()

        def abort(self):
            self.aborted = True

    monkeypatch.setattr(weights, "staging_device", lambda transport: torch.device("cpu"))
    group, checks = Group(), []
    with pytest.raises(RuntimeError, match="died during the weight transfer"):
        weights.send_tensors(
            group, [torch.ones(2)], "nccl", alive=lambda: checks.append(1) or len(checks) < 3, poll_s=0.0
        )
    assert group.aborted and len(checks) == 3
