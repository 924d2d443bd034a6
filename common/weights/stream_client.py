"""The actor side of the stream weight transport: pull a published version from the learner's weight server.

See :mod:`editrl.common.weights.stream_server` for the protocol, the server and the failure model. :func:`fetch_stream`
checks the meta's checksum table against the announced digest, keeps ``window`` chunk requests in flight, checks every
chunk's length and XXH3-64 as it arrives (one pass, on the receiving thread) and copies it into one buffer, then
returns the tensors as zero-copy views of that buffer (:func:`tensors_from_buffer`). No sha256 pass over the payload:
the table hashes to the announced digest, every chunk matches the table. :func:`load_weights` picks the transport
from the announced uri.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
import zmq

from editrl.common import wire
from editrl.common.net import harden
from editrl.common.security import HandshakeWatch, SecurityConfig, secure_client
from editrl.common.weights import blob as _blob
from editrl.common.weights.file import load_published
from editrl.common.weights.stream_server import (
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
    _short,
    _uint,
    _unpack_map,
)
from editrl.common.wire import WeightsInfo

__all__ = ["FetchStats", "FetchStopped", "fetch_stream", "load_weights", "tensors_from_buffer"]


class FetchStopped(Exception):
    """The fetch was abandoned because the process is stopping (not a transport failure: nothing to retry)."""


def tensors_from_buffer(buf: Any) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob as zero-copy views of ``buf`` (bounds-checked; see
    :func:`editrl.common.weights.blob.tensors_from_buffer`). Raises WeightsStreamError for a malformed blob."""
    try:
        return _blob.tensors_from_buffer(buf)
    except _blob.BlobError as exc:
        raise WeightsStreamError(str(exc)) from None


@dataclass
class FetchStats:
    """Filled by :func:`fetch_stream` when passed in: what one fetch cost (for the weight-sync time split)."""

    bytes: int = 0
    chunks: int = 0
    resent_timeout: int = 0
    resent_corrupt: int = 0
    duplicates: int = 0  # late replies to requests already satisfied
    transfer_s: float = 0.0  # meta request to the last chunk verified and copied into the buffer
    load_s: float = 0.0  # safetensors header parsed into tensor views of the buffer


@dataclass(frozen=True)
class _Meta:
    size: int
    chunk_size: int
    n_chunks: int
    checksums: tuple[int, ...]  # XXH3-64 of every chunk, from the table that hashes to the announced digest


def stream_endpoint(uri: str) -> str:
    """``stream://HOST:PORT`` → ``tcp://HOST:PORT``. Raises ValueError for anything else."""
    if not uri.startswith(STREAM_SCHEME):
        raise ValueError(f"not a stream uri: {uri!r} (expected {STREAM_SCHEME}HOST:PORT)")
    host, _, port = uri[len(STREAM_SCHEME) :].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad stream uri {uri!r}: expected {STREAM_SCHEME}HOST:PORT")
    return f"tcp://{host}:{port}"


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
                    return self._check_meta(msg, reply[1])
                self.stats.duplicates += 1
        raise TimeoutError(
            f"weights v{self.info.version}: no reply from the weight server {self.endpoint} after "
            f"{self.retries + 1} attempts of {self.timeout_s:g} s (is the learner running and reachable?)"
        )

    def _check_meta(self, msg: dict[Any, Any], frames: list[zmq.Frame]) -> _Meta:
        try:
            size, chunk_size, n_chunks = _uint(msg, "size"), _uint(msg, "chunk_size"), _uint(msg, "n_chunks")
        except wire.WireError as exc:
            raise WeightsStreamError(f"malformed meta reply from {self.endpoint}: {exc}") from None
        if chunk_size == 0 or n_chunks != math.ceil(size / chunk_size) or chunk_size > wire.MAX_FRAME_BYTES:
            raise WeightsStreamError(f"inconsistent meta from {self.endpoint}: {size=} {chunk_size=} {n_chunks=}")
        if len(frames) != 2:
            raise WeightsStreamError(f"meta reply from {self.endpoint} has {len(frames)} frames, expected 2")
        table = frames[1].buffer
        try:
            checksums = _blob.parse_checksum_table(table, n_chunks)
        except _blob.BlobError as exc:
            raise WeightsStreamError(f"malformed meta reply from {self.endpoint}: {exc}") from None
        digest = _blob.manifest_digest(size, chunk_size, table)
        if digest != self.info.sha256:
            raise WeightsStreamError(
                f"weights v{self.info.version} at {self.endpoint} have digest {digest}, the announcement says "
                f"{self.info.sha256} (a restarted learner re-used the version number?)"
            )
        return _Meta(size, chunk_size, n_chunks, checksums)

    def _chunk(self, meta: _Meta, frames: list[zmq.Frame], index: int) -> Any:
        """The chunk's bytes if its length and checksum match the table, else None."""
        if len(frames) != 2:
            return None
        buf = frames[1].buffer
        expected = min(meta.chunk_size, meta.size - index * meta.chunk_size)
        if len(buf) != expected or _blob.chunk_checksum(buf) != meta.checksums[index]:
            return None
        return buf

    def chunks(self, meta: _Meta, window: int) -> np.ndarray:
        """Pull every chunk with ``window`` requests in flight into one buffer; return it once every chunk passed."""
        blob = np.empty(meta.size, dtype=np.uint8)  # not zero-filled: each byte is written by a verified chunk
        attempts = [0] * meta.n_chunks
        in_flight: dict[int, float] = {}  # index → monotonic time sent
        next_index, done = 0, 0
        while done < meta.n_chunks:
            next_index = self._fill(in_flight, next_index, meta.n_chunks, window)
            done += self._step(meta, blob, attempts, in_flight)
        self.stats.bytes, self.stats.chunks = meta.size, meta.n_chunks
        return blob

    def _fill(self, in_flight: dict[int, float], next_index: int, n_chunks: int, window: int) -> int:
        while len(in_flight) < window and next_index < n_chunks:
            self._send("chunk", index=next_index)
            in_flight[next_index] = time.monotonic()
            next_index += 1
        return next_index

    def _step(self, meta: _Meta, blob: np.ndarray, attempts: list[int], in_flight: dict[int, float]) -> int:
        """Wait for one reply (or resend what timed out); return 1 if a chunk was verified and stored."""
        reply = self._recv(min(in_flight.values()) + self.timeout_s)
        if reply is None:
            now = time.monotonic()
            for index in [i for i, t in in_flight.items() if now - t >= self.timeout_s]:
                self._resend(index, attempts, in_flight, corrupt=False)
            return 0
        msg, frames = reply
        index = msg.get("index")
        if msg.get("op") != "chunk" or msg.get("version") != self.info.version or not _in(index, in_flight):
            self.stats.duplicates += 1  # a late reply to a request already satisfied: never written
            return 0
        buf = self._chunk(meta, frames, index)
        if buf is None:
            self._resend(index, attempts, in_flight, corrupt=True)
            return 0
        start = index * meta.chunk_size
        blob[start : start + len(buf)] = np.frombuffer(buf, dtype=np.uint8)  # the frame is released after this
        del in_flight[index]
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
