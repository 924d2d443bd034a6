"""How a wire message becomes ZeroMQ frames and back (:mod:`editrl.common.wire` defines the messages and the limits).

``encode`` packs a message dataclass into a MessagePack metadata frame plus one raw frame per array or blob;
``decode`` validates everything before building the message: frame count and sizes, protocol version, message type,
unknown or missing fields, field types, the dtype whitelist, ``prod(shape) * itemsize == len(frame)``, finite floats,
MessagePack ext types, size limits and, for a ``RolloutGroup`` and a ``Batch``, that their shapes agree. A field with
a default is left out when it holds the default and filled in when absent (how a message grows a field compatibly,
see :mod:`editrl.common.wire`); every other field is required. A bad message raises
:class:`~editrl.common.wire.WireError` with a short ``reason`` the receiver counts; it never crashes the process.
``encode_record`` / ``decode_record`` store a message's frames as one byte string (the replay's LMDB values and the
groups of a ``Batch``). No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from typing import Any

import msgpack
import numpy as np

from editrl.common.wire import (
    ALLOWED_DTYPES,
    FAMILIES,
    ID_FIELDS,
    LOG_PROB_DTYPES,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_ID_BYTES,
    MAX_META_BYTES,
    MAX_NDIM,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Batch,
    RolloutGroup,
    WireError,
)

_HINTS: dict[type, dict[str, Any]] = {cls: typing.get_type_hints(cls) for cls in MESSAGE_TYPES.values()}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


# Per message type: the fields that have a default (may be absent on the wire) and that default.
_DEFAULTS: dict[type, dict[str, Any]] = {
    cls: {f.name: _default_of(f) for f in dataclasses.fields(cls) if _default_of(f) is not dataclasses.MISSING}
    for cls in MESSAGE_TYPES.values()
}


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def encode(msg: Any) -> list[bytes | memoryview]:
    """Message dataclass → multipart frames (metadata first). Arrays are sent zero-copy as memoryviews."""
    if type(msg).__name__ not in MESSAGE_TYPES:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    frames: list[bytes | memoryview] = [b""]
    defaults = _DEFAULTS[type(msg)]
    fields = {
        f.name: _pack_value(getattr(msg, f.name), frames)
        for f in dataclasses.fields(msg)
        if f.name not in defaults or not _equal(getattr(msg, f.name), defaults[f.name])
    }
    meta = {"proto": PROTOCOL_VERSION, "type": type(msg).__name__, "fields": fields}
    frames[0] = msgpack.packb(meta, use_bin_type=True)
    return frames


def _equal(value: Any, default: Any) -> bool:
    """``value == default`` for plain values (an array is never a default)."""
    return not isinstance(value, np.ndarray) and type(value) is type(default) and value == default


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
    missing = set(hints) - set(fields) - set(_DEFAULTS[cls])
    if missing:
        raise WireError("missing_field", f"{cls.__name__}: {sorted(missing)[:5]}")
    used: set[int] = set()
    kwargs = {
        name: _unpack_value(fields[name], hints[name], raw, used, f"{cls.__name__}.{name}")
        for name in hints
        if name in fields
    }
    for name in ID_FIELDS.intersection(kwargs):
        value = kwargs[name]
        if not 0 < len(value.encode()) <= MAX_ID_BYTES:  # LMDB keys: an empty or 512-byte id would fail every commit
            raise WireError("bad_id", f"{cls.__name__}.{name}: must be 1..{MAX_ID_BYTES} bytes")
    if len(used) != len(raw) - 1:
        raise WireError("frame_count", f"{len(raw) - 1} payload frames, {len(used)} referenced")
    msg = cls(**kwargs)
    if cls is RolloutGroup:
        _check_group(msg)
    elif cls is Batch:
        _check_batch(msg)
    return msg


def _check_batch(b: Batch) -> None:
    """One reward list per group and, when gold is sent, one gold list per group of the same length as its rewards."""
    if len(b.rewards) != len(b.groups):
        raise WireError("bad_batch", f"{len(b.rewards)} reward lists for {len(b.groups)} groups")
    if b.gold and [len(g) for g in b.gold] != [len(r) for r in b.rewards]:
        raise WireError("bad_batch", "gold must be [] or one entry per edit of every group")


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
