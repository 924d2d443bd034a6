"""Every message editrl sends, its encoding and its limits — the whole wire protocol in one module.

A message is one ZeroMQ multipart message: frame 0 is a MessagePack map (the *metadata*), frames 1.. are raw
payloads — one frame per array or byte blob (PNG images, tensors), referenced from the metadata by index, so
large payloads are never copied through MessagePack and the receiver wraps them with ``np.frombuffer``.

Metadata layout::

    {"proto": PROTOCOL_VERSION, "type": "<MessageName>", "fields": {name: value, ...}}

where an array field's value is ``{"$nd": frame_index, "dtype": "float32", "shape": [..]}`` and a blob field's
value is ``{"$b": frame_index}``. Lists and string-keyed dicts of arrays/blobs nest the same placeholders.

Decoding is strict (failure model: a bad message raises :class:`WireError` with a short ``reason`` the receiver
counts and logs; it never crashes the process): frame count and sizes, protocol version, message type, unknown or
missing fields, field types, the dtype whitelist, ``prod(shape) * itemsize == len(frame)``, finite floats,
MessagePack ext types and size limits are all checked. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

FAMILIES = ("flow", "ddim", "ar")  # editor families (see editrl.common.families.base)
PROTOCOL_VERSION = 2  # 2: family-agnostic RolloutGroup (family, traj, params)

# Safety limits: the single source of truth; tests import these instead of repeating numbers.
MAX_FRAME_BYTES = 256 * 1024 * 1024  # one raw frame (ZeroMQ MAXMSGSIZE is set to this on every socket)
MAX_META_BYTES = 1024 * 1024  # the MessagePack metadata frame
MAX_FRAMES = 4096  # frames per message
MAX_NDIM = 6
MAX_ID_BYTES = 128  # request/group/lease/job/task/actor/worker ids
ID_FIELDS = frozenset({"request_id", "group_id", "lease_id", "job_id", "task_id", "actor_id", "worker_id"})
ALLOWED_DTYPES = frozenset({"float32", "float64", "float16", "int64", "int32", "uint8", "bool"})
LOG_PROB_DTYPES = ("float32", "float64")  # float64 only from a policy.dtype: float64 (reference-precision) actor

# Liveness and deadlines (seconds).
HEARTBEAT_INTERVAL_S = 1.0
SCORER_LIVENESS_S = 5.0  # a scorer silent this long is dead; its job is requeued
SCORE_JOB_DEADLINE_S = 60.0  # a job not answered in this time is requeued (the scorer heartbeats but is stuck)
QUARANTINE_AFTER_MISSES = 2  # a scorer that missed this many deadlines gets no more jobs
LEASE_TIMEOUT_S = 300.0  # an actor that holds a lease this long without sending its group loses it
REQUEST_TIMEOUT_S = 5.0  # client-side wait for a broker reply before resending the same message (same ids)
STORAGE_RETRY_S = 1.0  # after a failed LMDB commit, clients are told to retry after this long


class WireError(ValueError):
    """A message that cannot be accepted. ``reason`` is a short stable key used for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# Message types. Field annotations drive validation: int, float, str, bool, bytes (a raw frame), np.ndarray (a raw
# frame), list[...] and dict[str, ...] of those, and Optional (``X | None``).


@dataclass
class LeaseRequest:
    """actor → broker: ask for the next task. Answered by Lease or Wait."""

    actor_id: str
    request_id: str


@dataclass
class WeightsInfo:
    """Latest published policy weights (version 0 = the base model; ``uri`` empty)."""

    version: int
    uri: str
    sha256: str
    kind: str  # "lora" | "full"


@dataclass
class Lease:
    """broker → actor: generate one group for this task with at least ``weights.version``."""

    request_id: str
    lease_id: str
    task_id: str
    instruction: str
    task_type: str
    input_images: list[str]
    weights: dict[str, Any]  # WeightsInfo as a dict (nested messages travel as plain maps)


@dataclass
class Wait:
    """broker → client: nothing to hand out now (admission control or empty replay); retry after a pause."""

    request_id: str
    retry_after_s: float
    reason: str
    weights: dict[str, Any]


@dataclass
class RolloutGroup:
    """actor → broker: G edits of one (instruction, source image) with what the learner needs to recompute log-probs.

    Family-agnostic (see :mod:`editrl.common.families.base`): ``traj`` holds per-sample arrays with a leading G axis
    (flow/ddim latents, AR tokens, an optional ``unit_mask``), ``log_probs`` the behaviour log-prob of each of the
    S trained units, ``cond`` the per-group conditioning stored once, ``params`` the plain sampler settings.
    """

    request_id: str
    group_id: str
    lease_id: str
    task_id: str
    actor_id: str
    policy_version: int
    instruction: str
    task_type: str
    source_png: bytes
    edit_pngs: list[bytes]  # G PNG images
    family: str  # "flow" | "ddim" | "ar": which recompute the learner applies
    traj: dict[str, np.ndarray]  # per-sample arrays, leading axis G
    log_probs: np.ndarray  # [G, S] float32 behaviour log-probs of the trained units, computed on the stored tensors
    cond: dict[str, np.ndarray]  # per-group arrays (conditioning, schedule)
    params: dict[str, Any]  # plain sampler settings (numbers, strings)


@dataclass
class SkipTask:
    """actor → broker: the task could not be run (e.g. its source image is missing); the lease is released."""

    request_id: str
    lease_id: str
    task_id: str
    actor_id: str
    reason: str


@dataclass
class Ack:
    """broker → client: the request was durably handled (for RolloutGroup: committed to LMDB)."""

    request_id: str
    ok: bool
    detail: str
    weights: dict[str, Any]


@dataclass
class ScorerReady:
    """scorer → broker: announce (and re-announce after each result) that this worker takes ``capacity`` jobs."""

    worker_id: str
    service: str
    capacity: int


@dataclass
class Heartbeat:
    """any worker → broker: still alive."""

    worker_id: str


@dataclass
class ScoreJob:
    """broker → scorer: score every edit of one group."""

    job_id: str
    group_id: str
    instruction: str
    task_type: str
    source_png: bytes
    edit_pngs: list[bytes]


@dataclass
class ScoreResult:
    """scorer → broker: one entry per edit, same order. ``overall`` is None for an unscored edit (never invented)."""

    job_id: str
    group_id: str
    worker_id: str
    scored: list[bool]
    overall: list[float | None]
    sub_scores: list[dict[str, float]]
    reasoning: list[str]


@dataclass
class CheckGroup:
    """client → broker: score these edits through the live scorer pool WITHOUT storing them (``editrl check``)."""

    request_id: str
    group_id: str
    instruction: str
    task_type: str
    source_png: bytes
    edit_pngs: list[bytes]


@dataclass
class CheckResult:
    """broker → client: the scorer's answer for a CheckGroup, one entry per edit, in order."""

    request_id: str
    group_id: str
    worker_id: str
    scored: list[bool]
    overall: list[float | None]
    sub_scores: list[dict[str, float]]
    reasoning: list[str]


@dataclass
class SampleRequest:
    """learner rank → broker: up to ``max_groups`` complete scored groups no older than ``min_version`` for training
    step ``step``, of which the rank already holds ``offset``.

    The broker records which groups it handed to (rank, step). A learner resumed from a checkpoint asks again for
    the steps after it and gets the SAME groups back (from ``offset``), so no group is trained twice in the model's
    lineage and none is skipped by the resume.
    """

    request_id: str
    rank: int
    step: int
    offset: int
    max_groups: int
    min_version: int


@dataclass
class Batch:
    """broker → learner: complete scored groups, each as the stored RolloutGroup frames plus its rewards."""

    request_id: str
    groups: list[bytes]  # each an encoded RolloutGroup (see encode_record / decode_record)
    rewards: list[list[float]]  # [n_groups][G] overall reward
    dropped_stale: int


@dataclass
class PublishWeights:
    """learner → broker: a new weight version is fully written (DONE marker present) at ``weights.uri``."""

    request_id: str
    learner_step: int
    weights: dict[str, Any]


@dataclass
class StatusRequest:
    request_id: str


@dataclass
class Status:
    request_id: str
    counters: dict[str, int]
    weights: dict[str, Any]
    processes: list[dict[str, Any]]  # one row per process the broker heard from (see editrl.broker.processes)


MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        LeaseRequest,
        Lease,
        Wait,
        RolloutGroup,
        SkipTask,
        Ack,
        ScorerReady,
        Heartbeat,
        ScoreJob,
        ScoreResult,
        CheckGroup,
        CheckResult,
        SampleRequest,
        Batch,
        PublishWeights,
        StatusRequest,
        Status,
    )
}
_HINTS: dict[type, dict[str, Any]] = {cls: typing.get_type_hints(cls) for cls in MESSAGE_TYPES.values()}


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def encode(msg: Any) -> list[bytes | memoryview]:
    """Message dataclass → multipart frames (metadata first). Arrays are sent zero-copy as memoryviews."""
    if type(msg).__name__ not in MESSAGE_TYPES:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    frames: list[bytes | memoryview] = [b""]
    fields = {f.name: _pack_value(getattr(msg, f.name), frames) for f in dataclasses.fields(msg)}
    meta = {"proto": PROTOCOL_VERSION, "type": type(msg).__name__, "fields": fields}
    frames[0] = msgpack.packb(meta, use_bin_type=True)
    return frames


def _pack_value(value: Any, frames: list[bytes | memoryview]) -> Any:
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise TypeError(f"dtype {arr.dtype.name} not allowed on the wire")
        frames.append(memoryview(arr).cast("B") if arr.size else b"")
        return {"$nd": len(frames) - 1, "dtype": arr.dtype.name, "shape": list(arr.shape)}
    if isinstance(value, bytes | bytearray | memoryview):
        frames.append(value)
        return {"$b": len(frames) - 1}
    if isinstance(value, list | tuple):
        return [_pack_value(v, frames) for v in value]
    if isinstance(value, dict):
        return {str(k): _pack_value(v, frames) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def decode(frames: list[bytes] | list[Any]) -> Any:
    """Multipart frames → message dataclass, fully validated. Raises WireError."""
    try:
        return _decode(frames)
    except RecursionError:
        raise WireError("too_deep", "nesting exceeds the decoder's recursion limit") from None


def _decode(frames: list[bytes] | list[Any]) -> Any:
    if not frames:
        raise WireError("empty", "no frames")
    if len(frames) > MAX_FRAMES:
        raise WireError("too_many_frames", f"{len(frames)} > {MAX_FRAMES}")
    raw = [f.buffer if hasattr(f, "buffer") else f for f in frames]  # zmq.Frame → zero-copy view
    meta_bytes = raw[0]
    if not isinstance(meta_bytes, bytes | bytearray | memoryview) or len(meta_bytes) > MAX_META_BYTES:
        raise WireError("meta_too_large", f"{len(meta_bytes)} bytes")
    for f in raw[1:]:
        if len(f) > MAX_FRAME_BYTES:
            raise WireError("frame_too_large", f"{len(f)} > {MAX_FRAME_BYTES}")
    try:
        meta = msgpack.unpackb(
            meta_bytes,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
        )
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError("bad_msgpack", type(exc).__name__) from None
    if not isinstance(meta, dict) or set(meta) != {"proto", "type", "fields"}:
        raise WireError("bad_envelope", "expected keys proto, type, fields")
    proto = meta["proto"]
    if not isinstance(proto, int) or isinstance(proto, bool) or proto != PROTOCOL_VERSION:
        raise WireError("bad_protocol_version", f"got {_short(proto)}, speak {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(meta["type"]) if isinstance(meta["type"], str) else None
    if cls is None:
        raise WireError("unknown_type", _short(meta["type"]))
    fields = meta["fields"]
    if not isinstance(fields, dict):
        raise WireError("bad_fields", "fields must be a map")
    hints = _HINTS[cls]
    unknown = set(fields) - set(hints)
    if unknown:
        raise WireError("unknown_field", f"{cls.__name__}: {sorted(_short(k) for k in unknown)[:5]}")
    missing = set(hints) - set(fields)
    if missing:
        raise WireError("missing_field", f"{cls.__name__}: {sorted(missing)[:5]}")
    used: set[int] = set()
    kwargs = {name: _unpack_value(fields[name], hints[name], raw, used, f"{cls.__name__}.{name}") for name in hints}
    for name in ID_FIELDS.intersection(kwargs):
        value = kwargs[name]
        if not 0 < len(value.encode()) <= MAX_ID_BYTES:  # LMDB keys: an empty or 512-byte id would fail every commit
            raise WireError("bad_id", f"{cls.__name__}.{name}: must be 1..{MAX_ID_BYTES} bytes")
    if len(used) != len(raw) - 1:
        raise WireError("frame_count", f"{len(raw) - 1} payload frames, {len(used)} referenced")
    msg = cls(**kwargs)
    if cls is RolloutGroup:
        _check_group(msg)
    return msg


def _check_group(g: RolloutGroup) -> None:
    """Shapes that must agree inside a rollout: G edits, [G, S] float32 (or float64) log-probs, every traj array
    led by G."""
    if g.family not in FAMILIES:
        raise WireError("bad_group", f"family {_short(g.family)} not in {FAMILIES}")
    n = len(g.edit_pngs)
    lp = g.log_probs
    if lp.ndim != 2 or lp.dtype.name not in LOG_PROB_DTYPES or lp.shape[0] != n or lp.shape[1] < 1:
        raise WireError("bad_group", f"log_probs must be [G={n}, S>=1] float32, got {list(lp.shape)} {lp.dtype}")
    for name, value in g.traj.items():
        if value.ndim == 0 or value.shape[0] != n:
            raise WireError("bad_group", f"traj.{_short(name)}: leading axis must be G={n}, got {list(value.shape)}")
    mask = g.traj.get("unit_mask")
    if mask is not None and mask.shape != lp.shape:
        raise WireError("bad_group", f"traj.unit_mask must be {list(lp.shape)}, got {list(mask.shape)}")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 40, 40


def _short(value: Any) -> str:
    """A bounded repr for error messages: attacker-controlled values may be nested ~1000 deep."""
    return _REPR.repr(value)


def _reject_ext(code: int, data: bytes) -> Any:
    raise WireError("ext_type", f"MessagePack ext type {code} not allowed")


def _frame(raw: list[Any], index: Any, used: set[int], where: str) -> bytes:
    if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index < len(raw) or index in used:
        raise WireError("bad_frame_ref", where)
    used.add(index)
    return raw[index]


def _unpack_value(value: Any, hint: Any, raw: list[Any], used: set[int], where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _unpack_value(value, inner, raw, used, where)
    if hint is Any:
        return _check_plain(value, where, depth=0)
    if hint is np.ndarray:
        return _unpack_array(value, raw, used, where)
    if hint is bytes:
        if not isinstance(value, dict) or set(value) != {"$b"}:
            raise WireError("wrong_type", f"{where}: expected blob")
        return bytes(_frame(raw, value["$b"], used, where))
    if origin is list:
        if not isinstance(value, list):
            raise WireError("wrong_type", f"{where}: expected list")
        (item,) = typing.get_args(hint)
        return [_unpack_value(v, item, raw, used, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise WireError("wrong_type", f"{where}: expected a map with string keys")
        _, item = typing.get_args(hint)
        return {k: _unpack_value(v, item, raw, used, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError("wrong_type", f"{where}: expected float")
        if not math.isfinite(value):
            raise WireError("non_finite", where)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError("wrong_type", f"{where}: expected int")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise WireError("wrong_type", f"{where}: expected {hint.__name__}")
        return value
    raise WireError("unsupported_field", where)


def _check_plain(value: Any, where: str, depth: int) -> Any:
    """Free-form metadata (``dict[str, Any]``): plain scalars, lists and maps only, finite, shallow."""
    if depth > 8:
        raise WireError("too_deep", where)
    if isinstance(value, float) and not math.isfinite(value):
        raise WireError("non_finite", where)
    if isinstance(value, list):
        return [_check_plain(v, where, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise WireError("wrong_type", f"{where}: map keys must be strings")
        if "$nd" in value or "$b" in value:
            raise WireError("wrong_type", f"{where}: payload reference in plain field")
        return {k: _check_plain(v, where, depth + 1) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise WireError("wrong_type", f"{where}: {type(value).__name__}")


def _unpack_array(value: Any, raw: list[Any], used: set[int], where: str) -> np.ndarray:
    if not isinstance(value, dict) or set(value) != {"$nd", "dtype", "shape"}:
        raise WireError("wrong_type", f"{where}: expected array")
    dtype, shape = value["dtype"], value["shape"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise WireError("bad_dtype", f"{where}: {_short(dtype)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_FRAME_BYTES for d in shape)
    ):
        raise WireError("bad_shape", where)
    buf = _frame(raw, value["$nd"], used, where)
    itemsize = np.dtype(dtype).itemsize
    if math.prod(shape) * itemsize != len(buf):
        raise WireError("shape_mismatch", f"{where}: shape {shape} x {itemsize} != {len(buf)} bytes")
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise WireError("non_finite", where)
    return arr


# ----------------------------------------------------------------------------------------------------------------
# Storage records: a message's frames stored as one length-prefixed byte string (LMDB values).


def encode_record(frames: list[Any]) -> bytes:
    """Frames → one byte string: u32 count, then (u64 length, bytes) per frame."""
    parts = [len(frames).to_bytes(4, "little")]
    for f in frames:
        b = f.bytes if hasattr(f, "bytes") else bytes(f)
        parts.append(len(b).to_bytes(8, "little"))
        parts.append(b)
    return b"".join(parts)


def decode_record(record: bytes | memoryview) -> list[memoryview]:
    """Inverse of encode_record (zero-copy views). Raises WireError on a truncated or inconsistent record."""
    view = memoryview(record)
    if len(view) < 4:
        raise WireError("bad_record", "truncated header")
    count = int.from_bytes(view[:4], "little")
    if count > MAX_FRAMES:
        raise WireError("bad_record", "frame count")
    out, pos = [], 4
    for _ in range(count):
        if pos + 8 > len(view):
            raise WireError("bad_record", "truncated length")
        n = int.from_bytes(view[pos : pos + 8], "little")
        pos += 8
        if pos + n > len(view):
            raise WireError("bad_record", "truncated frame")
        out.append(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise WireError("bad_record", "trailing bytes")
    return out


def weights_dict(info: WeightsInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def weights_from_dict(d: dict[str, Any]) -> WeightsInfo:
    try:
        return WeightsInfo(version=int(d["version"]), uri=str(d["uri"]), sha256=str(d["sha256"]), kind=str(d["kind"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError("bad_weights_info", str(exc)) from None
