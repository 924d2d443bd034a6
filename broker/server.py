"""The broker: one ROUTER socket, the only durable state, and the dispatcher between actors, scorers and learners.

Loop: poll → drain a batch of messages → apply every durable change of the turn in ONE fsync'd LMDB transaction →
answer → dispatch score jobs to idle scorers → requeue jobs of dead or late scorers → expire leases. Never an
infinite poll.

Failure model
- A message that does not decode is rejected, counted by reason in ``rejected/<reason>`` and logged once per reason;
  the broker stays up and serves the next message.
- A RolloutGroup is acknowledged only after its LMDB commit; a resent group (same ``group_id``) is acknowledged
  again and stored once.
- Scorers (liveness, deadlines, quarantine, fair dispatch, result checks): see :mod:`editrl.broker.scorers`.
- Admission control (flow control lives in the application): a lease is granted only while
  ``ingested + running < (η + v + 1)·B + dropped`` — AReaL's rule, with v the learner step of the latest published
  weights and every group that left untrained (stale, unscorable, evicted) given back.
- Storage: a failed commit (disk full, I/O error) answers nothing durable: groups get ``Ack(ok=False)`` and are
  resent by their actors, score results are kept and retried, leases and samples get ``Wait``. The broker stays up
  and recovers when the disk does. ``MapFullError`` grows the map inside the store.
- Restart: pending groups, scored replay, leases, task cursor, counters, weight version and the learner batch
  assignments are all in LMDB; scorer registry and job assignments are rebuilt (pending groups are re-dispatched).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

import lmdb
import zmq

from editrl.broker.processes import ProcessTable
from editrl.broker.scorers import ScorerPool, job_payload
from editrl.broker.store import ReplayStore, Sampled, SampleSpec
from editrl.common import codec, wire
from editrl.common.net import harden, new_id
from editrl.common.security import SecurityConfig, ServerWatch, secure_server
from editrl.common.tasks import Task

DRAIN_BATCH = 256  # messages handled per loop turn before committing
MAX_REMEMBERED_REQUESTS = 10_000


@dataclass
class Turn:
    """What one loop turn collected; everything durable in it is applied in one transaction."""

    size: int = 0
    groups: list[tuple[bytes, wire.RolloutGroup]] = field(default_factory=list)
    scored: list[tuple[str, list[float], dict[str, Any]]] = field(default_factory=list)
    unscorable: list[tuple[str, str]] = field(default_factory=list)
    samples: list[tuple[bytes, wire.SampleRequest]] = field(default_factory=list)
    leases: list[tuple[bytes, wire.LeaseRequest]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # lease ids to delete (group arrived, task skipped)
    skips: list[tuple[bytes, wire.SkipTask]] = field(default_factory=list)  # answered after the commit

    def has_writes(self) -> bool:
        return bool(
            self.groups or self.scored or self.unscorable or self.samples or self.leases or self.released or self.skips
        )


@dataclass
class Grant:
    """A lease decided this turn, made durable by the turn's commit before it is sent."""

    identity: bytes
    request: wire.LeaseRequest
    lease_id: str
    task_index: int
    replaces: str  # the expired lease whose task this re-issues ("" for a fresh task)


@dataclass
class LeaseEntry:
    task_index: int
    actor_id: str
    deadline: float


def _peer_host(frame: Any) -> str:
    """The IP a message came from (ZeroMQ's Peer-Address frame property), "" where the transport has none."""
    try:
        return str(frame.get("Peer-Address"))
    except Exception:  # ipc://, inproc://, or a frame without metadata
        return ""


def _group_info(g: wire.RolloutGroup) -> dict[str, Any]:
    """Small per-group metadata kept in the status table (inspection without decoding the record)."""
    return {
        "version": g.policy_version,
        "task_id": g.task_id,
        "task_type": g.task_type,
        "instruction": g.instruction,
        "actor_id": g.actor_id,
        "group_size": len(g.edit_pngs),
        "t_insert": time.time(),
    }


class Broker:
    def __init__(
        self,
        endpoint: str,
        store: ReplayStore,
        tasks: list[Task],
        groups_per_step: int,
        max_staleness: int,
        log: Any,
        ctx: zmq.Context | None = None,
        lease_timeout_s: float = wire.LEASE_TIMEOUT_S,
        score_deadline_s: float = wire.SCORE_JOB_DEADLINE_S,
        security: SecurityConfig | None = None,
        scorer_liveness_s: float = wire.SCORER_LIVENESS_S,
        storage_retry_s: float = wire.STORAGE_RETRY_S,
    ) -> None:
        if not tasks:
            raise ValueError("the task list is empty")
        self.store, self.tasks, self.log = store, tasks, log
        self.groups_per_step, self.max_staleness = groups_per_step, max_staleness
        self.lease_timeout_s, self.score_deadline_s = lease_timeout_s, score_deadline_s
        self.storage_retry_s = storage_retry_s
        self.ctx = ctx or zmq.Context()
        self.sock = harden(self.ctx.socket(zmq.ROUTER), hwm=10000)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted scorer reusing its id takes over the route
        self.auth = secure_server(self.sock, self.ctx, security or SecurityConfig())  # CURVE + ZAP allowlist, or None
        self.server_watch = ServerWatch(self.sock, self.auth)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        store.on_resize = lambda size: self.log.warning("replay_map_resized", map_size_bytes=size)
        now = time.monotonic()
        self.leases: dict[str, LeaseEntry] = {
            lid: LeaseEntry(info["task_index"], info["actor_id"], now + lease_timeout_s)
            for lid, info in store.leases().items()
        }
        self.lease_requests: collections.OrderedDict[str, str] = collections.OrderedDict(
            (info["request_id"], lid) for lid, info in store.leases().items() if "request_id" in info
        )  # request_id → lease_id, so a resent LeaseRequest gets its lease again
        self.retry_tasks: collections.deque[tuple[str, int]] = collections.deque()  # (expired lease id, task index)
        self.cursor: int = store.get_meta("task_cursor", 0)  # advanced when leases are planned
        self.committed_cursor: int = self.cursor  # as in LMDB
        self.weights: dict[str, Any] = store.get_meta("weights") or wire.weights_dict(
            wire.WeightsInfo(version=0, uri="", sha256="", kind="lora")
        )
        self.gauges: collections.Counter[str] = collections.Counter()  # process-lifetime counters (not durable)
        self.scorers = ScorerPool(store, log, self.gauges, self._send, score_deadline_s, scorer_liveness_s)
        self.processes = ProcessTable()  # for `editrl status`: who talks to us, how often, how idle
        self.durable: dict[str, int] = store.counters()  # the LMDB counters as of the last commit
        self.learner_step: int = store.get_meta("learner_step") or 0  # learner step of the latest published weights
        self.carry = Turn()  # score results and drops whose commit failed: retried next turn
        self.storage_ok = True
        self._logged_reasons: set[str] = set()
        self.log.info(
            "broker_started",
            endpoint=self.endpoint,
            pending=len(self.scorers.queue),
            leases=len(self.leases),
            task_cursor=self.cursor,
            weights=self.weights["version"],
        )

    # -- main loop ---------------------------------------------------------------------------------------------

    def run(self, should_stop: Any = lambda: False) -> None:
        while not should_stop():
            self.step(timeout_ms=100)

    def step(self, timeout_ms: int = 100) -> None:
        """One loop turn: drain what arrived, apply every durable change in ONE transaction, then answer.

        Replies that depend on durable state (acks, leases, batches) are sent only after the commit.
        """
        turn = Turn(scored=self.carry.scored, unscorable=self.carry.unscorable, released=self.carry.released)
        self.carry = Turn()
        if self.sock.poll(timeout_ms if not turn.has_writes() or not self.storage_ok else 0):
            while turn.size < DRAIN_BATCH:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                identity, payload = frames[0].bytes, frames[1:]
                try:
                    msg = codec.decode(payload)
                except wire.WireError as exc:
                    self._reject(identity, exc)
                    continue
                turn.size += 1
                self.processes.seen(msg, _peer_host(payload[0]))
                try:
                    self._classify(identity, msg, turn)
                except wire.WireError as exc:  # valid framing, invalid content (e.g. a bad weights map)
                    self._reject(identity, exc)
        if turn.has_writes():
            self._commit(turn)
        self._check_handshakes()
        self.scorers.check()
        self.scorers.dispatch()
        self._expire_leases()

    def _classify(self, identity: bytes, msg: Any, turn: Turn) -> None:
        if isinstance(msg, wire.RolloutGroup):
            turn.groups.append((identity, msg))
        elif isinstance(msg, wire.ScoreResult):
            self.scorers.on_result(msg, turn)
        elif isinstance(msg, wire.SampleRequest):
            turn.samples.append((identity, msg))
        elif isinstance(msg, wire.CheckGroup):
            self.scorers.add_check(identity, msg)
        elif isinstance(msg, wire.LeaseRequest):
            lease_id = self.lease_requests.get(msg.request_id)
            if lease_id in self.leases:  # a resend (lost reply, broker restart): the same lease again, not a second
                self._send_lease(identity, msg, lease_id, self.leases[lease_id].task_index)
            elif self.storage_ok and self.admission_open(extra=len(turn.leases)):
                turn.leases.append((identity, msg))
            else:
                self.gauges["lease_waits"] += 1
                reason = "admission" if self.storage_ok else "storage_unavailable"
                self._send(identity, wire.Wait(msg.request_id, 0.2, reason, self.weights))
                self.processes.waited(msg, 0.2)
        elif isinstance(msg, wire.ScorerReady | wire.Heartbeat):
            self.scorers.on_worker(identity, msg)
        elif isinstance(msg, wire.PublishWeights):
            self._on_publish(identity, msg)
        elif isinstance(msg, wire.SkipTask):
            self._on_skip(identity, msg, turn)
        elif isinstance(msg, wire.StatusRequest):
            in_flight = {w.worker_id: len(w.jobs) for w in self.scorers.workers.values()}
            processes = self.processes.snapshot(int(self.weights.get("version", 0)), in_flight)
            self._send(identity, wire.Status(msg.request_id, self.counters(), self.weights, processes))
        else:
            self._reject(identity, wire.WireError("unexpected_type", type(msg).__name__))

    def _commit(self, turn: Turn) -> None:
        inserts, accepted = [], []
        for identity, g in turn.groups:
            record = codec.encode_record(codec.encode(g))
            if len(record) > wire.MAX_FRAME_BYTES:  # could never be handed to a learner in one frame: refuse, once
                self.gauges["rejected/group_too_large"] += 1
                self.log.error("group_rejected_too_large", group_id=g.group_id, bytes=len(record))
                self._send(identity, wire.Ack(g.request_id, False, "rejected: group too large", self.weights))
                continue
            inserts.append((g.group_id, record, _group_info(g)))
            accepted.append((identity, g))
        turn.groups = accepted
        grants = self._plan_leases(turn)
        released = [*turn.released, *(g.lease_id for _, g in turn.groups), *(g.replaces for g in grants if g.replaces)]
        try:
            result = self.store.commit_turn(
                inserts=inserts,
                scored=turn.scored,
                unscorable=turn.unscorable,
                samples=[
                    SampleSpec(m.rank, m.step, max(0, m.offset), max(0, m.max_groups), m.min_version)
                    for _, m in turn.samples
                ],
                task_cursor=self.cursor if self.cursor != self.committed_cursor else None,
                lease_puts=[
                    (
                        g.lease_id,
                        {
                            "task_index": g.task_index,
                            "actor_id": g.request.actor_id,
                            "request_id": g.request.request_id,
                        },
                    )
                    for g in grants
                ],
                lease_deletes=released,
            )  # committed (fsync) before any reply below
        except lmdb.Error as exc:
            self._commit_failed(turn, grants, exc)
            return
        if not self.storage_ok:
            self.storage_ok = True
            self.log.warning("storage_recovered")
        self.durable = result.counters
        self.committed_cursor = self.cursor
        self._answer_groups(turn, result.inserted)
        self._answer_skips(turn)
        self.scorers.after_scores(turn, result.scored, result.dropped)
        for (identity, req), (taken, stale) in zip(turn.samples, result.samples, strict=True):
            if stale:
                self.log.info("groups_dropped_stale", count=stale, min_version=req.min_version)
            if taken:
                self._send(identity, _batch(req.request_id, taken, stale))
            else:
                self._send(identity, wire.Wait(req.request_id, 0.1, "replay_empty", self.weights))
                self.processes.waited(req, 0.1)
        for grant in grants:
            self._grant_lease(grant)

    def _commit_failed(self, turn: Turn, grants: list[Grant], exc: Exception) -> None:
        """Nothing of this turn is durable: say so to every waiting client and keep what cannot be resent."""
        self.gauges["storage_failures"] += 1
        if self.storage_ok:
            self.log.error("storage_write_failed", error=str(exc)[:200], action="not acknowledging; retrying")
        self.storage_ok = False
        self.cursor = self.committed_cursor
        self.retry_tasks.extendleft((g.replaces, g.task_index) for g in reversed(grants) if g.replaces)
        self.carry = Turn(scored=turn.scored, unscorable=turn.unscorable, released=turn.released)
        for identity, g in [*turn.groups, *turn.skips]:
            self._send(identity, wire.Ack(g.request_id, False, "storage_unavailable", self.weights))
        for identity, m in [*turn.samples, *turn.leases]:
            self._send(identity, wire.Wait(m.request_id, self.storage_retry_s, "storage_unavailable", self.weights))

    def _check_handshakes(self) -> None:
        """Clients whose CURVE handshake failed (unknown key, plaintext, wrong server key): counted, logged once per
        reason. They never reach the application."""
        messages = self.server_watch.poll()
        for reason, n in self.server_watch.rejected.items():
            self.gauges[f"rejected/handshake_{reason}"] = n
            if messages and f"handshake:{reason}" not in self._logged_reasons:
                self._logged_reasons.add(f"handshake:{reason}")
                self.log.warning("handshake_rejected", reason=reason, detail=messages[0][:300])

    def _reject(self, identity: bytes, exc: wire.WireError) -> None:
        self.gauges[f"rejected/{exc.reason}"] += 1
        if exc.reason not in self._logged_reasons:  # once per reason: a flood of garbage must not flood the log
            self._logged_reasons.add(exc.reason)
            self.log.warning("message_rejected", reason=exc.reason, detail=str(exc)[:200], peer=identity[:32].hex())

    def _send(self, identity: bytes, msg: Any) -> None:
        try:  # never block the loop on one peer: a full pipe (a peer that stopped reading) drops this reply
            self.sock.send_multipart([identity, *codec.encode(msg)], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer left) or EAGAIN (its pipe is full): it resends, same ids
            self.gauges["send_failed"] += 1
            self.log.debug("reply_undeliverable", error=str(exc))

    # -- actors ------------------------------------------------------------------------------------------------

    def admission_open(self, extra: int = 0) -> bool:
        """AReaL's capacity rule ``ingested + running ≤ (η + v + 1)·B`` with v = the learner step of the latest
        published weights (so a group leased now, generated with those weights, is trained at most η versions
        later) plus every group that left without being trained (dropped or evicted), so producers never deadlock."""
        c = self.durable
        dropped = c["dropped_stale"] + c["dropped_unscorable"] + c["evicted_unconsumed"]
        budget = (self.max_staleness + 1 + self.learner_step) * self.groups_per_step + dropped
        return c["ingested"] + len(self.leases) + extra < budget

    def _plan_leases(self, turn: Turn) -> list[Grant]:
        """One grant per admitted lease request: tasks of expired leases first, then the task cursor."""
        grants = []
        for identity, req in turn.leases:
            if self.retry_tasks:
                replaces, index = self.retry_tasks.popleft()
            else:
                replaces, index = "", self.cursor % len(self.tasks)
                self.cursor += 1
            grants.append(Grant(identity, req, new_id(), index, replaces))
        return grants

    def _grant_lease(self, grant: Grant) -> None:
        self.leases[grant.lease_id] = LeaseEntry(
            grant.task_index, grant.request.actor_id, time.monotonic() + self.lease_timeout_s
        )
        self._remember_request(grant.request.request_id, grant.lease_id)
        self._send_lease(grant.identity, grant.request, grant.lease_id, grant.task_index)

    def _remember_request(self, request_id: str, lease_id: str) -> None:
        self.lease_requests[request_id] = lease_id
        while len(self.lease_requests) > MAX_REMEMBERED_REQUESTS:  # bounded LRU of answered lease requests
            self.lease_requests.popitem(last=False)

    def _send_lease(self, identity: bytes, request: wire.LeaseRequest, lease_id: str, index: int) -> None:
        task = self.tasks[index]
        self._send(
            identity,
            wire.Lease(
                request_id=request.request_id,
                lease_id=lease_id,
                task_id=task.task_id,
                instruction=task.instruction,
                task_type=task.task_type,
                input_images=list(task.input_images),
                weights=self.weights,
            ),
        )

    def _answer_groups(self, turn: Turn, inserted: list[bool]) -> None:
        for (identity, g), is_new in zip(turn.groups, inserted, strict=True):
            self.leases.pop(g.lease_id, None)
            if is_new:
                self.scorers.add(g.group_id, job_payload(g))
                self.log.debug("group_stored", group_id=g.group_id, actor_id=g.actor_id, version=g.policy_version)
            else:
                self.log.info("replay_insert_duplicate", group_id=g.group_id)
            self._send(identity, wire.Ack(g.request_id, True, "stored" if is_new else "duplicate", self.weights))

    def _on_skip(self, identity: bytes, msg: wire.SkipTask, turn: Turn) -> None:
        turn.released.append(msg.lease_id)
        turn.skips.append((identity, msg))

    def _answer_skips(self, turn: Turn) -> None:
        for identity, msg in turn.skips:
            if self.leases.pop(msg.lease_id, None) is not None:
                self.gauges["tasks_skipped"] += 1
                self.log.warning("task_skipped", task_id=msg.task_id, actor_id=msg.actor_id, reason=msg.reason)
            self._send(identity, wire.Ack(msg.request_id, True, "skipped", self.weights))

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for lease_id, lease in list(self.leases.items()):
            if lease.deadline < now:
                del self.leases[lease_id]
                self.retry_tasks.append((lease_id, lease.task_index))  # deleted from LMDB when re-granted
                self.gauges["leases_expired"] += 1
                self.log.warning("lease_expired", lease_id=lease_id, actor_id=lease.actor_id)

    # -- learners ----------------------------------------------------------------------------------------------

    def _on_publish(self, identity: bytes, msg: wire.PublishWeights) -> None:
        info = wire.weights_from_dict(msg.weights)
        newer = info.version > self.weights["version"]
        weights = wire.weights_dict(info) if newer else self.weights
        learner_step = max(self.learner_step, msg.learner_step)
        try:  # weights and the learner step that admission control reads: one transaction, all or nothing
            self.store.set_metas({"weights": weights, "learner_step": learner_step})
        except lmdb.Error as exc:
            self.log.error("storage_write_failed", error=str(exc)[:200], what="weights")
            self._send(identity, wire.Wait(msg.request_id, self.storage_retry_s, "storage_unavailable", self.weights))
            return
        self.weights, self.learner_step = weights, learner_step
        if newer:
            self.log.info("weights_published", version=info.version, uri=info.uri, learner_step=msg.learner_step)
        self._send(identity, wire.Ack(msg.request_id, True, "published", self.weights))

    def counters(self) -> dict[str, int]:
        out = dict(self.durable)
        out.update(self.gauges)
        out.update(
            {
                **self.scorers.counters(),
                "queue/ready": self.store.ready_count(),
                "leases": len(self.leases),
                "weights_version": int(self.weights["version"]),
                "learner_step": self.learner_step,
                "storage_ok": int(self.storage_ok),
            }
        )
        return out

    def close(self) -> None:
        self.server_watch.close()
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()


def _batch(request_id: str, taken: list[Sampled], stale: int) -> wire.Batch:
    """The learner's Batch: records and rewards, plus each edit's held-out gold score when a gold scorer judged it."""
    gold = [wire.gold_scores(scores.get("sub_scores"), len(rewards)) for _, _, rewards, scores in taken]
    has_gold = any(v is not None for g in gold for v in g)
    return wire.Batch(request_id, [t[1] for t in taken], [t[2] for t in taken], stale, gold if has_gold else [])
