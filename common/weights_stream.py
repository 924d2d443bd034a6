"""Weights back to the actors without a shared file system: the learner serves each version in chunks over ZeroMQ.

Terms
- **blob**: one published version serialized with ``safetensors.torch.save`` (bytes; never pickle). Its sha256 is
  the ``WeightsInfo.sha256`` announced through the broker. The bytes are the ones ``publish_file`` writes for the same
  state dict, so both transports announce the same digest.
- **chunk**: ``blob[i * chunk_size : (i + 1) * chunk_size]``; its sha256 is computed once, at publish time.
- **version**: the learner's weight version; strictly increasing per server (one version number, one blob).

Protocol (one DEALER request → one reply; frame 0 is a MessagePack map; a request may add ``"proto": 1``)::

    {"op": "meta", "version": v}              → {"ok": true, "op": "meta", "version", "size", "chunk_size",
                                                 "n_chunks", "sha256", "kind"}
    {"op": "chunk", "version": v, "index": i} → {"ok": true, "op": "chunk", "version", "index", "sha256"}
                                                 + the chunk as a raw second frame
    anything else                             → {"ok": false, "error": reason, "detail": text, "versions": [held]}

Guarantees and failure model
- The server (:class:`WeightServer`, a thread in learner rank 0) keeps the last ``keep`` versions (default 2) in
  memory; publishing a new one evicts the oldest. A fetch of an evicted version fails with
  :class:`WeightsVersionGone` naming the versions held: the actor loads the latest announced version instead.
- The server thread never dies on a bad request: malformed MessagePack, unknown ops, wrong types, out-of-range
  indices and unknown versions are answered with an error and counted (``weights_stream/error_<reason>``). A request
  frame over :data:`MAX_REQUEST_BYTES` disconnects its peer (ZeroMQ ``MAXMSGSIZE``) without a reply.
- Replies are sent without blocking: past the high-water mark a reply is dropped and counted, and the client asks
  again after ``timeout_s``. One slow actor never stalls the others.
- :func:`fetch_stream` keeps ``window`` chunk requests in flight, checks each chunk's sha256 against the digest the
  server computed at publish time and the whole blob against ``info.sha256``. A chunk that times out or fails its
  checksum is requested again, up to ``retries`` times. It returns only a fully verified state dict, never part of
  one: :class:`TimeoutError` (an ``OSError``) when the server does not answer, :class:`WeightsStreamError` (a
  ``ValueError``) when it answers wrongly, :class:`~editrl.common.security.HandshakeError` for a CURVE key problem.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import queue
import reprlib
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import structlog
import torch
import zmq
from safetensors.torch import save as safetensors_save

from editrl.common import wire
from editrl.common.net import harden
from editrl.common.security import HandshakeWatch, SecurityConfig, ServerWatch, secure_client, secure_server
from editrl.common.weights import load_published, publish_file
from editrl.common.wire import WeightsInfo

__all__ = [
    "CHUNK_BYTES",
    "FetchStats",
    "FilePublisher",
    "WeightServer",
    "WeightsPublisher",
    "WeightsStreamError",
    "WeightsVersionGone",
    "fetch_stream",
    "load_weights",
    "payload_bytes",
]

STREAM_SCHEME = "stream://"
STREAM_PROTOCOL_VERSION = 1
KINDS = ("lora", "full")
DEFAULT_ENDPOINT = "tcp://127.0.0.1:0"  # port 0: a free port, read back from the socket
CHUNK_BYTES = 4 * 1024 * 1024
MIN_CHUNK_BYTES = 64
KEEP_VERSIONS = 2
WINDOW_CHUNKS = 8  # chunk requests in flight per fetch
FETCH_TIMEOUT_S = wire.REQUEST_TIMEOUT_S  # wait for one reply before asking again
FETCH_RETRIES = 3  # extra attempts per request (meta or chunk) before giving up
MAX_REQUEST_BYTES = 4096
MAX_REPLY_META_BYTES = 64 * 1024
SERVER_POLL_MS = 100  # the server thread checks its stop flag at least this often
_SHA256_HEX = 64

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 40, 40
_log = structlog.get_logger("editrl.weights_stream")


class WeightsStreamError(ValueError):
    """The weight server answered, but not with the announced weights (refusal, protocol mismatch, bad checksum)."""


class WeightsVersionGone(WeightsStreamError):
    """The server no longer holds (or never held) the requested version; ``held`` lists the versions it has."""

    def __init__(self, message: str, version: int, held: list[int]) -> None:
        super().__init__(message)
        self.version, self.held = version, held


def payload_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """Size in bytes of ``state_dict`` as the transports ship it (a safetensors blob). Serializes once (~1 s/GB)."""
    return len(_serialize(state_dict))


def _serialize(state_dict: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


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


def _sha256(data: Any) -> Any:
    """A sha256 object over ``data``. ``update`` releases the GIL on large buffers; the constructor (3.11) does not."""
    h = hashlib.sha256()
    h.update(data)
    return h


def _digests(blob: bytes, chunk_size: int) -> tuple[str, tuple[str, ...]]:
    """sha256 of the whole blob and of each chunk, in two threads."""
    view = memoryview(blob)
    whole = hashlib.sha256()
    worker = threading.Thread(target=whole.update, args=(view,))
    worker.start()
    chunks = tuple(_sha256(view[i : i + chunk_size]).hexdigest() for i in range(0, len(view), chunk_size))
    worker.join()
    return whole.hexdigest(), chunks


def _short(value: Any) -> str:
    return _REPR.repr(value)


def _reject_ext(code: int, data: bytes) -> Any:
    raise wire.WireError("ext_type", f"MessagePack ext type {code} not allowed")


def _unpack_map(raw: Any, limit: int) -> dict[Any, Any]:
    """Strict MessagePack → map (no ext types, bounded size). Raises WireError."""
    if len(raw) > limit:
        raise wire.WireError("too_large", f"{len(raw)} > {limit} bytes")
    try:
        msg = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_reject_ext)
    except wire.WireError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise wire.WireError("bad_msgpack", type(exc).__name__) from None
    if not isinstance(msg, dict):
        raise wire.WireError("bad_request", f"expected a map, got {type(msg).__name__}")
    return msg


def _in(index: Any, in_flight: dict[int, float]) -> bool:
    return isinstance(index, int) and not isinstance(index, bool) and index in in_flight


def _uint(msg: dict[Any, Any], key: str) -> int:
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise wire.WireError("wrong_type", f"{key} must be a non-negative int, got {_short(value)}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Server (learner rank 0)


@dataclass(frozen=True)
class _Blob:
    version: int
    kind: str
    data: bytes
    sha256: str
    chunk_size: int
    chunk_sha256: tuple[str, ...]


_REQUEST_FIELDS = {"meta": {"op", "version"}, "chunk": {"op", "version", "index"}}


def _parse_request(frames: list[bytes]) -> tuple[str, int, int]:
    """Request frames (routing id removed) → (op, version, index). Raises WireError with a short reason."""
    if len(frames) != 1:
        raise wire.WireError("frame_count", f"expected 1 frame, got {len(frames)}")
    req = _unpack_map(frames[0], MAX_REQUEST_BYTES)
    op = req.get("op")
    fields = _REQUEST_FIELDS.get(op) if isinstance(op, str) else None
    if fields is None:
        raise wire.WireError("unknown_op", f"op must be 'meta' or 'chunk', got {_short(op)}")
    if set(req) - {"proto"} != fields:
        raise wire.WireError("bad_fields", f"{op} takes {sorted(fields)}, got {sorted(_short(k) for k in req)[:6]}")
    if "proto" in req and _uint(req, "proto") != STREAM_PROTOCOL_VERSION:
        raise wire.WireError("bad_protocol_version", f"got {req['proto']}, speak {STREAM_PROTOCOL_VERSION}")
    return op, _uint(req, "version"), _uint(req, "index") if op == "chunk" else -1


class WeightServer:
    """Serves published weight versions to actors from a background thread with its own ROUTER socket.

    ``endpoint`` is bound at construction (``tcp://HOST:0`` picks a free port); announced uris are
    ``stream://<advertise_host or the bound host>:<port>``. Bind a routable address (or ``tcp://0.0.0.0:PORT`` with
    ``advertise_host``) when actors run on other hosts. With ``security.curve`` the socket is a CURVE server
    (``security`` is then a server-role config: server key pair + client allowlist, see common/security.py).
    Thread-safety: :meth:`publish` may be called from any one thread; the socket is used only by the server thread.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        security: SecurityConfig | None = None,
        chunk_size: int = CHUNK_BYTES,
        keep: int = KEEP_VERSIONS,
        advertise_host: str | None = None,
        log: Any = None,
    ) -> None:
        if not endpoint.startswith("tcp://") or ":" not in endpoint[len("tcp://") :]:
            raise ValueError(f"endpoint must be tcp://HOST:PORT (PORT 0 = any free port), got {endpoint!r}")
        if not MIN_CHUNK_BYTES <= chunk_size <= wire.MAX_FRAME_BYTES:
            raise ValueError(f"chunk_size must be in [{MIN_CHUNK_BYTES}, {wire.MAX_FRAME_BYTES}], got {chunk_size}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (versions held in memory), got {keep}")
        self.chunk_size, self.keep = chunk_size, keep
        self.log = log if log is not None else _log
        self.counters: collections.Counter[str] = collections.Counter()
        self._blobs: OrderedDict[int, _Blob] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        security = security or SecurityConfig()
        self._ctx = zmq.Context()
        self._sock = harden(self._ctx.socket(zmq.ROUTER))
        self._auth = None
        self._watch: ServerWatch | None = None
        try:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)  # requests are tiny; a flood disconnects
            self._auth = secure_server(self._sock, self._ctx, security)
            if security.curve:
                self._watch = ServerWatch(self._sock, self._auth)
            self._sock.bind(endpoint)
        except BaseException:
            self._close_socket()
            raise
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        bound_host, port = self.endpoint[len("tcp://") :].rsplit(":", 1)
        host = advertise_host or (socket.gethostname() if bound_host in ("0.0.0.0", "[::]", "*") else bound_host)
        self.uri = f"{STREAM_SCHEME}{host}:{port}"
        self._thread = threading.Thread(target=self._run, name="editrl-weight-server", daemon=True)
        self._thread.start()
        self.log.info("weight_server_started", endpoint=self.endpoint, uri=self.uri, curve=security.curve)

    # -- learner side --------------------------------------------------------------------------------------------

    def publish(self, version: int, state_dict: dict[str, torch.Tensor], kind: str) -> WeightsInfo:
        """Serialize ``state_dict`` (safetensors), hold it as ``version``, evict past ``keep``; return its WeightsInfo.

        Raises ValueError for an unknown ``kind`` or a version not above the latest published one, RuntimeError if the
        server thread is not running.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not self.alive:
            raise RuntimeError("the weight server thread is not running (closed or crashed); see its log")
        latest = self.versions()[-1:] or [-1]
        if version <= latest[0]:
            raise ValueError(f"version must increase: got {version}, latest published is {latest[0]}")
        data = _serialize(state_dict)
        sha256, chunk_sha256 = _digests(data, self.chunk_size)
        blob = _Blob(version, kind, data, sha256, self.chunk_size, chunk_sha256)
        with self._lock:
            self._blobs[version] = blob
            while len(self._blobs) > self.keep:
                self._blobs.popitem(last=False)  # queued chunk frames keep their own reference to the bytes
        self.counters["weights_stream/published"] += 1
        self.log.info("weights_stream_published", version=version, kind=kind, bytes=len(data), chunks=len(chunk_sha256))
        return WeightsInfo(version=version, uri=self.uri, sha256=sha256, kind=kind)

    def versions(self) -> list[int]:
        with self._lock:
            return list(self._blobs)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def errors(self) -> int:
        """Bad requests answered with an error since start."""
        return self.counters["weights_stream/errors"]

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, close the socket and the context (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.log.warning("weight_server_stop_timeout", timeout_s=timeout_s)
            return
        if not self._ctx.closed:
            self._close_socket()
            self.log.info("weight_server_stopped", counters=dict(self.counters))

    def __enter__(self) -> WeightServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- server thread -------------------------------------------------------------------------------------------

    def _close_socket(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()  # only after the socket is closed (common/security.py)
        self._ctx.term()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._watch is not None:
                    for message in self._watch.poll():
                        self.log.warning("weight_server_handshake_rejected", detail=message)
                if not self._sock.poll(SERVER_POLL_MS):
                    continue
                for _ in range(64):  # drain what is queued, then look at the stop flag again
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._serve(frames)
        except Exception:  # the socket itself failed: log it; publish() then raises (alive is False)
            self.log.exception("weight_server_crashed")
        finally:
            self._stop.set()

    def _serve(self, frames: list[bytes]) -> None:
        identity = frames[0]
        try:
            reply = self._handle(frames[1:])
        except wire.WireError as exc:
            reply = self._error_reply(exc.reason, str(exc).removeprefix(f"{exc.reason}: "))
        except Exception as exc:  # a bug in a handler must not stop the weight server
            self.log.exception("weight_server_handler_failed")
            reply = self._error_reply("internal", type(exc).__name__)
        try:
            self._sock.send_multipart([identity, *reply], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.counters["weights_stream/reply_dropped_hwm"] += 1  # the client asks again after its timeout
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer left (ROUTER_MANDATORY); nothing else is expected
            reason = "reply_peer_gone" if exc.errno == zmq.EHOSTUNREACH else "reply_failed"
            self.counters[f"weights_stream/{reason}"] += 1
            if reason == "reply_failed":
                self.log.warning("weight_server_send_failed", error=str(exc))

    def _handle(self, frames: list[bytes]) -> list[Any]:
        op, version, index = _parse_request(frames)
        with self._lock:
            blob = self._blobs.get(version)
            held = list(self._blobs)
        if blob is None:
            raise wire.WireError("unknown_version", f"v{version} is not held (evicted or never published); held {held}")
        n_chunks = len(blob.chunk_sha256)
        if op == "meta":
            self.counters["weights_stream/meta_served"] += 1
            meta = {"ok": True, "op": "meta", "version": version, "size": len(blob.data), "kind": blob.kind,
                    "chunk_size": blob.chunk_size, "n_chunks": n_chunks, "sha256": blob.sha256}  # fmt: skip
            return [msgpack.packb(meta)]
        if index >= n_chunks:
            raise wire.WireError("bad_index", f"v{version} has chunks 0..{n_chunks - 1}, got {index}")
        payload = self._chunk_bytes(blob, index)
        self.counters["weights_stream/chunks_served"] += 1
        self.counters["weights_stream/bytes_served"] += len(payload)
        meta = {"ok": True, "op": "chunk", "version": version, "index": index, "sha256": blob.chunk_sha256[index]}
        return [msgpack.packb(meta), payload]

    def _chunk_bytes(self, blob: _Blob, index: int) -> memoryview:
        """The bytes of one chunk, zero-copy (tests replace this to inject corruption)."""
        return memoryview(blob.data)[index * blob.chunk_size : (index + 1) * blob.chunk_size]

    def _error_reply(self, reason: str, detail: str) -> list[Any]:
        self.counters["weights_stream/errors"] += 1
        self.counters[f"weights_stream/error_{reason}"] += 1
        if self.counters[f"weights_stream/error_{reason}"] == 1:  # first of each kind; the counters hold the rest
            self.log.warning("weight_server_bad_request", reason=reason, detail=detail[:200])
        return [msgpack.packb({"ok": False, "error": reason, "detail": detail, "versions": self.versions()})]


# ----------------------------------------------------------------------------------------------------------------
# Client (actor)


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
                 timeout_s: float, retries: int, stats: FetchStats) -> None:  # fmt: skip
        self.sock, self.watch, self.info, self.endpoint = sock, watch, info, endpoint
        self.timeout_s, self.retries, self.stats = timeout_s, retries, stats

    def _send(self, op: str, **fields: int) -> None:
        req = {"proto": STREAM_PROTOCOL_VERSION, "op": op, "version": self.info.version, **fields}
        self.sock.send(msgpack.packb(req))

    def _recv(self, deadline: float) -> tuple[dict[Any, Any], list[zmq.Frame]] | None:
        """The next reply before ``deadline`` (monotonic), or None. Raises on an error reply or a malformed one."""
        while (remaining := deadline - time.monotonic()) > 0:
            self.watch.check()  # a rejected CURVE key raises HandshakeError instead of timing out
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
) -> dict[str, torch.Tensor]:
    """Pull version ``info.version`` from the weight server at ``info.uri`` and return its tensors.

    Each request waits up to ``timeout_s`` for its reply and is sent again up to ``retries`` times, so an
    unreachable server raises TimeoutError after about ``(retries + 1) * timeout_s``. See the module docstring for
    the other errors. ``security`` is this actor's client config (the weight server's public key is
    ``security.server_public_key``).
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
        puller = _Puller(sock, watch, info, endpoint, timeout_s, retries, stats)
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


class WeightsPublisher(Protocol):
    """What the learner needs from a weight transport; actors read any of them with :func:`load_weights`."""

    def publish(self, version: int, state_dict: dict[str, torch.Tensor], kind: str) -> WeightsInfo: ...

    def close(self) -> None: ...


class FilePublisher:
    """The file transport behind the :class:`WeightsPublisher` interface (common/weights.py; shared file system)."""

    def __init__(self, weights_dir: str | Path) -> None:
        self.weights_dir = Path(weights_dir)

    def publish(self, version: int, state_dict: dict[str, torch.Tensor], kind: str) -> WeightsInfo:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return publish_file(self.weights_dir, version, state_dict, kind)

    def close(self) -> None:
        pass
