"""Weights back to the actors without a shared file system: the learner serves each version in chunks over ZeroMQ.

Terms (the bytes and checksums are built in :mod:`editrl.common.weights.blob`)
- **blob**: one published version serialized as safetensors (the bytes ``safetensors.torch.save`` gives; never
  pickle), written in one pass that also checksums every chunk.
- **chunk**: ``blob[i * chunk_size : (i + 1) * chunk_size]``; its checksum (XXH3-64) is computed once, at publish.
- **manifest digest**: sha256 of (blob size, chunk size, the table of chunk checksums). It is the ``WeightsInfo.sha256``
  this transport announces through the broker (the file transport announces the file's own sha256 instead: the two
  differ for the same weights, and nothing compares them).
- **version**: the learner's weight version; strictly increasing per server (one version number, one blob).

Protocol 2 (one DEALER request → one reply; frame 0 is a MessagePack map; every request carries ``"proto": 2``)::

    {"proto": 2, "op": "meta", "version": v}  → {"ok": true, "op": "meta", "version", "size", "chunk_size",
                                                 "n_chunks", "kind"} + the checksum table as a raw second frame
                                                 (n_chunks big-endian uint64)
    {"proto": 2, "op": "chunk", "version": v, → {"ok": true, "op": "chunk", "version", "index"}
     "index": i}                                 + the chunk as a raw second frame (sent zero-copy)
    anything else                             → {"ok": false, "error": reason, "detail": text, "versions": [held]}

Protocol 1 sent a sha256 per chunk and announced the whole blob's sha256; a request with another ``proto`` (or none)
is refused with ``bad_protocol_version``, so a learner and an actor of different releases fail with that error
instead of with checksum failures.

Guarantees and failure model
- The server (:class:`WeightServer`, a thread in learner rank 0) keeps the last ``keep`` versions (default 2) in
  memory; publishing a new one evicts the oldest. A fetch of an evicted version fails with
  :class:`WeightsVersionGone` naming the versions held: the actor loads the latest announced version instead.
- The server thread never dies on a bad request: malformed MessagePack, unknown ops, wrong types, out-of-range
  indices and unknown versions are answered with an error and counted (``weights_stream/error_<reason>``). A request
  frame over :data:`MAX_REQUEST_BYTES` disconnects its peer (ZeroMQ ``MAXMSGSIZE``) without a reply.
- Replies are sent without blocking: past the high-water mark a reply is dropped and counted, and the client asks
  again after ``timeout_s``. One slow actor never stalls the others.
- :func:`~editrl.common.weights.stream_client.fetch_stream` (the actor side, in
  :mod:`editrl.common.weights.stream_client`) checks that the meta's checksum table hashes to the announced
  digest, keeps ``window`` chunk requests in flight and checks each chunk's length and XXH3-64 against that table as it
  arrives. A chunk that times out or fails its check is requested again, up to ``retries`` times. It returns only a
  fully verified state dict, never part of one: :class:`TimeoutError` (an ``OSError``) when the server does not
  answer, :class:`WeightsStreamError` (a ``ValueError``) when it answers wrongly,
  :class:`~editrl.common.security.HandshakeError` for a CURVE key problem. XXH3-64 catches accidental corruption;
  against an attacker on the network use CURVE, which authenticates every frame.
"""

from __future__ import annotations

import collections
import reprlib
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
import structlog
import torch
import zmq

from editrl.common import wire
from editrl.common.net import harden
from editrl.common.security import SecurityConfig, ServerWatch, secure_server
from editrl.common.weights.blob import blob_size, checksum_table, manifest_digest, serialize
from editrl.common.weights.file import publish_file
from editrl.common.wire import WeightsInfo

__all__ = [
    "CHUNK_BYTES",
    "FilePublisher",
    "WeightServer",
    "WeightsPublisher",
    "WeightsStreamError",
    "WeightsVersionGone",
    "payload_bytes",
]

STREAM_SCHEME = "stream://"
STREAM_PROTOCOL_VERSION = 2  # 2: XXH3-64 table + manifest digest (1: sha256 per chunk and of the blob)
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
    """Size in bytes of ``state_dict`` as the transports ship it (a safetensors blob), without serializing it."""
    return blob_size(state_dict)


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
    data: Any  # the safetensors bytes (a uint8 numpy array, or bytes)
    size: int
    chunk_size: int
    n_chunks: int
    checksum_table: bytes  # n_chunks big-endian uint64: each chunk's XXH3-64
    digest: str  # manifest digest = the announced WeightsInfo.sha256


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
    if "proto" not in req or _uint(req, "proto") != STREAM_PROTOCOL_VERSION:
        got = _short(req["proto"]) if "proto" in req else "none"
        raise wire.WireError("bad_protocol_version", f"got proto {got}, this server speaks {STREAM_PROTOCOL_VERSION}")
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
            self._auth = secure_server(self._sock, self._ctx, security, roles=False)  # no role authentication here
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
        data, checksums = serialize(state_dict, self.chunk_size)
        table = checksum_table(checksums)
        digest = manifest_digest(len(data), self.chunk_size, table)
        blob = _Blob(version, kind, data, len(data), self.chunk_size, len(checksums), table, digest)
        with self._lock:
            self._blobs[version] = blob
            while len(self._blobs) > self.keep:
                self._blobs.popitem(last=False)  # queued chunk frames keep their own reference to the bytes
        self.counters["weights_stream/published"] += 1
        self.log.info("weights_stream_published", version=version, kind=kind, bytes=blob.size, chunks=blob.n_chunks)
        return WeightsInfo(version=version, uri=self.uri, sha256=digest, kind=kind)

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
        if op == "meta":
            self.counters["weights_stream/meta_served"] += 1
            meta = {"ok": True, "op": "meta", "version": version, "size": blob.size, "kind": blob.kind,
                    "chunk_size": blob.chunk_size, "n_chunks": blob.n_chunks}  # fmt: skip
            return [msgpack.packb(meta), blob.checksum_table]
        if index >= blob.n_chunks:
            raise wire.WireError("bad_index", f"v{version} has chunks 0..{blob.n_chunks - 1}, got {index}")
        payload = self._chunk_bytes(blob, index)
        self.counters["weights_stream/chunks_served"] += 1
        self.counters["weights_stream/bytes_served"] += len(payload)
        return [msgpack.packb({"ok": True, "op": "chunk", "version": version, "index": index}), payload]

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


class WeightsPublisher(Protocol):
    """What the learner needs from a weight transport; actors read any of them with :func:`load_weights`."""

    def publish(self, version: int, state_dict: dict[str, torch.Tensor], kind: str) -> WeightsInfo: ...

    def close(self) -> None: ...


class FilePublisher:
    """The file transport behind the :class:`WeightsPublisher` interface (common/weights/file.py; shared file system)."""

    def __init__(self, weights_dir: str | Path) -> None:
        self.weights_dir = Path(weights_dir)

    def publish(self, version: int, state_dict: dict[str, torch.Tensor], kind: str) -> WeightsInfo:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return publish_file(self.weights_dir, version, state_dict, kind)

    def close(self) -> None:
        pass
