"""Every message editrl sends and its limits — the whole wire protocol in one module (the codec that turns messages
into frames and validates them on the way back is :mod:`editrl.common.codec`).

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

Evolving a message without a protocol bump: a field added later has a default, is left out of the metadata when it
holds that default, and is filled with it when absent. A peer that does not know the field receives the same bytes
as before as long as the field is unused, and rejects it (``unknown_field``) once it is used; every other field stays
required.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

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
    """broker → learner: complete scored groups, each as the stored RolloutGroup frames plus its rewards, and the
    held-out gold score of the edits a gold scorer also judged (``scorers.gold``; never trained on)."""

    request_id: str
    groups: list[bytes]  # each an encoded RolloutGroup (see encode_record / decode_record)
    rewards: list[list[float]]  # [n_groups][G] overall reward
    dropped_stale: int
    gold: list[list[float | None]] = field(default_factory=list)  # [n_groups][G] gold score or None; [] = none had one


@dataclass
class PublishWeights:
    """learner → broker: a new weight version is fully written (DONE marker present) at ``weights.uri``."""

    request_id: str
    learner_step: int
    weights: dict[str, Any]


@dataclass
class RejectGroups:
    """learner rank → broker: groups of its batch for ``step`` that its family check refused (shapes, dtypes, the
    schedule the family needs). The broker quarantines them with the reasons and takes them out of the (rank, step)
    assignment, so the rank's next SampleRequest tops the batch up. Answered by Ack."""

    request_id: str
    rank: int
    step: int
    group_ids: list[str]
    reasons: list[str]


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
        RejectGroups,
        StatusRequest,
        Status,
    )
}


GOLD_SUB_SCORE = "gold"  # the sub-score key under which a scorer stores an edit's held-out gold score (reserved)


def gold_scores(sub_scores: Any, n: int) -> list[float | None]:
    """Per edit, the gold score a scorer stored in that edit's sub-scores (``GOLD_SUB_SCORE``), None where there is
    none; ``sub_scores`` is a stored group's list of per-edit maps (anything else: no gold)."""
    out: list[float | None] = [None] * n
    if isinstance(sub_scores, list) and len(sub_scores) == n:
        for i, subs in enumerate(sub_scores):
            value = subs.get(GOLD_SUB_SCORE) if isinstance(subs, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                out[i] = float(value)
    return out


def weights_dict(info: WeightsInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def weights_from_dict(d: dict[str, Any]) -> WeightsInfo:
    try:
        return WeightsInfo(version=int(d["version"]), uri=str(d["uri"]), sha256=str(d["sha256"]), kind=str(d["kind"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError("bad_weights_info", str(exc)) from None
