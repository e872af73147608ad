"""Weight transfer in packed buckets: planning, packing, casting, streaming, and failures,
with both ends in this process."""

import threading
import time

import pytest
import torch

from lightning_rlhf.generation import weights
from lightning_rlhf.generation.weights import (
    RefreshManifest,
    WeightStream,
    host_store,
    join_group,
    join_watching,
    pack,
    pack_stream,
    plan_buckets,
    policy_state,
    receive_buckets,
    send_buckets,
    stream_of,
    unpack,
)

MiB = 2**20


def _pair(timeout_s: float = 30):
    store = host_store(timeout_s=timeout_s)
    groups = {}
    joiner = threading.Thread(
        target=lambda: groups.__setitem__(1, join_group(store.port, "test", 1, 2, timeout_s=timeout_s))
    )
    joiner.start()
    groups[0] = join_group(store.port, "test", 0, 2, store=store, timeout_s=timeout_s)
    joiner.join(30)
    return store, groups[0], groups[1]


def _mixed() -> list[tuple[str, torch.Tensor]]:
    """Odd sizes and mixed dtypes, so offsets must be aligned for every view."""
    g = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(3, 5, generator=g)),
        ("b", torch.randn(7, generator=g, dtype=torch.float64)),
        ("c", torch.arange(11, dtype=torch.int64)),
        ("d", torch.randn(4, 4, generator=g).to(torch.bfloat16)),
        ("e", torch.tensor(2.5)),
    ]


def test_buckets_hold_consecutive_tensors_within_the_size_and_a_large_one_alone():
    meta = [("a", (100,), "float32"), ("b", (100,), "float32"), ("big", (1000,), "float32"), ("c", (10,), "float32")]
    buckets = plan_buckets(meta, bucket_bytes=1000)
    assert [[m[0] for m, _ in b.entries] for b in buckets] == [["a", "b"], ["big"], ["c"]]
    assert buckets[0].entries[1][1] == 448  # 400 bytes, aligned up to 64
    assert all(b.nbytes <= 1000 for b in buckets if len(b.entries) > 1) and buckets[1].nbytes == 4000


def test_pack_then_unpack_is_bit_exact_for_every_dtype():
    named = _mixed()
    stream = stream_of(named)
    (bucket,) = plan_buckets(stream.meta, 10 * MiB)
    buffer = pack(bucket, iter(stream.tensors), torch.device("cpu"))
    assert buffer.dtype == torch.uint8
    for (name, got), (want_name, want) in zip(unpack(bucket, buffer), named):
        assert name == want_name and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8) if got.dim() else got, want.view(torch.uint8) if want.dim() else want)


def test_the_trainer_casts_floating_tensors_to_the_generators_dtype_while_packing():
    named = _mixed()
    stream = stream_of(named, dtype=torch.bfloat16)
    assert [m[2] for m in stream.meta] == ["bfloat16", "bfloat16", "int64", "bfloat16", "bfloat16"]
    (bucket,) = plan_buckets(stream.meta, 10 * MiB)
    unpacked = dict(unpack(bucket, pack(bucket, iter(stream.tensors), torch.device("cpu"))))
    assert torch.equal(unpacked["a"], named[0][1].to(torch.bfloat16))  # the same rounding as .to()
    assert torch.equal(unpacked["c"], named[2][1])  # integers travel as they are
    fp32_master = stream_of([("w", torch.zeros(1000))], dtype=torch.bfloat16)
    assert plan_buckets(fp32_master.meta, MiB)[0].nbytes == 2000  # half the bytes of the float32 weights


def test_the_tied_head_is_sent_only_when_asked():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1
    )
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    assert "lm_head.weight" not in dict(policy_state(model))  # GPU: vLLM's Llama loaders skip it
    assert dict(policy_state(model, tied_head=True))["lm_head.weight"] is model.model.embed_tokens.weight


def test_a_gathered_stream_holds_one_whole_parameter_at_a_time():
    """As ZeRO-3 does: each parameter is made whole only while it is packed,
    so the peak is one parameter, not a model."""
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(0))) for i in range(6)]
    whole = {name: torch.full((256, 256), float(i)) for i, (name, _) in enumerate(params)}
    for (_name, p), w in zip(params, whole.values()):
        p.ds_shape = w.shape
    live, peak = [0], [0]

    class Gather:
        def __init__(self, param):
            self.param = param

        def __enter__(self):
            name = next(n for n, p in params if p is self.param)
            self.param.data = whole[name].clone()
            live[0] += self.param.numel() * 4
            peak[0] = max(peak[0], live[0])

        def __exit__(self, *exc):
            live[0] -= self.param.numel() * 4
            self.param.data = torch.zeros(0)

    stream = stream_of(params, gather=Gather)
    assert stream.meta[0] == ("p0", (256, 256), "float32")  # shapes from ds_shape, without gathering
    buffers = pack_stream(stream, 2 * 256 * 256 * 4, torch.device("cpu"))
    model_bytes = sum(t.numel() * 4 for t in whole.values())
    assert peak[0] == 256 * 256 * 4 < model_bytes / 2
    assert live[0] == 0 and len(buffers) == 3
    got = [t for b, buf in zip(plan_buckets(stream.meta, 2 * 256 * 256 * 4), buffers) for _, t in unpack(b, buf)]
    assert all(torch.equal(g, w) for g, w in zip(got, whole.values()))


@pytest.mark.parametrize("reuse", [False, True])
def test_buckets_stream_over_gloo_and_the_receiver_holds_one_at_a_time(reuse):
    store, sender, receiver = _pair()
    named = [(f"w{i}", torch.full((MiB // 4,), float(i))) for i in range(4)]  # 1 MiB each
    expected = [(n, t.clone()) for n, t in named]
    refit = RefreshManifest(stream_of(named).meta, bucket_bytes=2 * MiB)
    buffers = pack_stream(stream_of(named), refit.bucket_bytes, torch.device("cpu"))
    for _, t in named:  # the trainer's next optimizer step changes the weights in place right away
        t.add_(100.0)
    transfer = send_buckets(sender, buffers)
    received, held, storage = [], [], set()

    def receive():
        for bucket in receive_buckets(receiver, refit, reuse=reuse):
            held.append(sum(t.numel() * t.element_size() for _, t in bucket))
            storage.add(bucket[0][1].untyped_storage().data_ptr())
            received.extend((n, t.clone()) for n, t in bucket)

    thread = threading.Thread(target=receive)
    thread.start()
    transfer.wait()
    thread.join(30)
    assert [n for n, _ in received] == ["w0", "w1", "w2", "w3"] and held == [2 * MiB, 2 * MiB]
    assert all(torch.equal(g, w) for (_, g), (_, w) in zip(received, expected))  # as they were when packed
    assert transfer.buffers == []  # released once sent
    if reuse:  # one buffer for every bucket: never two held
        assert len(storage) == 1


def test_a_send_gives_up_when_the_receiver_dies_instead_of_waiting():
    """A real gloo group whose receiver is there but never receives; the sender's liveness check ends the wait."""
    store, sender, receiver = _pair()
    buffer = torch.zeros(64 * MiB, dtype=torch.uint8)  # too much for a socket buffer, so the send stays pending
    died_at = time.monotonic() + 0.5
    transfer = send_buckets(sender, [buffer], alive=lambda: time.monotonic() < died_at, poll_s=0.01)
    with pytest.raises(RuntimeError, match="died during the weight transfer"):
        transfer.wait()
    assert time.monotonic() - died_at < 1.0  # noticed at the next poll, not at the group's timeout
    list(receive_buckets(receiver, RefreshManifest([("w", (64 * MiB,), "uint8")], 64 * MiB)))  # let it finish


def test_a_peer_that_dies_before_joining_stops_the_wait_at_once():
    """Gloo's rendezvous (like NCCL's communicator set-up) waits for every member; a dead one must not hold it."""
    store = host_store(timeout_s=60)
    died_at = time.monotonic() + 0.3
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="died before it joined"):
        join_watching(
            lambda: join_group(store.port, "alone", 0, 2, store=store, timeout_s=60),
            alive=lambda: time.monotonic() < died_at,
            poll_s=0.05,
        )
    assert time.monotonic() - start < 2.0  # not the group's 60 s timeout


def test_the_side_group_has_one_rank_per_tensor_parallel_worker():
    """Trainer rank 0 and a generator of 2 tensor-parallel workers at ranks 1 and 2: every broadcast reaches both."""
    store = host_store(timeout_s=30)
    groups = {}
    threads = [
        threading.Thread(target=lambda r=r: groups.__setitem__(r, join_group(store.port, "tp", r, 3, timeout_s=30)))
        for r in (1, 2)
    ]
    for t in threads:
        t.start()
    groups[0] = join_group(store.port, "tp", 0, 3, store=store, timeout_s=30)
    for t in threads:
        t.join(30)
    named = [("w", torch.arange(10.0))]
    refit = RefreshManifest(stream_of(named).meta, MiB)
    got = {}
    receivers = [
        threading.Thread(target=lambda r=r: got.__setitem__(r, list(receive_buckets(groups[r], refit)))) for r in (1, 2)
    ]
    for t in receivers:
        t.start()
    send_buckets(groups[0], pack_stream(stream_of(named), MiB, torch.device("cpu")), wait=True)
    for t in receivers:
        t.join(30)
    assert all(torch.equal(got[r][0][0][1], named[0][1]) for r in (1, 2))


class _NeverDone:
    def is_completed(self):
        return False


class _StuckGroup:
    """A group whose broadcasts never finish: the receiver never comes."""

    aborted = False

    def broadcast(self, tensor, root):
        return _NeverDone()

    def abort(self):
        self.aborted = True


def test_an_nccl_send_aborts_its_group_when_the_receiver_dies():
    """The NCCL-only step (aborting the group, or its pending broadcast holds the GPU's NCCL stream) with a stand-in."""
    group, checks = _StuckGroup(), []
    with pytest.raises(RuntimeError, match="died during the weight transfer"):
        weights.send_now(group, [torch.ones(2)], "nccl", alive=lambda: checks.append(1) or len(checks) < 3, poll_s=0.0)
    assert group.aborted and len(checks) == 3


def test_an_nccl_send_gives_up_at_our_timeout_before_the_watchdog_would():
    """Defect e: our limit ends the wait (and aborts the group), so NCCL's watchdog, set later, never fires."""
    group, start = _StuckGroup(), time.monotonic()
    with pytest.raises(RuntimeError, match="took no weights for the whole timeout"):
        weights.send_now(group, [torch.ones(2)], "nccl", alive=lambda: True, timeout_s=0.3, poll_s=0.01)
    assert group.aborted and time.monotonic() - start < 2.0
    assert weights.NCCL_WATCHDOG_MARGIN_S > 0  # join_group sets the group's own timeout this much later


def test_a_send_from_the_callers_thread_streams_through_two_reused_buffers():
    """Defects b and c: every bucket goes out in the calling thread,
    staged in turn in two buffers of one bucket each."""
    store, sender, receiver = _pair()
    named = [(f"w{i}", torch.full((MiB // 4,), float(i))) for i in range(5)]  # 1 MiB each, a bucket each
    refit = RefreshManifest(stream_of(named).meta, bucket_bytes=MiB)
    buffers = pack_stream(stream_of(named), refit.bucket_bytes, torch.device("cpu"))
    staging = weights.staging_buffers(MiB, torch.device("cpu"))
    threads, staged = set(), []

    class Spy:
        def broadcast(self, tensor, root):
            threads.add(threading.current_thread().name)
            staged.append(tensor.data_ptr())
            return sender.broadcast(tensor, root)

    received = []
    thread = threading.Thread(
        target=lambda: received.extend((n, t.clone()) for b in receive_buckets(receiver, refit) for n, t in b)
    )
    thread.start()
    weights.send_now(Spy(), buffers, "gloo", staging=staging)
    thread.join(30)
    assert threads == {threading.current_thread().name}
    assert staged == [s.data_ptr() for s in staging] * 2 + [staging[0].data_ptr()]  # never a host bucket itself
    assert [n for n, _ in received] == [n for n, _ in named]
    assert all(torch.equal(g, w) for (_, g), (_, w) in zip(received, named))


def test_a_join_gives_up_at_its_timeout():
    store = host_store(timeout_s=60)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="did not join the weight-transfer group within"):
        join_watching(
            lambda: join_group(store.port, "late", 0, 2, store=store, timeout_s=60),
            alive=lambda: True,
            poll_s=0.05,
            timeout_s=0.3,
        )
    assert time.monotonic() - start < 2.0


def test_a_failed_pack_still_reads_the_stream_to_its_end():
    """Under ZeRO-3 every rank gathers each parameter: rank 0 must not stop reading when it fails."""
    read = []

    def tensors():
        for i in range(4):
            read.append(i)
            yield torch.ones(3) if i != 1 else torch.ones(5)  # the second does not fit its announced shape

    stream = WeightStream([(f"w{i}", (3,), "float32") for i in range(4)], tensors())
    with pytest.raises(RuntimeError):
        pack_stream(stream, MiB, torch.device("cpu"))
    assert read == [0, 1, 2, 3]
