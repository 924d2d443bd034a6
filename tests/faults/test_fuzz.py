"""Fuzz the real broker process with >10,000 malformed messages: it must reject and count every one, log each
reason once, keep serving valid requests and stop cleanly on SIGTERM.

Every malformed message is first decoded in this process (``codec.decode`` is the oracle): it must raise
``WireError`` — its ``reason`` is the counter the broker must bump — or be a valid broker→client message, which the
broker rejects as ``unexpected_type``. Anything the decoder accepts or crashes on is reported as a finding.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import yaml
import zmq
from zmq.utils.monitor import recv_monitor_message

from editrl.common import codec, wire
from editrl.common.config import load_config
from editrl.common.net import harden
from editrl.common.security import secure_client
from editrl.common.tasks import make_quickstart_tasks

from ..integration.conftest import free_port

pytestmark = pytest.mark.faults

SEED = 1234
N_MESSAGES = 10_500  # malformed messages sent, at least
CHUNK = 250  # messages sent between two status round trips (far below the sockets' HWM)
N_FUZZ_SOCKETS = 4
N_OVERSIZED_FRAMES = 2  # each on its own throwaway socket: ZeroMQ drops the message and disconnects the peer

# Message types a client may send, each fuzzed field by field (a valid one of each is never sent).
FUZZ_TYPES = [
    t
    for t in (
        "RolloutGroup", "LeaseRequest", "ScoreResult", "SampleRequest", "PublishWeights", "SkipTask", "ScorerReady",
        "Heartbeat", "StatusRequest",
    )
    if t in wire.MESSAGE_TYPES
]  # fmt: skip
SEMANTIC = {"bad_weights"}  # categories the decoder may accept (the broker's handler must reject them)
# broker → client messages: they decode, and the broker must reject them as unexpected.
REPLY_TYPES = [t for t in ("Lease", "Wait", "Ack", "ScoreJob", "Batch", "Status") if t in wire.MESSAGE_TYPES]
WEIGHTS = {"version": 0, "uri": "", "sha256": "", "kind": "lora"}
RAW = "\x00raw-msgpack-splice\x00"  # a string placeholder replaced by raw MessagePack bytes (deep nesting, ext)


# ----------------------------------------------------------------------------------------------------------------
# The broker process


def _write_topology(tmp_path: Path, tasks: Path) -> Path:
    """The broker-relevant part of tests/integration/conftest.py:write_topology (the broker never loads the model)."""
    topo = {
        "run": {"name": "fuzz", "dir": str(tmp_path / "run"), "seed": 0},
        "broker": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "max_staleness": 1},
        "policy": {"family": "flow", "model": str(tmp_path / "no-model"), "sampler": {"num_steps": 4, "noise_level": 0.7}},
        "data": {"tasks": str(tasks), "group_size": 8},
        "actors": {"count": 1},
        "scorers": {"count": 1, "backend": "metric"},
        "learner": {"nproc": 1, "groups_per_step": 4, "lr": 3e-3, "checkpoint_every": 5},
    }  # fmt: skip
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(topo))
    return path


@dataclass
class BrokerProc:
    proc: subprocess.Popen
    endpoint: str
    run_dir: Path
    stderr_path: Path
    security: Any = None  # the topology's (its role secrets): every test socket proves a role
    note: str = ""  # what the oracle already found (shown when the broker dies)

    def stderr_tail(self, n: int = 4000) -> str:
        return self.stderr_path.read_text(errors="replace")[-n:] + self.note


@pytest.fixture
def broker_proc(tmp_path):
    tasks = make_quickstart_tasks(tmp_path / "tasks", n_tasks=16, size=64, seed=0)
    topo = _write_topology(tmp_path, tasks)
    endpoint = yaml.safe_load(topo.read_text())["broker"]["endpoint"]
    stderr_path = tmp_path / "broker.stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "editrl.broker.main", "--config", str(topo)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield BrokerProc(proc, endpoint, tmp_path / "run", stderr_path, load_config(topo).security)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _dealer(ctx: zmq.Context, broker: BrokerProc, name: str, role: str) -> zmq.Socket:
    """A DEALER proving ``role`` with the run's secret. The fuzzers are learners: a malformed frame is refused by
    the decoder before any role check, and the one category the decoder accepts (bad weights) is a learner's."""
    sock = harden(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    secure_client(sock, broker.security, role)
    sock.connect(broker.endpoint)
    return sock


def _ask(sock: zmq.Socket, msg: Any, broker: BrokerProc, timeout_s: float = 10.0) -> Any:
    """Send a valid request; return the reply with its request_id (replies to anything else are skipped)."""
    sock.send_multipart(codec.encode(msg))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert broker.proc.poll() is None, f"broker died (exit {broker.proc.returncode}):\n{broker.stderr_tail()}"
        if sock.poll(100):
            reply = codec.decode(sock.recv_multipart())
            if getattr(reply, "request_id", None) == msg.request_id:
                return reply
    raise AssertionError(f"no reply to {type(msg).__name__} in {timeout_s}s:\n{broker.stderr_tail()}")


def _rejected(counters: dict[str, int]) -> dict[str, int]:
    return {k.removeprefix("rejected/"): v for k, v in counters.items() if k.startswith("rejected/") and v}


# ----------------------------------------------------------------------------------------------------------------
# Valid templates


def _inner(hint: Any) -> Any:
    return next(a for a in typing.get_args(hint) if a is not type(None))


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _valid(hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if name == "family":
        return "flow"
    if _is_optional(hint):
        return _valid(_inner(hint), name)
    if hint is np.ndarray:
        return np.arange(6, dtype=np.float32).reshape(2, 3)
    if hint is bytes:
        return b"\x89PNG-" + name.encode()
    if origin is list:
        return [_valid(typing.get_args(hint)[0], name) for _ in range(2)]
    if origin is dict:
        item = typing.get_args(hint)[1]
        return dict(WEIGHTS) if item is Any else {"k": _valid(item, name)}
    if hint is bool:
        return True
    if hint is int:
        return 1
    if hint is float:
        return 0.5
    if hint is str:
        return f"{name}-0"
    raise TypeError(f"no valid value for {hint}")


def _hints(type_name: str) -> dict[str, Any]:
    return typing.get_type_hints(wire.MESSAGE_TYPES[type_name])


def _template(type_name: str) -> tuple[dict[str, Any], list[bytes]]:
    """A valid message of this type as (metadata map, payload frames)."""
    cls = wire.MESSAGE_TYPES[type_name]
    frames = codec.encode(cls(**{name: _valid(hint, name) for name, hint in _hints(type_name).items()}))
    return msgpack.unpackb(frames[0], raw=False), [bytes(f) for f in frames[1:]]


def _pack(meta: Any, payload: list[bytes], raw: bytes | None = None) -> list[bytes]:
    head = msgpack.packb(meta, use_bin_type=True)
    if raw is not None:
        token = msgpack.packb(RAW, use_bin_type=True)
        assert token in head
        head = head.replace(token, raw)
    return [head, *payload]


def _set_field(type_name: str, name: str, value: Any, raw: bytes | None = None) -> list[bytes]:
    meta, payload = _template(type_name)
    meta["fields"][name] = value
    return _pack(meta, payload, raw)


def _array_fields(type_name: str) -> list[str]:
    return [n for n, h in _hints(type_name).items() if h is np.ndarray]


def _nested(depth: int, kind: str) -> bytes:
    """``depth`` nested one-element arrays or maps around an int, as raw MessagePack (packb refuses > 511)."""
    opener = b"\x91" if kind == "array" else b"\x81\xa1k"
    return opener * depth + b"\x01"


# ----------------------------------------------------------------------------------------------------------------
# The corpus


@dataclass
class Case:
    category: str
    frames: list[bytes]
    throwaway: bool = False  # sent on its own socket (ZeroMQ drops an oversized frame and the connection)
    label: str = ""
    outcome: tuple[str, str] = ("", "")  # ("reject", reason) | ("accept", type) | ("crash", exception)
    meta_preview: bytes = field(default=b"", repr=False)


def _wrong_values(hint: Any) -> list[Any]:
    """Values of the wrong type for a field with this annotation (none of them valid)."""
    origin = typing.get_origin(hint)
    if _is_optional(hint):
        return [v for v in _wrong_values(_inner(hint)) if v is not None]
    if hint is Any:
        return [b"bin", {"$b": 1}, {"$nd": 1, "dtype": "uint8", "shape": [1]}, msgpack.Timestamp(0)]
    if hint is np.ndarray:
        return [None, [], "str", b"bin", 7, 2.5, True, {"$b": 1}, {"$nd": 1}, {"$nd": 1, "dtype": "float32"},
                {"$nd": 1, "dtype": "float32", "shape": [2, 3], "x": 1}, [[1.0, 2.0]], {}]  # fmt: skip
    if hint is bytes:
        return [None, [], "str", b"bin", 7, 2.5, True, {}, {"$b": True}, {"$b": "1"}, {"$b": 1.0}, {"$b": None},
                {"$b": 1, "x": 1}, {"$nd": 1, "dtype": "uint8", "shape": [4]}]  # fmt: skip
    if origin is list:
        item = typing.get_args(hint)[0]
        return [None, {}, "str", b"bin", 7, True, *[[w] for w in _wrong_values(item)[:4]]]
    if origin is dict:
        item = typing.get_args(hint)[1]
        return [None, [], "str", b"bin", 7, True, *[{"k": w} for w in _wrong_values(item)[:4]]]
    if hint is bool:
        return [None, [], {}, "true", b"1", 1, 0, 1.0]
    if hint is int:
        return [None, [], {}, "7", b"7", 2.5, 7.0, True, False]
    if hint is float:
        return [None, [], {}, "0.5", b"0.5", True, False]
    if hint is str:
        return [None, [], {}, b"bin", 7, 2.5, True, ["s"]]
    raise TypeError(f"no wrong values for {hint}")


def _wrong_type_cases() -> list[Case]:
    """Every field of every client message type set to every wrong type (bool where int/float is expected included)."""
    out = []
    for t in FUZZ_TYPES:
        for name, hint in _hints(t).items():
            for value in _wrong_values(hint):
                cat = "bool_for_int" if hint is int and isinstance(value, bool) else "wrong_type"
                out.append(Case(cat, _set_field(t, name, value), label=f"{t}.{name}={value!r:.40}"))
    return out


def _field_set_cases() -> list[Case]:
    out = []
    for t in FUZZ_TYPES:
        meta, payload = _template(t)
        for extra in ({"bogus": 1}, {"__init__": None}, {f"x{i}": i for i in range(5)}, {"": ""}):
            m = copy.deepcopy(meta)
            m["fields"].update(extra)
            out.append(Case("unknown_field", _pack(m, payload), label=f"{t}+{sorted(extra)}"))
        for name in _hints(t):
            m = copy.deepcopy(meta)
            del m["fields"][name]
            out.append(Case("missing_field", _pack(m, payload), label=f"{t}-{name}"))
        out.append(Case("missing_field", _pack({**meta, "fields": {}}, payload), label=f"{t} no fields"))
    return out


def _array_cases() -> list[Case]:
    """Shape/byte-length mismatches, disallowed dtypes, huge/negative/bool shapes, NaN/inf arrays."""
    out = []
    t = "RolloutGroup"
    meta, payload = _template(t)
    for name in _array_fields(t):
        idx = meta["fields"][name]["$nd"]

        def variant(cat: str, label: str, update: dict[str, Any], frame: bytes | None = None, name: str = name) -> None:
            m = copy.deepcopy(meta)
            m["fields"][name].update(update)
            p = list(payload)
            if frame is not None:
                p[m["fields"][name]["$nd"] - 1] = frame
            out.append(Case(cat, _pack(m, p), label=f"{t}.{name} {label}"))

        buf = payload[idx - 1]
        for shape in ([3, 3], [], [24], [2, 3, 1, 2], [0], [6, 0], [1, 1, 1, 1, 1, 25]):
            variant("shape_mismatch", f"shape={shape}", {"shape": shape})
        for frame in (buf + b"\x00", buf[:-1], b"", buf * 2):
            variant("shape_mismatch", f"frame={len(frame)}B", {}, frame)
        for dtype in ("float64", "uint8", "int64", "float16"):
            variant("shape_mismatch", f"dtype={dtype}", {"dtype": dtype})
        for dtype in ("object", "O", "complex64", "complex128", "<f4", "f4", "float", "int8", "uint64", "int16",
                      "str", "U8", "V4", "datetime64[ns]", "", "FLOAT32", "float32\x00", "bool_", "float32 ", 7, None,
                      True, ["float32"], {"x": 1}, b"float32"):  # fmt: skip
            variant("bad_dtype", f"dtype={dtype!r}", {"dtype": dtype})
        big = wire.MAX_FRAME_BYTES
        for shape in ([2**28] * 6, [big, big], [big + 1], [2**63], [2**64 - 1], [1] * (wire.MAX_NDIM + 1), [10**9] * 3):
            variant("huge_shape", f"shape={shape}", {"shape": shape})
        for shape in ([-1], [-2, -3], [2, -3], [0, -1], [-(2**63)], [-6]):
            variant("negative_dim", f"shape={shape}", {"shape": shape})
        for shape in ([True, 6], [2, True, 3], [6.0], ["6"], [None], None, "2,3", {"0": 2}, [[2, 3]], 6):
            variant("bool_for_int" if isinstance(shape, list) and True in shape else "bad_shape", f"shape={shape!r}",
                    {"shape": shape})  # fmt: skip
        for dtype, bad in (("float32", np.nan), ("float32", np.inf), ("float64", -np.inf), ("float16", np.nan),
                           ("float16", np.inf), ("float64", np.nan)):  # fmt: skip
            arr = np.zeros((2, 3), dtype)
            arr.flat[len(out) % 6] = bad
            variant("non_finite", f"{dtype} array with {bad}", {"dtype": dtype}, arr.tobytes())
    # cond: dict[str, ndarray] with a bad entry
    ref = meta["fields"]["cond"]["k"]
    for label, update in (("shape", {"shape": [7]}), ("dtype", {"dtype": "complex64"}), ("neg", {"shape": [-6]})):
        m = copy.deepcopy(meta)
        m["fields"]["cond"]["k"] = {**ref, **update}
        out.append(Case("shape_mismatch" if label == "shape" else "bad_dtype" if label == "dtype" else "negative_dim",
                        _pack(m, payload), label=f"cond.k {label}"))  # fmt: skip
    return out


def _non_finite_cases() -> list[Case]:
    out = []
    for bad in (math.nan, math.inf, -math.inf):
        for key in ("noise_level", "guidance"):
            out.append(
                Case("non_finite", _set_field("RolloutGroup", "params", {key: bad}), label=f"params.{key}={bad}")
            )
        out.append(Case("non_finite", _set_field("ScoreResult", "overall", [1.0, bad]), label=f"overall={bad}"))
        out.append(Case("non_finite", _set_field("ScoreResult", "sub_scores", [{"a": bad}, {}]), label="sub_scores"))
        for t in ("PublishWeights", *[r for r in REPLY_TYPES if "weights" in _hints(r)]):
            for key in ("version", "extra", "nested"):
                weights = {**WEIGHTS, key: [{"x": bad}] if key == "nested" else bad}
                out.append(Case("non_finite", _set_field(t, "weights", weights), label=f"{t}.weights.{key}={bad}"))
    return out


def _envelope_cases() -> list[Case]:
    out = []
    meta, payload = _template("LeaseRequest")
    for proto in (0, 1, 3, -1, 2**32, 2**64 - 1, "1", b"\x01", None, [], {}, [1], 1.5, -1.0, math.nan):
        out.append(Case("bad_protocol_version", _pack({**meta, "proto": proto}, payload), label=f"proto={proto!r}"))
    for type_name in ("Foo", "", "leaserequest", "LeaseRequest ", " LeaseRequest", "WireError", "__class__",
                      "WeightsInfo", 1, None, [], {}, b"LeaseRequest", True, 1.5, "x" * 5000):  # fmt: skip
        out.append(Case("unknown_type", _pack({**meta, "type": type_name}, payload), label=f"type={type_name!r:.40}"))
    for env in ([1, "LeaseRequest", {}], 1, "LeaseRequest", None, True, b"bin", {}, {"proto": 1, "type": "Heartbeat"},
                {**meta, "extra": 1}, {"proto": 1, "fields": meta["fields"]}, {"type": "LeaseRequest", "fields": {}}):  # fmt: skip
        out.append(Case("bad_envelope", _pack(env, []), label=f"envelope={env!r:.40}"))
    for fields in ([], "fields", None, 1, [["actor_id", "a"]], b"bin", True):
        out.append(Case("bad_fields", _pack({**meta, "fields": fields}, []), label=f"fields={fields!r}"))
    for t in REPLY_TYPES:
        m, p = _template(t)
        out.append(Case("unexpected_type", _pack(m, p), label=f"{t} sent to the broker"))
    return out


def _frame_cases() -> list[Case]:
    """Extra or missing payload frames; frame references at 0, out of range, negative, reused, mistyped."""
    out = []
    for t in FUZZ_TYPES:
        meta, payload = _template(t)
        for extra in (b"", b"x", b"\x00" * 24):
            out.append(Case("extra_frame", _pack(meta, [*payload, extra]), label=f"{t} + frame {len(extra)}B"))
        if payload:
            out.append(Case("missing_frame", _pack(meta, payload[:-1]), label=f"{t} - last frame"))
            out.append(Case("missing_frame", _pack(meta, payload[1:]), label=f"{t} - first frame"))
            out.append(Case("missing_frame", _pack(meta, []), label=f"{t} - all frames"))
    meta, payload = _template("RolloutGroup")
    n = len(payload) + 1
    for idx in (0, n, n + 100, -1, 2**64 - 1, -(2**63), True, False, "1", 1.0, None, [1]):
        for path in (("source_png", "$b"), ("traj", "k", "$nd"), ("edit_pngs", 1, "$b"), ("cond", "k", "$nd")):
            m = copy.deepcopy(meta)
            node = m["fields"]
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = idx
            out.append(Case("bad_frame_ref", _pack(m, payload), label=f"{'.'.join(map(str, path))}={idx!r}"))
    for a, b in (("source_png", "log_probs"), ("log_probs", "source_png"), ("edit_pngs", "source_png")):
        m = copy.deepcopy(meta)
        ref_a = m["fields"][a][0] if a == "edit_pngs" else m["fields"][a]
        ref_b = m["fields"][b]
        ref_b["$nd" if "$nd" in ref_b else "$b"] = ref_a["$nd" if "$nd" in ref_a else "$b"]
        out.append(Case("bad_frame_ref", _pack(m, payload), label=f"{b} reuses the frame of {a}"))
    m = copy.deepcopy(meta)
    m["fields"]["edit_pngs"][1] = m["fields"]["edit_pngs"][0]
    out.append(Case("bad_frame_ref", _pack(m, payload), label="edit_pngs[1] reuses edit_pngs[0]"))
    return out


def _map_key_cases() -> list[Case]:
    """Map keys that are not strings, at every level (MessagePack ints, floats, nil, arrays, bin)."""
    out = []
    meta, payload = _template("RolloutGroup")
    for key in (1, -1, 1.5, None, True, (1, 2)):
        out.append(Case("non_str_key", _pack({**meta, key: 1}, payload), label=f"envelope key {key!r}"))
        m = copy.deepcopy(meta)
        m["fields"][key] = 1
        out.append(Case("non_str_key", _pack(m, payload), label=f"fields key {key!r}"))
        m = copy.deepcopy(meta)
        m["fields"]["cond"] = {key: m["fields"]["cond"]["k"]}
        out.append(Case("non_str_key", _pack(m, payload), label=f"cond key {key!r}"))
        out.append(Case("non_str_key", _set_field("PublishWeights", "weights", {**WEIGHTS, key: 1}),
                        label=f"weights key {key!r}"))  # fmt: skip
        out.append(Case("non_str_key", _set_field("ScoreResult", "sub_scores", [{key: 1.0}, {}]),
                        label=f"sub_scores key {key!r}"))  # fmt: skip
    m, p = _template("LeaseRequest")
    m["fields"] = {b"actor_id": "a", "request_id": "r"}
    out.append(Case("non_str_key", _pack(m, p), label="fields key b'actor_id'"))
    m = copy.deepcopy(meta)
    m["fields"]["cond"] = {b"k": m["fields"]["cond"]["k"]}
    out.append(Case("non_str_key", _pack(m, payload), label="cond key b'k' (bin)"))
    m, p = _template("StatusRequest")
    m["fields"].update({b"bin-key": 1, "str-key": 2})
    out.append(Case("non_str_key", _pack(m, p), label="StatusRequest unknown fields b'bin-key' and 'str-key'"))
    out.append(Case("non_str_key", _set_field("ScoreResult", "sub_scores", [{b"k": 1.0}, {}]), label="sub_scores b'k'"))
    return out


def _group_cases() -> list[Case]:
    """Well-formed RolloutGroups whose parts disagree: unknown family, log-probs or traj not led by G, a mask of the
    wrong shape, non-float32 or 1-D log-probs."""
    out = []
    g = np.zeros((2, 3), np.float32)
    for label, over in (
        ("family=gan", {"family": "gan"}),
        ("log_probs G=3", {"log_probs": np.zeros((3, 3), np.float32)}),
        ("log_probs 1-D", {"log_probs": np.zeros(2, np.float32)}),
        ("log_probs S=0", {"log_probs": np.zeros((2, 0), np.float32)}),
        ("log_probs float16", {"log_probs": np.zeros((2, 3), np.float16)}),
        ("traj G=1", {"traj": {"latents": np.zeros((1, 3), np.float32)}}),
        ("traj scalar", {"traj": {"latents": np.zeros((), np.float32)}}),
        ("unit_mask shape", {"traj": {"unit_mask": np.ones((2, 4), np.float32)}, "log_probs": g}),
    ):
        fields = {name: _valid(hint, name) for name, hint in _hints("RolloutGroup").items()}
        fields.update(over)
        frames = [bytes(f) for f in codec.encode(wire.RolloutGroup(**fields))]
        out.append(Case("bad_group", frames, label=label))
    return out


def _semantic_cases() -> list[Case]:
    """Well-typed messages whose values cannot be accepted (a nested WeightsInfo with missing or mistyped keys): the
    decoder may pass them on, the broker must still reject them (under any reason)."""
    out = []
    for weights in ({}, {"version": 1}, {**WEIGHTS, "version": "two"}, {**WEIGHTS, "version": [1]},
                    {**WEIGHTS, "version": None}, {"uri": "", "sha256": "", "kind": "lora"},
                    {k.encode(): v for k, v in WEIGHTS.items()}):  # fmt: skip
        out.append(Case("bad_weights", _set_field("PublishWeights", "weights", weights), label=f"weights={weights}"))
    return out


def _ext_cases() -> list[Case]:
    out = []
    for code in (0, 1, 5, 42, 127, -1, -2, -128):
        # fixext 8 (code -1 with 8 bytes is a valid MessagePack timestamp; msgpack decodes it without the ext hook)
        ext = b"\xd7" + code.to_bytes(1, "big", signed=True) + b"\x00\x00\x00\x01\x00\x00\x00\x02"
        out.append(Case("ext_type", [ext], label=f"ext {code} as the whole metadata"))
        meta, payload = _template("RolloutGroup")
        for where in ("proto", "type", "fields"):
            out.append(Case("ext_type", _pack({**meta, where: RAW}, payload, ext), label=f"ext {code} as {where}"))
        for name, value in (("task_id", RAW), ("edit_pngs", [RAW, RAW]), ("family", RAW), ("params", {"guidance": RAW}),
                            ("traj", {"k": {"$nd": RAW, "dtype": "float32", "shape": [2, 3]}}),
                            ("log_probs", {"$nd": 3, "dtype": RAW, "shape": [2, 3]}),
                            ("cond", {"k": {"$nd": 5, "dtype": "float32", "shape": [RAW]}})):  # fmt: skip
            out.append(Case("ext_type", _set_field("RolloutGroup", name, value, ext), label=f"ext {code} in {name}"))
        out.append(Case("ext_type", _set_field("PublishWeights", "weights", {**WEIGHTS, "x": [RAW]}, ext),
                        label=f"ext {code} in weights"))  # fmt: skip
    ts = msgpack.Timestamp(1, 2)
    out.append(Case("ext_type", _set_field("PublishWeights", "weights", {**WEIGHTS, "t": ts}), label="timestamp"))
    out.append(Case("ext_type", _set_field("LeaseRequest", "actor_id", ts), label="timestamp as str"))
    return out


def _deep_cases() -> list[Case]:
    """Nested arrays/maps up to 10,000 deep at every kind of position (MessagePack's own limit is 1024)."""
    out = []
    for depth in (10, 100, 500, 1000, 1020, 1025, 4096, 10_000):
        for kind in ("array", "map"):
            deep = _nested(depth, kind)
            label = f"{kind} x{depth}"
            out.append(Case("deep_nesting", [deep], label=f"{label} as the metadata"))
            meta, payload = _template("RolloutGroup")
            for where in ("proto", "type"):
                out.append(Case("deep_nesting", _pack({**meta, where: RAW}, payload, deep), label=f"{label} {where}"))
            for name, value in (("task_id", RAW), ("edit_pngs", RAW), ("cond", {"k": RAW}),
                                ("traj", {"k": {"$nd": 1, "dtype": RAW, "shape": [2, 3]}}),
                                ("log_probs", {"$nd": 2, "dtype": "float32", "shape": RAW})):  # fmt: skip
                out.append(Case("deep_nesting", _set_field("RolloutGroup", name, value, deep), label=f"{label} {name}"))
            out.append(Case("deep_nesting", _set_field("PublishWeights", "weights", {**WEIGHTS, "x": RAW}, deep),
                            label=f"{label} weights"))  # fmt: skip
    return out


def _size_cases() -> list[Case]:
    out = []
    limit = wire.MAX_META_BYTES
    for extra in (1, 1000, limit):
        out.append(Case("meta_too_large", _set_field("LeaseRequest", "actor_id", "a" * (limit + extra)),
                        label=f"meta {limit + extra}B string"))  # fmt: skip
        out.append(Case("meta_too_large", _set_field("RolloutGroup", "edit_pngs", [[0] * (limit + extra)]),
                        label="meta with a huge list"))  # fmt: skip
    out.append(Case("meta_too_large", [b"\xc6" + (limit + 1).to_bytes(4, "big") + b"\x00" * (limit + 1)], label="bin"))
    meta, payload = _template("StatusRequest")
    for n in (wire.MAX_FRAMES + 1, wire.MAX_FRAMES + 5):
        out.append(Case("too_many_frames", _pack(meta, [b""] * (n - 1)), label=f"{n} frames"))
    meta, payload = _template("RolloutGroup")
    for _ in range(N_OVERSIZED_FRAMES):  # ZeroMQ's MAXMSGSIZE drops it before the broker sees it
        frames = _pack(meta, payload)
        frames[1] = bytes(wire.MAX_FRAME_BYTES + 1)  # calloc'd: no real memory is touched
        out.append(Case("oversized_frame", frames, throwaway=True, label=f"a {wire.MAX_FRAME_BYTES + 1}B frame"))
    return out


def _random_cases(rng: random.Random, n: int) -> list[Case]:
    """Truncated valid messages, byte flips of valid metadata and random bytes, until ``n`` cases."""
    templates = [_template(t) for t in FUZZ_TYPES + REPLY_TYPES]
    out = []
    while len(out) < n:
        meta, payload = rng.choice(templates)
        head = msgpack.packb(meta, use_bin_type=True)
        r = rng.random()
        if r < 0.35:
            frames = [head[: rng.randrange(len(head))], *payload]
            if payload and rng.random() < 0.5:
                keep = sorted(rng.sample(range(len(payload)), rng.randrange(len(payload))))
                frames = [frames[0], *[payload[i] for i in keep]]
            out.append(Case("truncated", frames))
        elif r < 0.5 and payload:
            keep = sorted(rng.sample(range(len(payload)), rng.randrange(len(payload))))
            cut = [p[: rng.randrange(len(p) + 1)] for p in (payload[i] for i in keep)]
            out.append(Case("truncated", [head, *cut]))
        elif r < 0.75:
            flipped = bytearray(head)
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            out.append(Case("byte_flip", [bytes(flipped), *payload]))
        else:
            first = rng.choice([b"", b"\x83", b"\x83\xa5proto\x01", b"\xdf\xff\xff\xff\xff", b"\xc1"])
            frames = [first + rng.randbytes(rng.randrange(200)) for _ in range(rng.randint(1, 4))]
            out.append(Case("random_bytes", frames))
    return out


def _classify(case: Case) -> tuple[str, str]:
    """The decoder as an oracle: what the broker must count this message as."""
    try:
        msg = codec.decode(case.frames)
    except wire.WireError as exc:
        return ("reject", exc.reason)
    except Exception as exc:  # a decoder bug: the broker would crash the same way
        return ("crash", f"{type(exc).__name__}: {str(exc)[:80]}")
    name = type(msg).__name__
    return ("reject", "unexpected_type") if name in REPLY_TYPES else ("accept", name)


def build_corpus(seed: int = SEED, n: int = N_MESSAGES) -> list[Case]:
    rng = random.Random(seed)
    targeted = (
        _wrong_type_cases() + _field_set_cases() + _array_cases() + _non_finite_cases() + _envelope_cases()
        + _frame_cases() + _map_key_cases() + _group_cases() + _semantic_cases() + _ext_cases() + _deep_cases()
        + _size_cases()
    )  # fmt: skip
    for case in targeted:
        case.outcome = ("reject", "zmq_maxmsgsize") if case.throwaway else _classify(case)
    fill = []
    for case in _random_cases(rng, 3 * n):
        case.outcome = _classify(case)
        if case.outcome[0] != "accept":  # a truncation or flip that happens to stay valid is not malformed
            fill.append(case)
        if len(targeted) + len(fill) >= n:
            break
    corpus = targeted + fill
    rng.shuffle(corpus)
    return corpus


# ----------------------------------------------------------------------------------------------------------------
# The test


def _send_oversized(ctx: zmq.Context, broker: BrokerProc, case: Case, i: int) -> None:
    """One oversized frame on a throwaway socket; waits until the broker's ZeroMQ has cut the connection."""
    sock = _dealer(ctx, broker, f"oversized-{i}", "learner")
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.send_multipart(case.frames, copy=False)
        assert monitor.poll(10_000), "the broker did not disconnect a peer sending an oversized frame"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def test_broker_survives_and_counts_10k_malformed_messages(broker_proc):
    t0 = time.monotonic()
    corpus = build_corpus()
    for name in FUZZ_TYPES + REPLY_TYPES:  # the valid templates the mutations start from are valid
        meta, payload = _template(name)
        assert type(codec.decode(_pack(meta, payload))).__name__ == name
    findings = [f"{c.category}: {c.label or c.frames[0][:60]!r} -> {c.outcome}" for c in corpus
                if c.outcome[0] == "crash" or c.outcome[0] == "accept" and c.category not in SEMANTIC]  # fmt: skip
    expected = collections.Counter(c.outcome[1] for c in corpus if c.outcome[0] == "reject" and not c.throwaway)
    sent = collections.Counter(c.category for c in corpus)
    assert len(corpus) >= 10_000
    if findings:
        broker_proc.note = f"\n{len(findings)} decoder findings:\n" + "\n".join(findings)

    ctx = zmq.Context()
    try:
        probe = _dealer(ctx, broker_proc, "probe", "tool")
        deadline = time.monotonic() + 30
        while True:  # up: answers a StatusRequest
            assert broker_proc.proc.poll() is None, f"broker exited at start-up:\n{broker_proc.stderr_tail()}"
            probe.send_multipart(codec.encode(wire.StatusRequest("up")))
            if probe.poll(500):
                before = _rejected(codec.decode(probe.recv_multipart()).counters)
                break
            assert time.monotonic() < deadline, f"broker not answering after 30 s:\n{broker_proc.stderr_tail()}"
        assert before == {}

        fuzzers = [_dealer(ctx, broker_proc, f"fuzz-{i}", "learner") for i in range(N_FUZZ_SOCKETS)]
        oversized = [c for c in corpus if c.throwaway]
        regular = [c for c in corpus if not c.throwaway]
        for i, case in enumerate(oversized):
            _send_oversized(ctx, broker_proc, case, i)
        for n_chunk, start in enumerate(range(0, len(regular), CHUNK)):
            sock = fuzzers[n_chunk % N_FUZZ_SOCKETS]
            for case in regular[start : start + CHUNK]:
                sock.send_multipart(case.frames, copy=len(case.frames[0]) < 65536)
            # a reply on the same connection: everything sent before it was received and handled
            _ask(sock, wire.StatusRequest(f"sync-{n_chunk}"), broker_proc)

        assert broker_proc.proc.poll() is None, f"broker died:\n{broker_proc.stderr_tail()}"
        actor = _dealer(ctx, broker_proc, "actor", "actor")
        status = _ask(actor, wire.StatusRequest("final"), broker_proc)
        lease = _ask(actor, wire.LeaseRequest("a0", "lease-after-fuzz"), broker_proc)
        assert isinstance(lease, wire.Lease), lease
        for sock in [probe, actor, *fuzzers]:
            sock.close(linger=0)
    finally:
        ctx.destroy(linger=0)

    rejected = _rejected(status.counters)
    assert not findings, f"{len(findings)} malformed messages not rejected by codec.decode:\n" + "\n".join(findings)
    # every message that reached the broker was rejected and counted once, under the reason the decoder gives
    assert sum(rejected.values()) == len(regular), (rejected, len(regular), dict(sent))
    short = {r: (rejected.get(r, 0), n) for r, n in expected.items() if rejected.get(r, 0) < n}
    assert not short, (short, {r: n for r, n in rejected.items() if r not in expected})

    broker_proc.proc.send_signal(signal.SIGTERM)
    assert broker_proc.proc.wait(15) == 0, broker_proc.stderr_tail()
    log = broker_proc.run_dir / "logs" / "broker-0.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    logged = collections.Counter(e.get("reason") for e in events if e.get("event") == "message_rejected")
    assert logged == collections.Counter(set(rejected)), logged  # exactly one line per reason
    elapsed = time.monotonic() - t0
    print(f"fuzz: {len(corpus)} malformed messages in {elapsed:.1f}s; per category {dict(sorted(sent.items()))}")
    assert elapsed < 90
