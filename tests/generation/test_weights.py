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
