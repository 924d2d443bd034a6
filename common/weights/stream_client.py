"""The actor side of the stream weight transport: pull a published version from the learner's weight server.

See :mod:`editrl.common.weights.stream_server` for the protocol, the server and the failure model. :func:`fetch_stream`
keeps ``window`` chunk requests in flight, verifies every chunk and the whole blob, and returns the tensors as
zero-copy views of the received buffer (:func:`tensors_from_buffer`); :func:`load_weights` picks the transport from
the announced uri.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
import zmq

from editrl.common import wire
from editrl.common.net import harden
from editrl.common.security import HandshakeWatch, SecurityConfig, secure_client
from editrl.common.weights.file import load_published
from editrl.common.weights.stream_server import (
    _SHA256_HEX,
    FETCH_RETRIES,
    FETCH_TIMEOUT_S,
    MAX_REPLY_META_BYTES,
    STREAM_PROTOCOL_VERSION,
    STREAM_SCHEME,
    WINDOW_CHUNKS,
    WeightsStreamError,
    WeightsVersionGone,
    _in,
    _log,
    _sha256,
    _short,
    _uint,
    _unpack_map,
)
from editrl.common.wire import WeightsInfo

__all__ = ["FetchStats", "FetchStopped", "fetch_stream", "load_weights", "tensors_from_buffer"]


class FetchStopped(Exception):
    """The fetch was abandoned because the process is stopping (not a transport failure: nothing to retry)."""


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def tensors_from_buffer(buf: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob as zero-copy views of ``buf`` (what ``safetensors.torch.load`` returns,
    without its copy). The format is a little-endian u64 header length, a JSON header (name -> dtype, shape,
    data_offsets) and the raw data; every entry is checked against the buffer before a view is made, so a malformed
    blob raises WeightsStreamError instead of reading out of bounds. No pickle is involved.
    """
    view = memoryview(buf)
    if len(view) < 8:
        raise WeightsStreamError("safetensors blob shorter than its header length")
    n = int.from_bytes(view[:8], "little")
    if not 2 <= n <= len(view) - 8:
        raise WeightsStreamError(f"safetensors header length {n} does not fit a {len(view)}-byte blob")
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
    except ValueError as exc:
        raise WeightsStreamError(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WeightsStreamError("safetensors header is not a map")
    start, size = 8 + n, len(view) - 8 - n
    out: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = _DTYPES[entry["dtype"]], list(entry["shape"]), entry["data_offsets"]
            count = math.prod(shape)
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(b, int) and isinstance(e, int)
        except (KeyError, TypeError, ValueError):
            raise WeightsStreamError(f"safetensors entry {name!r} is malformed") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not ok or not 0 <= b <= e <= size or e - b != count * itemsize:
            raise WeightsStreamError(f"safetensors entry {name!r}: offsets {b}..{e} do not hold {shape} {dtype}")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + b).reshape(shape)
    return out


@dataclass
class FetchStats:
    """Filled by :func:`fetch_stream` when passed in: what one fetch cost (for the weight-sync time split)."""

    bytes: int = 0
    chunks: int = 0
    resent_timeout: int = 0
    resent_corrupt: int = 0
    duplicates: int = 0  # late replies to requests already satisfied
    transfer_s: float = 0.0  # meta request to last verified chunk
    load_s: float = 0.0  # whole-blob check + safetensors load


@dataclass(frozen=True)
class _Meta:
    size: int
    chunk_size: int
    n_chunks: int


def stream_endpoint(uri: str) -> str:
    """``stream://HOST:PORT`` → ``tcp://HOST:PORT``. Raises ValueError for anything else."""
    if not uri.startswith(STREAM_SCHEME):
        raise ValueError(f"not a stream uri: {uri!r} (expected {STREAM_SCHEME}HOST:PORT)")
    host, _, port = uri[len(STREAM_SCHEME) :].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad stream uri {uri!r}: expected {STREAM_SCHEME}HOST:PORT")
    return f"tcp://{host}:{port}"


class _InOrderSha256:
    """sha256 of the blob, fed in index order to a worker thread, so it overlaps receiving and per-chunk checks."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pending: dict[int, memoryview] = {}
        self._next = 0
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="editrl-weights-sha256", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (buf := self._queue.get()) is not None:
            self._hash.update(buf)  # releases the GIL

    def add(self, index: int, buf: memoryview) -> None:
        self._pending[index] = buf
        while self._next in self._pending:
            self._queue.put(self._pending.pop(self._next))
            self._next += 1

    def hexdigest(self) -> str:
        self.close()
        self._thread.join()
        return self._hash.hexdigest()

    def close(self) -> None:
        self._queue.put(None)


class _Puller:
    """One fetch over one DEALER: request/reply matching, resends, checksums."""

    def __init__(self, sock: zmq.Socket, watch: HandshakeWatch, info: WeightsInfo, endpoint: str,
                 timeout_s: float, retries: int, stats: FetchStats,
                 should_stop: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.sock, self.watch, self.info, self.endpoint = sock, watch, info, endpoint
        self.timeout_s, self.retries, self.stats = timeout_s, retries, stats
        self.should_stop = should_stop

    def _send(self, op: str, **fields: int) -> None:
        req = {"proto": STREAM_PROTOCOL_VERSION, "op": op, "version": self.info.version, **fields}
        self.sock.send(msgpack.packb(req))

    def _recv(self, deadline: float) -> tuple[dict[Any, Any], list[zmq.Frame]] | None:
        """The next reply before ``deadline`` (monotonic), or None. Raises on an error reply or a malformed one."""
        while (remaining := deadline - time.monotonic()) > 0:
            self.watch.check()  # a rejected CURVE key raises HandshakeError instead of timing out
            if self.should_stop is not None and self.should_stop():
                raise FetchStopped(f"weights v{self.info.version}: the process is stopping")
            if not self.sock.poll(max(1, int(min(remaining, 0.1) * 1000))):
                continue
            frames = self.sock.recv_multipart(copy=False)
            try:
                msg = _unpack_map(frames[0].buffer, MAX_REPLY_META_BYTES)
            except wire.WireError as exc:
                raise WeightsStreamError(f"malformed reply from {self.endpoint}: {exc}") from None
            if msg.get("ok") is not True:
                self._raise_refusal(msg)
            return msg, frames
        return None

    def _raise_refusal(self, msg: dict[Any, Any]) -> None:
        held = msg.get("versions")
        held = [v for v in held if isinstance(v, int)] if isinstance(held, list) else []
        error, detail = _short(msg.get("error")), _short(msg.get("detail"))
        v = self.info.version
        if msg.get("error") == "unknown_version":
            raise WeightsVersionGone(
                f"weights v{v} are gone from {self.endpoint} (it holds versions {held}): load the latest announced "
                f"version instead",
                v,
                held,
            )
        raise WeightsStreamError(f"weight server {self.endpoint} refused a request for v{v}: {error}: {detail}")

    def meta(self) -> _Meta:
        for _attempt in range(self.retries + 1):
            self._send("meta")
            deadline = time.monotonic() + self.timeout_s
            while (reply := self._recv(deadline)) is not None:
                msg = reply[0]
                if msg.get("op") == "meta" and msg.get("version") == self.info.version:
                    return self._check_meta(msg)
                self.stats.duplicates += 1
        raise TimeoutError(
            f"weights v{self.info.version}: no reply from the weight server {self.endpoint} after "
            f"{self.retries + 1} attempts of {self.timeout_s:g} s (is the learner running and reachable?)"
        )

    def _check_meta(self, msg: dict[Any, Any]) -> _Meta:
        try:
            size, chunk_size, n_chunks = _uint(msg, "size"), _uint(msg, "chunk_size"), _uint(msg, "n_chunks")
        except wire.WireError as exc:
            raise WeightsStreamError(f"malformed meta reply from {self.endpoint}: {exc}") from None
        if chunk_size == 0 or n_chunks != math.ceil(size / chunk_size) or chunk_size > wire.MAX_FRAME_BYTES:
            raise WeightsStreamError(f"inconsistent meta from {self.endpoint}: {size=} {chunk_size=} {n_chunks=}")
        if msg.get("sha256") != self.info.sha256:
            raise WeightsStreamError(
                f"weights v{self.info.version} at {self.endpoint} have sha256 {_short(msg.get('sha256'))}, the "
                f"announcement says {self.info.sha256} (a restarted learner re-used the version number?)"
            )
        return _Meta(size, chunk_size, n_chunks)

    def _chunk_ok(self, meta: _Meta, msg: dict[Any, Any], frames: list[zmq.Frame], index: int) -> bool:
        expected = min(meta.chunk_size, meta.size - index * meta.chunk_size)
        digest = msg.get("sha256")
        if len(frames) != 2 or not isinstance(digest, str) or len(digest) != _SHA256_HEX:
            return False
        buf = frames[1].buffer
        return len(buf) == expected and _sha256(buf).hexdigest() == digest

    def chunks(self, meta: _Meta, window: int) -> bytes:
        """Pull every chunk with ``window`` requests in flight; return the blob, verified against info.sha256."""
        parts: list[zmq.Frame | None] = [None] * meta.n_chunks
        attempts = [0] * meta.n_chunks
        in_flight: dict[int, float] = {}  # index → monotonic time sent
        whole, next_index, done = _InOrderSha256(), 0, 0
        try:
            while done < meta.n_chunks:
                next_index = self._fill(in_flight, next_index, meta.n_chunks, window)
                done += self._step(meta, parts, attempts, in_flight, whole)
            digest = whole.hexdigest()
        finally:
            whole.close()
        if digest != self.info.sha256:
            raise WeightsStreamError(f"weights v{self.info.version} from {self.endpoint}: whole-blob sha256 mismatch")
        self.stats.bytes, self.stats.chunks = meta.size, meta.n_chunks
        blob = bytearray(meta.size)  # one copy out of the ZeroMQ frames; the tensors are views of it
        pos = 0
        for part in parts:
            if part is not None:
                blob[pos : pos + len(part.buffer)] = part.buffer
                pos += len(part.buffer)
        return blob

    def _fill(self, in_flight: dict[int, float], next_index: int, n_chunks: int, window: int) -> int:
        while len(in_flight) < window and next_index < n_chunks:
            self._send("chunk", index=next_index)
            in_flight[next_index] = time.monotonic()
            next_index += 1
        return next_index

    def _step(self, meta: _Meta, parts: list[zmq.Frame | None], attempts: list[int], in_flight: dict[int, float],
              whole: _InOrderSha256) -> int:  # fmt: skip
        """Wait for one reply (or resend what timed out); return 1 if a chunk was completed."""
        reply = self._recv(min(in_flight.values()) + self.timeout_s)
        if reply is None:
            now = time.monotonic()
            for index in [i for i, t in in_flight.items() if now - t >= self.timeout_s]:
                self._resend(index, attempts, in_flight, corrupt=False)
            return 0
        msg, frames = reply
        index = msg.get("index")
        if msg.get("op") != "chunk" or msg.get("version") != self.info.version or not _in(index, in_flight):
            self.stats.duplicates += 1
            return 0
        if not self._chunk_ok(meta, msg, frames, index):
            self._resend(index, attempts, in_flight, corrupt=True)
            return 0
        parts[index] = frames[1]
        del in_flight[index]
        whole.add(index, frames[1].buffer)
        return 1

    def _resend(self, index: int, attempts: list[int], in_flight: dict[int, float], corrupt: bool) -> None:
        attempts[index] += 1
        v = self.info.version
        if corrupt:
            self.stats.resent_corrupt += 1
            _log.warning("weights_chunk_corrupt", version=v, index=index, attempt=attempts[index])
        else:
            self.stats.resent_timeout += 1
        if attempts[index] > self.retries:
            what = "failed its checksum" if corrupt else f"got no reply within {self.timeout_s:g} s"
            message = f"weights v{v}: chunk {index} from {self.endpoint} {what} {attempts[index]} times"
            raise WeightsStreamError(message) if corrupt else TimeoutError(message)
        self._send("chunk", index=index)
        in_flight[index] = time.monotonic()


def fetch_stream(
    info: WeightsInfo,
    security: SecurityConfig | None = None,
    timeout_s: float = FETCH_TIMEOUT_S,
    retries: int = FETCH_RETRIES,
    window: int = WINDOW_CHUNKS,
    stats: FetchStats | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Pull version ``info.version`` from the weight server at ``info.uri`` and return its tensors.

    Each request waits up to ``timeout_s`` for its reply and is sent again up to ``retries`` times, so an
    unreachable server raises TimeoutError after about ``(retries + 1) * timeout_s``. See the module docstring for
    the other errors. ``security`` is this actor's client config (the weight server's public key is
    ``security.server_public_key``). ``should_stop`` (checked every 0.1 s) aborts the fetch with FetchStopped.
    """
    if timeout_s <= 0 or retries < 0 or window < 1:
        raise ValueError(f"need timeout_s > 0, retries >= 0, window >= 1; got {timeout_s}, {retries}, {window}")
    endpoint = stream_endpoint(info.uri)
    stats = stats if stats is not None else FetchStats()
    ctx = zmq.Context()
    sock = harden(ctx.socket(zmq.DEALER))
    watch: HandshakeWatch | None = None
    try:
        secure_client(sock, security or SecurityConfig())
        watch = HandshakeWatch(sock, endpoint)
        sock.connect(endpoint)
        puller = _Puller(sock, watch, info, endpoint, timeout_s, retries, stats, should_stop)
        t0 = time.monotonic()
        blob = puller.chunks(puller.meta(), window)
        stats.transfer_s = time.monotonic() - t0
    finally:
        if watch is not None:
            watch.close()
        sock.close(linger=0)
        ctx.term()
    t0 = time.monotonic()
    tensors = tensors_from_buffer(blob)
    stats.load_s = time.monotonic() - t0
    return tensors


def load_weights(
    info: WeightsInfo, security: SecurityConfig | None = None, **fetch_kwargs: Any
) -> dict[str, torch.Tensor]:
    """Load a published version by its uri scheme: ``stream://`` → :func:`fetch_stream`, a path → the file transport.

    Raises ValueError for a version without a uri (version 0 is the base model) and NotImplementedError for
    ``nccl://`` (designed in docs/WEIGHTS.md, not implemented).
    """
    if not info.uri:
        raise ValueError(f"weights v{info.version} have no uri (version 0 is the base model: nothing to load)")
    if info.uri.startswith(STREAM_SCHEME):
        return fetch_stream(info, security=security, **fetch_kwargs)
    if info.uri.startswith("nccl://"):
        raise NotImplementedError("the nccl:// weight transport is designed (docs/WEIGHTS.md) but not implemented")
    return load_published(info)


# ----------------------------------------------------------------------------------------------------------------
# The learner's side of either transport
