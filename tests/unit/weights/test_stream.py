"""common/weights/stream_server.py (server) and common/weights/stream_client.py (actor side) over real ZeroMQ
sockets on 127.0.0.1: round trips, chunking, corruption and truncation (at the server and on the wire, through a
proxy), a tampered checksum table, eviction, malformed requests, protocol versions, a stopped server, CURVE, and the
uri dispatch of load_weights."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time

import msgpack
import pytest
import torch
import xxhash
import zmq
from safetensors.torch import save as safetensors_save

from editrl.common.keys import generate_layout
from editrl.common.weights.blob import checksum_table, manifest_digest
from editrl.common.weights.file import publish_file
from editrl.common.weights.stream_client import FetchStats, FetchStopped, fetch_stream, load_weights
from editrl.common.weights.stream_server import (
    MAX_REQUEST_BYTES,
    MIN_CHUNK_BYTES,
    STREAM_PROTOCOL_VERSION,
    FilePublisher,
    WeightServer,
    WeightsStreamError,
    WeightsVersionGone,
    payload_bytes,
)
from editrl.common.wire import WeightsInfo

SMALL_CHUNK = 1024  # bytes: the state dicts below span many chunks


def make_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.weight": torch.randn(64, 48, generator=gen),  # [64, 48] float32
        "blocks.0.bias": torch.randn(48, generator=gen).to(torch.bfloat16),
        "norm.scale": torch.randn(7, 3, generator=gen).to(torch.bfloat16),
        "step": torch.tensor(3, dtype=torch.int64),  # 0-dim
        "empty": torch.zeros(0, 4),
    }


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), k


@pytest.fixture
def server():
    srv = WeightServer(chunk_size=SMALL_CHUNK)
    yield srv
    srv.close()


def test_round_trip_is_bit_equal_and_keeps_dtypes(server, tmp_path):
    sd = make_state_dict()
    info = server.publish(1, sd, "full")
    assert info.version == 1 and info.kind == "full"
    assert info.uri == server.uri and info.uri.startswith("stream://127.0.0.1:")
    blob = safetensors_save(sd)
    assert payload_bytes(sd) == len(blob)
    # the announced digest is the manifest's: sha256 of (size, chunk size, XXH3-64 of every safetensors chunk), so
    # the stream carries exactly the bytes safetensors (and the file transport) writes
    sums = [xxhash.xxh3_64_intdigest(blob[i : i + SMALL_CHUNK]) for i in range(0, len(blob), SMALL_CHUNK)]
    assert info.sha256 == manifest_digest(len(blob), SMALL_CHUNK, checksum_table(sums))
    published = publish_file(tmp_path, 1, sd, "full")
    assert (tmp_path / "v000001" / "adapter.safetensors").read_bytes() == blob and published.sha256 != info.sha256
    stats = FetchStats()
    got = fetch_stream(info, timeout_s=2.0, stats=stats)
    assert_bit_equal(got, sd)
    assert got["blocks.0.bias"].dtype == torch.bfloat16 and got["blocks.0.weight"].dtype == torch.float32
    assert stats.bytes == len(blob) and stats.resent_timeout == stats.resent_corrupt == 0


def test_multi_chunk_blob_with_small_window(server):
    sd = {"w": torch.randn(100, 37)}  # ~14.8 KB → 15 chunks of 1 KiB, 3 in flight
    info = server.publish(1, sd, "full")
    stats = FetchStats()
    assert_bit_equal(fetch_stream(info, timeout_s=2.0, window=3, stats=stats), sd)
    n_chunks = math.ceil(payload_bytes(sd) / SMALL_CHUNK)
    assert stats.chunks == n_chunks >= 10
    assert server.counters["weights_stream/chunks_served"] == n_chunks


def test_lora_only_payload(server):
    lora = {"x.lora_A.weight": torch.randn(8, 256), "x.lora_B.weight": torch.zeros(256, 8)}
    full = {"x.weight": torch.randn(256, 256)}
    info = server.publish(1, lora, "lora")
    assert info.kind == "lora"
    assert_bit_equal(fetch_stream(info, timeout_s=2.0), lora)
    assert payload_bytes(lora) < 0.07 * payload_bytes(full)  # 2·r·d / d² = 1/16 plus the header


def test_corrupted_chunk_is_detected_and_fetched_again(server, monkeypatch):
    sd = make_state_dict()
    info = server.publish(1, sd, "full")
    calls: dict[int, int] = {}
    real = server._chunk_bytes

    def corrupt_once(blob, index):
        calls[index] = calls.get(index, 0) + 1
        data = real(blob, index)
        if index == 1 and calls[index] == 1:
            bad = bytearray(data)
            bad[10] ^= 0xFF
            return memoryview(bytes(bad))
        return data

    monkeypatch.setattr(server, "_chunk_bytes", corrupt_once)
    stats = FetchStats()
    assert_bit_equal(fetch_stream(info, timeout_s=2.0, stats=stats), sd)
    assert calls[1] == 2 and stats.resent_corrupt == 1


class WireProxy:
    """A ROUTER/DEALER relay between one client and the weight server that lets ``damage(msg, frames)`` rewrite each
    reply's frames on the way back: the wire between them, seen from the client."""

    def __init__(self, server_endpoint: str, damage) -> None:
        self.ctx = zmq.Context()
        self.front, self.back = self.ctx.socket(zmq.ROUTER), self.ctx.socket(zmq.DEALER)
        for sock in (self.front, self.back):
            sock.setsockopt(zmq.LINGER, 0)
        self.front.bind("tcp://127.0.0.1:0")
        self.back.connect(server_endpoint)
        port = self.front.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        self.uri, self.damage, self.stop = f"stream://127.0.0.1:{port}", damage, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller, client = zmq.Poller(), None
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        while not self.stop.is_set():
            ready = dict(poller.poll(50))
            if self.front in ready:
                client, *frames = self.front.recv_multipart()
                self.back.send_multipart(frames)
            if self.back in ready:
                frames = self.back.recv_multipart()
                self.front.send_multipart([client, *self.damage(msgpack.unpackb(frames[0]), frames)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.front.close()
        self.back.close()
        self.ctx.term()


def _flip(frame: bytes) -> bytes:
    return frame[:10] + bytes([frame[10] ^ 0x01]) + frame[11:]


WIRE_DAMAGE = {
    "bit_flipped": lambda frames: [frames[0], _flip(frames[1])],
    "truncated": lambda frames: [frames[0], frames[1][:-1]],
    "one_byte_long": lambda frames: [frames[0], frames[1] + b"\0"],
    "chunk_frame_missing": lambda frames: [frames[0]],
    "other_chunks_bytes": lambda frames: [frames[0], bytes(reversed(frames[1]))],
}


@pytest.mark.parametrize("how", sorted(WIRE_DAMAGE))
def test_chunk_damaged_on_the_wire_is_rejected_and_fetched_again(server, how):
    sd = make_state_dict()
    info = server.publish(1, sd, "full")
    damaged: list[int] = []

    def damage_chunk_1_once(msg, frames):
        if msg.get("op") == "chunk" and msg.get("index") == 1 and not damaged:
            damaged.append(1)
            return WIRE_DAMAGE[how](frames)
        return frames

    proxy = WireProxy(server.endpoint, damage_chunk_1_once)
    try:
        stats = FetchStats()
        assert_bit_equal(fetch_stream(dataclasses.replace(info, uri=proxy.uri), timeout_s=2.0, stats=stats), sd)
    finally:
        proxy.close()
    n_chunks = math.ceil(payload_bytes(sd) / SMALL_CHUNK)
    assert damaged and stats.resent_corrupt == 1 and stats.resent_timeout == 0
    assert server.counters["weights_stream/chunks_served"] == n_chunks + 1


def test_chunk_damaged_on_every_attempt_fails_cleanly(server):
    info = server.publish(1, make_state_dict(), "full")

    def flip_chunk_3(msg, frames):
        return WIRE_DAMAGE["bit_flipped"](frames) if msg.get("op") == "chunk" and msg.get("index") == 3 else frames

    proxy = WireProxy(server.endpoint, flip_chunk_3)
    try:
        with pytest.raises(WeightsStreamError, match="chunk 3 .* failed its checksum 3 times"):
            fetch_stream(dataclasses.replace(info, uri=proxy.uri), timeout_s=2.0, retries=2)
    finally:
        proxy.close()


@pytest.mark.parametrize("how", ["entry_changed", "entry_dropped"])
def test_a_checksum_table_that_is_not_the_announced_one_is_refused(server, how):
    """The checksum table is bound to the announcement by the manifest digest: a table changed on the way (which
    would let matching corrupt chunks through) fails the fetch before any chunk is asked for."""
    info = server.publish(1, make_state_dict(), "full")

    def damage_table(msg, frames):
        if msg.get("op") != "meta":
            return frames
        return [frames[0], _flip(frames[1]) if how == "entry_changed" else frames[1][:-8]]

    proxy = WireProxy(server.endpoint, damage_table)
    try:
        match = "the announcement says" if how == "entry_changed" else "checksum table of"
        with pytest.raises(WeightsStreamError, match=match):
            fetch_stream(dataclasses.replace(info, uri=proxy.uri), timeout_s=2.0)
    finally:
        proxy.close()
    assert server.counters["weights_stream/chunks_served"] == 0


def test_a_peer_speaking_another_protocol_version_is_refused_by_name(server, monkeypatch):
    import editrl.common.weights.stream_client as stream_client

    info = server.publish(1, make_state_dict(), "full")
    monkeypatch.setattr(stream_client, "STREAM_PROTOCOL_VERSION", STREAM_PROTOCOL_VERSION - 1)
    with pytest.raises(WeightsStreamError, match="'bad_protocol_version': 'got proto 1, this server speaks 2'"):
        fetch_stream(info, timeout_s=2.0)
    assert server.counters["weights_stream/error_bad_protocol_version"] == 1


def test_lost_chunk_reply_is_requested_again_after_the_timeout(server, monkeypatch):
    sd = make_state_dict()
    info = server.publish(1, sd, "full")
    real, dropped = server._serve, []

    def drop_chunk_2_once(frames):
        req = msgpack.unpackb(frames[1])
        if req.get("index") == 2 and not dropped:
            dropped.append(req)
            return  # no reply, as if it was lost
        real(frames)

    monkeypatch.setattr(server, "_serve", drop_chunk_2_once)
    stats = FetchStats()
    assert_bit_equal(fetch_stream(info, timeout_s=0.3, stats=stats), sd)
    assert dropped and stats.resent_timeout == 1


def test_chunk_corrupt_on_every_attempt_gives_up(server, monkeypatch):
    info = server.publish(1, make_state_dict(), "full")
    monkeypatch.setattr(server, "_chunk_bytes", lambda blob, index: memoryview(b"\0" * SMALL_CHUNK))
    with pytest.raises(WeightsStreamError, match="failed its checksum 3 times"):
        fetch_stream(info, timeout_s=2.0, retries=2)


def test_two_versions_fetchable_until_a_third_evicts_the_first(server):
    sds = {v: make_state_dict(seed=v) for v in (1, 2, 3)}
    infos = {1: server.publish(1, sds[1], "full"), 2: server.publish(2, sds[2], "full")}
    for v in (1, 2):
        assert_bit_equal(fetch_stream(infos[v], timeout_s=2.0), sds[v])
    infos[3] = server.publish(3, sds[3], "full")
    assert server.versions() == [2, 3]
    with pytest.raises(WeightsVersionGone, match=r"v1 are gone .*holds versions \[2, 3\]") as exc:
        fetch_stream(infos[1], timeout_s=2.0)
    assert exc.value.held == [2, 3] and exc.value.version == 1
    for v in (2, 3):
        assert_bit_equal(fetch_stream(infos[v], timeout_s=2.0), sds[v])


def test_unknown_version_and_mismatched_announcement(server):
    info = server.publish(1, make_state_dict(), "full")
    with pytest.raises(WeightsVersionGone, match=r"holds versions \[1\]"):
        fetch_stream(dataclasses.replace(info, version=9), timeout_s=2.0)
    with pytest.raises(WeightsStreamError, match="the announcement says"):
        fetch_stream(dataclasses.replace(info, sha256="0" * 64), timeout_s=2.0)


def _bad_requests() -> list[tuple[list[bytes], str]]:
    """(request frames, the error reason the server must answer with)."""
    pack, v = msgpack.packb, STREAM_PROTOCOL_VERSION
    return [
        ([os.urandom(64)], "bad_msgpack"),
        ([b""], "bad_msgpack"),
        ([pack([1, 2, 3])], "bad_request"),
        ([pack({"op": "nope", "version": 1})], "unknown_op"),
        ([pack({"op": 7, "version": 1})], "unknown_op"),
        ([pack({"op": "meta"})], "bad_fields"),
        ([pack({"proto": v, "op": "meta", "version": "1"})], "wrong_type"),
        ([pack({"proto": v, "op": "meta", "version": True})], "wrong_type"),
        ([pack({"proto": v, "op": "meta", "version": 1.0})], "wrong_type"),
        ([pack({"op": "meta", "version": 1, "extra": 1})], "bad_fields"),
        ([pack({"op": "meta", "version": 1, "proto": 99})], "bad_protocol_version"),
        ([pack({"op": "meta", "version": 1})], "bad_protocol_version"),  # no proto: protocol 1 clients could omit it
        ([pack({"op": "meta", "version": 1, "proto": 1})], "bad_protocol_version"),
        ([pack({"op": "meta", "version": 1, "proto": "2"})], "wrong_type"),
        ([pack({"proto": v, "op": "chunk", "version": 1})], "bad_fields"),
        ([pack({"proto": v, "op": "chunk", "version": 1, "index": -1})], "wrong_type"),
        ([pack({"proto": v, "op": "chunk", "version": 1, "index": 10**6})], "bad_index"),
        ([pack({"proto": v, "op": "chunk", "version": 1, "index": [0]})], "wrong_type"),
        ([pack({"proto": v, "op": "chunk", "version": 9, "index": 0})], "unknown_version"),
        ([pack({b"op": b"meta", b"version": 1}, use_bin_type=True)], "unknown_op"),
        ([pack(msgpack.ExtType(1, b"x"))], "ext_type"),
        ([b"\x91" * 2000 + b"\xc0"], "bad_msgpack"),  # arrays nested 2000 deep
        ([pack({"proto": v, "op": "meta", "version": 1}), b"extra frame"], "frame_count"),
    ]


def test_malformed_requests_are_answered_and_counted(server):
    info = server.publish(1, make_state_dict(), "full")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        bad = _bad_requests()
        for frames, reason in bad:
            sock.send_multipart(frames)
            assert sock.poll(2000), f"no reply to {frames!r:.80}"
            reply = sock.recv_multipart()
            assert len(reply) == 1
            msg = msgpack.unpackb(reply[0])
            assert msg["ok"] is False and msg["error"] == reason and msg["versions"] == [1], (frames, msg)
        assert server.errors == len(bad) and server.alive
        # over MAX_REQUEST_BYTES: ZeroMQ drops the peer without a reply; the server goes on serving others
        sock.send(b"\0" * (MAX_REQUEST_BYTES + 1))
    finally:
        sock.close()
        ctx.term()
    assert_bit_equal(fetch_stream(info, timeout_s=2.0), make_state_dict())
    assert server.alive and server.counters["weights_stream/error_unknown_op"] == 3  # nope, 7, bytes keys


def test_stopped_server_times_out_within_the_configured_time():
    server = WeightServer(chunk_size=SMALL_CHUNK)
    info = server.publish(1, make_state_dict(), "full")
    server.close()
    assert not server.alive
    timeout_s, retries = 0.2, 2
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no reply from the weight server tcp://127.0.0.1:"):
        fetch_stream(info, timeout_s=timeout_s, retries=retries)
    elapsed = time.monotonic() - t0
    assert (retries + 1) * timeout_s * 0.9 <= elapsed < (retries + 1) * timeout_s + 1.0
    with pytest.raises(RuntimeError, match="not running"):
        server.publish(2, make_state_dict(), "full")


def test_a_stopping_process_abandons_the_fetch_at_once():
    """An actor told to stop while the weight server is gone does not sit out its retries (the supervisor would
    SIGKILL it after its grace period): the fetch ends within 0.1 s of should_stop turning true."""
    server = WeightServer(chunk_size=SMALL_CHUNK)
    info = server.publish(1, make_state_dict(), "full")
    server.close()
    t0 = time.monotonic()
    with pytest.raises(FetchStopped):
        fetch_stream(info, timeout_s=5.0, retries=3, should_stop=lambda: time.monotonic() - t0 > 0.3)
    assert time.monotonic() - t0 < 1.0  # not (3 + 1) x 5 s


def test_curve_round_trip(tmp_path):
    keys = generate_layout(tmp_path / "keys", ["actor-0"])
    sd = make_state_dict()
    with WeightServer(security=keys.broker_config(), chunk_size=SMALL_CHUNK) as server:
        info = server.publish(1, sd, "lora")
        assert_bit_equal(fetch_stream(info, security=keys.client_config("actor-0"), timeout_s=2.0), sd)


def test_load_weights_dispatches_on_the_uri(server, tmp_path):
    sd = make_state_dict()
    stream_info = server.publish(1, sd, "full")
    file_info = FilePublisher(tmp_path).publish(1, sd, "full")
    assert file_info.uri == str(tmp_path / "v000001")
    assert_bit_equal(load_weights(stream_info, timeout_s=2.0), sd)
    assert_bit_equal(load_weights(file_info), sd)
    with pytest.raises(ValueError, match="no uri"):
        load_weights(WeightsInfo(0, "", "", "lora"))
    with pytest.raises(NotImplementedError, match="nccl"):
        load_weights(WeightsInfo(1, "nccl://learner:29500", "", "lora"))
    with pytest.raises(ValueError, match="bad stream uri"):
        fetch_stream(WeightsInfo(1, "stream://nohost", "", "lora"))


def test_arguments_are_validated(server):
    with pytest.raises(ValueError, match="endpoint must be tcp://"):
        WeightServer(endpoint="ipc:///tmp/x")
    with pytest.raises(ValueError, match="chunk_size"):
        WeightServer(chunk_size=MIN_CHUNK_BYTES - 1)
    with pytest.raises(ValueError, match="keep"):
        WeightServer(keep=0)
    with pytest.raises(ValueError, match="kind"):
        server.publish(1, make_state_dict(), "half")
    server.publish(5, make_state_dict(), "full")
    with pytest.raises(ValueError, match="version must increase"):
        server.publish(5, make_state_dict(), "full")
    with pytest.raises(ValueError, match="timeout_s"):
        fetch_stream(WeightsInfo(5, server.uri, "", "full"), timeout_s=0)


def test_zero_copy_parse_equals_safetensors_and_rejects_malformed_blobs() -> None:
    import json as _json

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from editrl.common.weights.stream_client import tensors_from_buffer

    tensors = {
        "a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).to(torch.bfloat16),
        "d": torch.zeros(0, 4), "e": torch.tensor(1.5, dtype=torch.float16), "f": torch.tensor([True, False]),
    }  # fmt: skip
    blob = st_save(tensors)
    got, want = tensors_from_buffer(bytearray(blob)), st_load(blob)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    n = int.from_bytes(blob[:8], "little")
    header = _json.loads(blob[8 : 8 + n])
    bad_offsets = dict(header, a={**header["a"], "data_offsets": [0, 10**9]})
    bad_shape = dict(header, a={**header["a"], "shape": [4, 5]})
    bad_dtype = dict(header, a={**header["a"], "dtype": "C64"})

    def with_header(h: dict) -> bytearray:
        raw = _json.dumps(h).encode()
        return bytearray(len(raw).to_bytes(8, "little") + raw + blob[8 + n :])

    for broken in (bytearray(blob[:5]), bytearray((10**12).to_bytes(8, "little") + blob[8:]),
                   bytearray(blob[:8] + b"{" * n + blob[8 + n :]), with_header(bad_offsets),
                   with_header(bad_shape), with_header(bad_dtype)):  # fmt: skip
        with pytest.raises(WeightsStreamError):
            tensors_from_buffer(broken)
