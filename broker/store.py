"""The broker's durable state: rollout groups, their scores and the replay order, in one LMDB environment.

Terms
- **group**: G edits of one (instruction, source image), as the actor sent it (a ``RolloutGroup`` record), keyed by
  ``group_id``. Immutable once stored.
- **state** of a group: ``pending`` (stored, waiting for scores) → ``ready`` (scored, in the replay, sampleable) →
  ``consumed`` (handed to a learner rank). Side exits, each counted: ``unscorable`` (the judge could not score it),
  ``stale`` (older than the learner's staleness bound when sampled), ``evicted`` (pushed out by capacity),
  ``quarantined`` (poison: its score job failed ``broker.max_job_attempts`` times, or a learner's family check
  refused it after it was consumed; the reason is kept in its status).
- **seq**: a durable, strictly increasing insert number; ``pending`` and ``ready`` tables are ordered by it (FIFO).
- **version**: the policy weight version that generated a group.

Guarantees
- An insert is acknowledged only after its write transaction committed with ``sync=True`` (fsync), so every
  acknowledged group survives kill -9 of the broker. Inserts are idempotent: ``put(overwrite=False)`` on the
  ``group_id`` key, so a resent group is stored once.
- Every state change and the counters it affects are written in the same transaction.
- Capacity: at most ``capacity`` group records are kept; the oldest non-pending records beyond it are deleted (their
  state becomes ``evicted`` if they were never consumed). Pending groups are never evicted.
- ``MapFullError`` grows the map (no transaction open) and retries the same batch.
- One writer process per environment (the broker). Readers (inspection tools) use short read-only transactions.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack

_SEQ = struct.Struct(">Q")  # big-endian so LMDB's byte order is numeric order
_DBS = ("groups", "status", "pending", "ready", "stored", "meta", "leases", "batches")

COUNTER_KEYS = (
    "ingested",
    "duplicate_groups",
    "scored",
    "consumed",
    "dropped_stale",
    "dropped_unscorable",
    "evicted",
    "evicted_unconsumed",
    "reserved",
    "reserve_missing",
    "quarantined",
)


@dataclass(frozen=True)
class SampleSpec:
    """One learner rank's request: groups for training step ``step`` from position ``offset`` of its batch."""

    rank: int
    step: int
    offset: int
    max_groups: int
    min_version: int

    @property
    def batch_key(self) -> bytes:
        return f"{self.rank}:{self.step:012d}".encode()


# A group handed to a learner: (group_id, record, rewards, scores), ``scores`` as stored with it (sub-scores, ...).
Sampled = tuple[str, bytes, list[float], dict[str, Any]]


@dataclass
class TurnResult:
    inserted: list[bool]  # per insert: stored now (False = duplicate group_id)
    scored: list[bool]  # per result: pending → ready (False = late duplicate)
    dropped: list[bool]  # per unscorable: pending → unscorable
    quarantined: list[bool]  # per quarantine: pending/consumed → quarantined
    samples: list[tuple[list[Sampled], int]]  # per request: (groups, n_stale)
    counters: dict[str, int]  # durable counters after the turn


def _add(counters: dict[str, int], **deltas: int) -> None:
    for k, v in deltas.items():
        counters[k] = counters.get(k, 0) + v


class ReplayStore:
    """LMDB-backed group store. Not thread-safe; one instance in the broker process."""

    def __init__(self, path: str | Path, capacity: int, map_size_bytes: int = 1 << 30, readonly: bool = False):
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.path = Path(path)
        self.capacity = capacity
        self.readonly = readonly
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size_bytes,
            max_dbs=len(_DBS),
            sync=True,
            metasync=True,
            writemap=False,
            readonly=readonly,
            lock=True,
            subdir=True,
        )
        self.db = {name: self.env.open_db(name.encode(), create=not readonly) for name in _DBS}
        self.resizes = 0
        self.on_resize: Callable[[int], None] | None = None
        if not readonly:
            self.env.reader_check()  # clear reader slots left by killed processes

    # -- transactions ------------------------------------------------------------------------------------------

    def _write(self, fn: Callable[[lmdb.Transaction], Any]) -> Any:
        """Run ``fn`` in one write transaction; on MapFullError grow the map and retry the same work."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                new_size = self.env.info()["map_size"] * 2
                self.env.set_mapsize(new_size)
                self.resizes += 1
                if self.on_resize is not None:
                    self.on_resize(new_size)

    def _get_meta(self, txn: lmdb.Transaction, key: str, default: Any) -> Any:
        raw = txn.get(key.encode(), db=self.db["meta"])
        return default if raw is None else msgpack.unpackb(raw, raw=False)

    def _put_meta(self, txn: lmdb.Transaction, key: str, value: Any) -> None:
        txn.put(key.encode(), msgpack.packb(value, use_bin_type=True), db=self.db["meta"])

    def _status(self, txn: lmdb.Transaction, gid: bytes) -> dict[str, Any] | None:
        raw = txn.get(gid, db=self.db["status"])
        return None if raw is None else msgpack.unpackb(raw, raw=False)

    def _set_status(self, txn: lmdb.Transaction, gid: bytes, status: dict[str, Any]) -> None:
        txn.put(gid, msgpack.packb(status, use_bin_type=True), db=self.db["status"])

    # -- writes ------------------------------------------------------------------------------------------------
    #
    # Each operation has a transaction-level form (``_op(txn, counters, ...)``) so the broker can apply everything a
    # loop turn produced — inserts, score results, samples — in ONE fsync'd transaction (``commit_turn``); the public
    # single-operation methods wrap one of them in its own transaction.

    def commit_turn(
        self,
        inserts: Sequence[tuple[str, bytes, dict[str, Any]]] = (),
        scored: Sequence[tuple[str, list[float], dict[str, Any]]] = (),
        unscorable: Sequence[tuple[str, str]] = (),
        samples: Sequence[SampleSpec] = (),
        task_cursor: int | None = None,  # the new durable task cursor (None: unchanged)
        lease_puts: Sequence[tuple[str, dict[str, Any]]] = (),
        lease_closes: Sequence[tuple[str, str]] = (),  # (lease_id, why): kept, marked closed
        quarantine: Sequence[tuple[str, str, tuple[int, int] | None]] = (),  # (group_id, reason, (rank, step))
    ) -> TurnResult:
        """Apply a loop turn's writes in one transaction, in this order: inserts, scores, drops, quarantines, samples,
        leases.

        Samples are answered from groups committed by this transaction or earlier ones. A turn with only sample
        requests, none of which can be answered, writes nothing (no fsync).
        """
        if not (
            inserts or scored or unscorable or task_cursor is not None or lease_puts or lease_closes or quarantine
        ) and not self._samples_need_write(samples):
            return TurnResult([], [], [], [], [([], 0) for _ in samples], self.counters())

        def txn_fn(txn: lmdb.Transaction) -> TurnResult:
            counters = self._get_meta(txn, "counters", {})
            result = TurnResult(
                inserted=self._insert(txn, counters, list(inserts)),
                scored=[self._mark_scored(txn, counters, *item) for item in scored],
                dropped=[self._mark_unscorable(txn, counters, *item) for item in unscorable],
                quarantined=[self._quarantine(txn, counters, *item) for item in quarantine],
                samples=[self._sample(txn, counters, spec) for spec in samples],
                counters={},
            )
            if task_cursor is not None:
                self._put_meta(txn, "task_cursor", task_cursor)
            for lease_id, info in lease_puts:
                txn.put(lease_id.encode(), msgpack.packb(info, use_bin_type=True), db=self.db["leases"])
            for lease_id, why in lease_closes:  # kept: a late group on an expired lease is still one we issued
                raw = txn.get(lease_id.encode(), db=self.db["leases"])
                info = None if raw is None else msgpack.unpackb(raw, raw=False)
                if info is not None and "closed" not in info:
                    info["closed"] = why
                    txn.put(lease_id.encode(), msgpack.packb(info, use_bin_type=True), db=self.db["leases"])
            self._put_meta(txn, "counters", counters)
            result.counters = {**dict.fromkeys(COUNTER_KEYS, 0), **counters}
            return result

        return self._write(txn_fn)

    def _samples_need_write(self, samples: Sequence[SampleSpec]) -> bool:
        if not samples:
            return False
        if self.ready_count() > 0:
            return True
        with self.env.begin() as txn:  # a resumed learner re-requesting an assigned step
            return any(spec.offset < len(self._assigned(txn, spec)) for spec in samples)

    def _assigned(self, txn: lmdb.Transaction, spec: SampleSpec) -> list[str]:
        raw = txn.get(spec.batch_key, db=self.db["batches"])
        return [] if raw is None else msgpack.unpackb(raw, raw=False)

    def _sample(self, txn: lmdb.Transaction, counters: dict[str, int], spec: SampleSpec) -> tuple[list[Sampled], int]:
        """Groups for (rank, step) from ``offset``: the recorded assignment first (a resumed learner), then new
        ready groups, which are appended to the assignment."""
        assigned = self._assigned(txn, spec)
        if spec.offset < len(assigned):
            present = [g for g in assigned if txn.get(g.encode(), db=self.db["groups"]) is not None]
            if len(present) < len(assigned):  # evicted by capacity since: drop them from the batch (counted) and
                _add(counters, reserve_missing=len(assigned) - len(present))  # let the learner top it up
                assigned = present
                txn.put(spec.batch_key, msgpack.packb(assigned, use_bin_type=True), db=self.db["batches"])
        if spec.offset < len(assigned):
            out = []
            for gid in assigned[spec.offset : spec.offset + spec.max_groups]:
                status = self._status(txn, gid.encode())
                record = bytes(txn.get(gid.encode(), db=self.db["groups"]))
                out.append((gid, record, status["rewards"], status.get("scores") or {}))
            _add(counters, reserved=len(out))
            return out, 0
        taken, stale = self._take_ready(txn, counters, spec.max_groups, spec.min_version)
        if taken and spec.rank >= 0:  # rank -1: an unrecorded pop (tools, tests)
            assigned += [gid for gid, *_ in taken]
            txn.put(spec.batch_key, msgpack.packb(assigned, use_bin_type=True), db=self.db["batches"])
        return taken, stale

    def insert_groups(self, items: Iterable[tuple[str, bytes, dict[str, Any]]]) -> list[bool]:
        """Store groups ``(group_id, record, info)`` as pending in ONE fsync'd transaction.

        Returns, per item, True if stored now or False if the group_id was already stored (a duplicate resend).
        ``info`` is small metadata kept in the status table (version, task, actor, instruction).
        """
        return self.commit_turn(inserts=list(items)).inserted

    def mark_scored(self, group_id: str, rewards: list[float], scores: dict[str, Any]) -> bool:
        """pending → ready with its rewards. False if the group is not pending (a late duplicate result)."""
        return self.commit_turn(scored=[(group_id, rewards, scores)]).scored[0]

    def mark_unscorable(self, group_id: str, reason: str) -> bool:
        """pending → unscorable (dropped, counted). False if the group is not pending."""
        return self.commit_turn(unscorable=[(group_id, reason)]).dropped[0]

    def take_ready(self, max_groups: int, min_version: int) -> tuple[list[Sampled], int]:
        """Pop up to ``max_groups`` ready groups (oldest first) → consumed; groups older than ``min_version`` are
        dropped as stale on the way (counted). Returns ``([(group_id, record, rewards, scores)], n_dropped_stale)``."""
        return self.commit_turn(samples=[SampleSpec(-1, -1, 0, max_groups, min_version)]).samples[0]

    def _insert(self, txn: lmdb.Transaction, counters: dict[str, int], items: list) -> list[bool]:
        seq = self._get_meta(txn, "next_seq", 0)
        out = []
        for group_id, record, info in items:
            gid = group_id.encode()
            # status outlives the record (eviction keeps it): a resend of an evicted group is still a duplicate
            if txn.get(gid, db=self.db["status"]) is not None or not txn.put(
                gid, record, db=self.db["groups"], overwrite=False
            ):
                _add(counters, duplicate_groups=1)
                out.append(False)
                continue
            key = _SEQ.pack(seq)
            self._set_status(txn, gid, {**info, "state": "pending", "seq": seq})
            txn.put(key, gid, db=self.db["pending"])
            txn.put(key, gid, db=self.db["stored"])
            seq += 1
            _add(counters, ingested=1)
            out.append(True)
        if items:
            self._put_meta(txn, "next_seq", seq)
            self._evict(txn, counters)
        return out

    def _mark_scored(
        self, txn: lmdb.Transaction, counters: dict[str, int], group_id: str, rewards: list[float], scores: Any
    ) -> bool:
        gid = group_id.encode()
        status = self._status(txn, gid)
        if status is None or status["state"] != "pending":
            return False
        key = _SEQ.pack(status["seq"])
        txn.delete(key, db=self.db["pending"])
        txn.put(key, gid, db=self.db["ready"])
        status.update(state="ready", rewards=rewards, scores=scores)
        self._set_status(txn, gid, status)
        _add(counters, scored=1)
        return True

    def _mark_unscorable(self, txn: lmdb.Transaction, counters: dict[str, int], group_id: str, reason: str) -> bool:
        gid = group_id.encode()
        status = self._status(txn, gid)
        if status is None or status["state"] != "pending":
            return False
        txn.delete(_SEQ.pack(status["seq"]), db=self.db["pending"])
        status.update(state="unscorable", reason=reason)
        self._set_status(txn, gid, status)
        _add(counters, dropped_unscorable=1)
        return True

    def _quarantine(
        self, txn: lmdb.Transaction, counters: dict[str, int], group_id: str, reason: str, batch: tuple[int, int] | None
    ) -> bool:
        """pending → quarantined (poison score job), or consumed → quarantined (a learner's family check refused it;
        ``batch`` = its (rank, step), from whose assignment it is removed so the rank's next request tops the batch
        up instead of receiving it again). False if the group is in neither state (already decided)."""
        gid = group_id.encode()
        status = self._status(txn, gid)
        if status is None or status["state"] not in ("pending", "consumed"):
            return False
        if status["state"] == "pending":
            txn.delete(_SEQ.pack(status["seq"]), db=self.db["pending"])
        else:
            _add(counters, consumed=-1)
            if batch is not None:
                spec = SampleSpec(batch[0], batch[1], 0, 0, 0)
                assigned = [g for g in self._assigned(txn, spec) if g != group_id]
                txn.put(spec.batch_key, msgpack.packb(assigned, use_bin_type=True), db=self.db["batches"])
        status.update(state="quarantined", reason=reason[:500], quarantined_from=status["state"])
        self._set_status(txn, gid, status)
        _add(counters, quarantined=1)
        return True

    def _take_ready(
        self, txn: lmdb.Transaction, counters: dict[str, int], max_groups: int, min_version: int
    ) -> tuple[list[Sampled], int]:
        visited: list[tuple[bytes, bytes, dict[str, Any]]] = []  # (key, gid, status): to be consumed or stale
        n_usable = 0
        for key, gid in txn.cursor(db=self.db["ready"]):  # lazy: stops after max_groups usable groups
            if n_usable >= max_groups:
                break
            status = self._status(txn, gid)
            visited.append((bytes(key), bytes(gid), status))
            n_usable += status["version"] >= min_version
        # Reads first, writes after: records are copied out before this transaction dirties any page.
        out = [
            (gid.decode(), bytes(txn.get(gid, db=self.db["groups"])), st["rewards"], st.get("scores") or {})
            for _, gid, st in visited
            if st["version"] >= min_version
        ]
        stale = len(visited) - len(out)
        for key, gid, status in visited:
            status["state"] = "consumed" if status["version"] >= min_version else "stale"
            self._set_status(txn, gid, status)
            txn.delete(key, db=self.db["ready"])
        _add(counters, consumed=len(out), dropped_stale=stale)
        return out, stale

    def _evict(self, txn: lmdb.Transaction, counters: dict[str, int]) -> None:
        n_stored = txn.stat(self.db["stored"])["entries"]
        if n_stored <= self.capacity:
            return
        victims = []
        for key, gid in txn.cursor(db=self.db["stored"]):  # oldest first; stops once under capacity
            if n_stored - len(victims) <= self.capacity:
                break
            status = self._status(txn, gid)
            if status["state"] != "pending":  # never evict unscored work
                victims.append((bytes(key), bytes(gid), status))
        for key, gid, status in victims:
            if status["state"] == "ready":
                txn.delete(key, db=self.db["ready"])
                _add(counters, evicted_unconsumed=1)
                status["state"] = "evicted"
            txn.delete(key, db=self.db["stored"])
            txn.delete(gid, db=self.db["groups"])
            status["evicted"] = True
            self._set_status(txn, gid, status)
            _add(counters, evicted=1)

    def next_task(self, n_tasks: int) -> tuple[int, int]:
        """Advance the durable task cursor by one; returns ``(task_index, epoch)``."""
        cursor = self.get_meta("task_cursor", 0)
        self.commit_turn(task_cursor=cursor + 1)
        return cursor % n_tasks, cursor // n_tasks

    def set_metas(self, values: dict[str, Any]) -> None:
        """Several meta keys in one transaction (all or nothing)."""

        def txn_fn(txn: lmdb.Transaction) -> None:
            for key, value in values.items():
                self._put_meta(txn, key, value)

        self._write(txn_fn)

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self.env.begin() as txn:
            return self._get_meta(txn, key, default)

    def counters(self) -> dict[str, int]:
        counters = {k: 0 for k in COUNTER_KEYS}
        counters.update(self.get_meta("counters", {}))
        return counters

    def leases(self) -> dict[str, dict[str, Any]]:
        """Outstanding task leases (lease_id → {task_index, actor_id, ...}) as of the last commit (closed ones are
        kept in the table, see :meth:`get_lease`, but not listed here)."""
        with self.env.begin() as txn:
            out = {k.decode(): msgpack.unpackb(v, raw=False) for k, v in txn.cursor(db=self.db["leases"])}
        return {k: v for k, v in out.items() if "closed" not in v}

    def get_lease(self, lease_id: str) -> dict[str, Any] | None:
        """A lease this broker issued, open or closed (``closed``: "expired", "skipped" or "used:<group_id>")."""
        with self.env.begin() as txn:
            raw = txn.get(lease_id.encode(), db=self.db["leases"])
        return None if raw is None else msgpack.unpackb(raw, raw=False)

    def iter_batches(self) -> dict[tuple[int, int], list[str]]:
        """Every recorded (rank, step) → group ids handed to that learner rank for that step."""
        out = {}
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.db["batches"]):
                rank, step = k.decode().split(":")
                out[(int(rank), int(step))] = msgpack.unpackb(v, raw=False)
        return out

    def batch_assignment(self, rank: int, step: int) -> list[str]:
        with self.env.begin() as txn:
            return self._assigned(txn, SampleSpec(rank, step, 0, 0, 0))

    def pending_ids(self) -> list[str]:
        with self.env.begin() as txn:
            return [gid.decode() for _, gid in txn.cursor(db=self.db["pending"])]

    def ready_count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.db["ready"])["entries"]

    def get_record(self, group_id: str) -> bytes | None:
        with self.env.begin() as txn:
            raw = txn.get(group_id.encode(), db=self.db["groups"])
            return None if raw is None else bytes(raw)

    def get_status(self, group_id: str) -> dict[str, Any] | None:
        with self.env.begin() as txn:
            return self._status(txn, group_id.encode())

    def iter_status(self) -> list[tuple[str, dict[str, Any]]]:
        """Every group ever stored (including evicted ones) with its state, in key order."""
        with self.env.begin() as txn:
            return [(k.decode(), msgpack.unpackb(v, raw=False)) for k, v in txn.cursor(db=self.db["status"])]

    def close(self) -> None:
        self.env.close()
