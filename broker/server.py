"""The broker: one ROUTER socket, the only durable state, and the dispatcher between actors, scorers and learners.

Loop: poll → drain a batch of messages → apply every durable change of the turn in ONE fsync'd LMDB transaction →
answer → dispatch score jobs to idle scorers → requeue jobs of dead or late scorers → expire leases. Never an
infinite poll.

Failure model
- A message that does not decode is rejected, counted by reason in ``rejected/<reason>`` and logged once per reason;
  the broker stays up and serves the next message.
- A RolloutGroup is acknowledged only after its LMDB commit; a resent group (same ``group_id``) is acknowledged
  again and stored once.
- Scorers: a scorer silent for ``SCORER_LIVENESS_S`` is dead; a job past its deadline is late (the scorer heartbeats
  but is stuck): both are requeued, and a scorer that missed ``QUARANTINE_AFTER_MISSES`` deadlines gets no more jobs.
  A result for a group that is no longer pending (a late duplicate) is counted and ignored.
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

from editrl.broker.store import ReplayStore, SampleSpec
from editrl.common import wire
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
class Worker:
    worker_id: str
    identity: bytes  # ROUTER routing id of its job socket
    capacity: int
    last_seen: float
    jobs: set[str] = field(default_factory=set)
    misses: int = 0  # deadlines missed
    expired: dict[str, float] = field(default_factory=dict)  # late job id → when it counts as missed again
    quarantined: bool = False


@dataclass
class Job:
    job_id: str
    group_id: str
    worker_id: str
    deadline: float


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


def _job_payload(g: wire.RolloutGroup) -> tuple[str, str, bytes, list[bytes]]:
    return (g.instruction, g.task_type, g.source_png, g.edit_pngs)


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
    ) -> None:
        if not tasks:
            raise ValueError("the task list is empty")
        self.store, self.tasks, self.log = store, tasks, log
        self.groups_per_step, self.max_staleness = groups_per_step, max_staleness
        self.lease_timeout_s, self.score_deadline_s = lease_timeout_s, score_deadline_s
        self.ctx = ctx or zmq.Context()
        self.sock = harden(self.ctx.socket(zmq.ROUTER), hwm=10000)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted scorer reusing its id takes over the route
        self.auth = secure_server(self.sock, self.ctx, security or SecurityConfig())  # CURVE + ZAP allowlist, or None
        self.server_watch = ServerWatch(self.sock, self.auth)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        store.on_resize = lambda size: self.log.warning("replay_map_resized", map_size_bytes=size)
        self.workers: dict[str, Worker] = {}
        self.jobs: dict[str, Job] = {}
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
        self.requeues: dict[str, int] = collections.Counter()
        self.queue: collections.deque[str] = collections.deque(store.pending_ids())  # groups awaiting a scorer
        self.weights: dict[str, Any] = store.get_meta("weights") or wire.weights_dict(
            wire.WeightsInfo(version=0, uri="", sha256="", kind="lora")
        )
        self.gauges: collections.Counter[str] = collections.Counter()  # process-lifetime counters (not durable)
        self.durable: dict[str, int] = store.counters()  # the LMDB counters as of the last commit
        self.learner_step: int = store.get_meta("learner_step") or 0  # learner step of the latest published weights
        self.payloads: dict[str, tuple[str, str, bytes, list[bytes]]] = {}  # ScoreJob fields of pending groups
        self.carry = Turn()  # score results and drops whose commit failed: retried next turn
        self._rr = 0  # round-robin start among scorers
        self.storage_ok = True
        self._logged_reasons: set[str] = set()
        self.log.info(
            "broker_started",
            endpoint=self.endpoint,
            pending=len(self.queue),
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
                    msg = wire.decode(payload)
                except wire.WireError as exc:
                    self._reject(identity, exc)
                    continue
                turn.size += 1
                try:
                    self._classify(identity, msg, turn)
                except wire.WireError as exc:  # valid framing, invalid content (e.g. a bad weights map)
                    self._reject(identity, exc)
        if turn.has_writes():
            self._commit(turn)
        self._check_handshakes()
        self._check_workers()
        self._dispatch()
        self._expire_leases()

    def _classify(self, identity: bytes, msg: Any, turn: Turn) -> None:
        if isinstance(msg, wire.RolloutGroup):
            turn.groups.append((identity, msg))
        elif isinstance(msg, wire.ScoreResult):
            self._on_result(msg, turn)
        elif isinstance(msg, wire.SampleRequest):
            turn.samples.append((identity, msg))
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
        elif isinstance(msg, wire.ScorerReady | wire.Heartbeat):
            self._on_worker(identity, msg)
        elif isinstance(msg, wire.PublishWeights):
            self._on_publish(identity, msg)
        elif isinstance(msg, wire.SkipTask):
            self._on_skip(identity, msg, turn)
        elif isinstance(msg, wire.StatusRequest):
            self._send(identity, wire.Status(msg.request_id, self.counters(), self.weights))
        else:
            self._reject(identity, wire.WireError("unexpected_type", type(msg).__name__))

    def _commit(self, turn: Turn) -> None:
        inserts, accepted = [], []
        for identity, g in turn.groups:
            record = wire.encode_record(wire.encode(g))
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
        self._after_scores(turn, result.scored, result.dropped)
        for (identity, req), (taken, stale) in zip(turn.samples, result.samples, strict=True):
            if stale:
                self.log.info("groups_dropped_stale", count=stale, min_version=req.min_version)
            if taken:
                batch = wire.Batch(req.request_id, [rec for _, rec, _ in taken], [r for _, _, r in taken], stale)
                self._send(identity, batch)
            else:
                self._send(identity, wire.Wait(req.request_id, 0.1, "replay_empty", self.weights))
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
            self._send(identity, wire.Wait(m.request_id, wire.STORAGE_RETRY_S, "storage_unavailable", self.weights))

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
            self.sock.send_multipart([identity, *wire.encode(msg)], flags=zmq.NOBLOCK, copy=False)
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
                self.queue.append(g.group_id)
                self.payloads[g.group_id] = _job_payload(g)
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

    # -- scorers -----------------------------------------------------------------------------------------------

    def _on_worker(self, identity: bytes, msg: wire.ScorerReady | wire.Heartbeat) -> None:
        worker = self.workers.get(msg.worker_id)
        if worker is None:
            if not isinstance(msg, wire.ScorerReady):
                return  # a heartbeat from a worker we do not know (e.g. after our restart): it re-announces itself
            worker = Worker(msg.worker_id, identity, max(1, msg.capacity), time.monotonic())
            self.workers[msg.worker_id] = worker
            self.log.info("scorer_joined", worker_id=msg.worker_id, capacity=worker.capacity)
        elif isinstance(msg, wire.ScorerReady) and identity != worker.identity:
            # Same worker id from a new socket: the old process is gone; its jobs will never be answered.
            self.log.warning("scorer_restarted", worker_id=msg.worker_id, jobs=len(worker.jobs))
            for job_id in list(worker.jobs):
                self._requeue(job_id, "worker_restarted")
            worker.identity, worker.jobs, worker.misses, worker.quarantined = identity, set(), 0, False
            worker.expired.clear()
        worker.last_seen = time.monotonic()

    def _on_result(self, msg: wire.ScoreResult, turn: Turn) -> None:
        job = self.jobs.get(msg.job_id)
        if job is not None and (job.group_id != msg.group_id or job.worker_id != msg.worker_id):
            raise wire.WireError("result_mismatch", f"job {msg.job_id} is not {msg.group_id} on {msg.worker_id}")
        status = None if msg.group_id in self.payloads else self.store.get_status(msg.group_id)
        size = len(self.payloads[msg.group_id][3]) if status is None and msg.group_id in self.payloads else None
        if status is not None:
            size = status.get("group_size")
        if size is None:  # a group we never stored
            raise wire.WireError("result_unknown_group", msg.group_id)
        if not len(msg.scored) == len(msg.overall) == len(msg.sub_scores) == len(msg.reasoning) == size:
            raise wire.WireError("result_size", f"{msg.group_id}: {len(msg.overall)} scores for {size} edits")
        on_time = self.jobs.pop(msg.job_id, None) is not None
        worker = self.workers.get(msg.worker_id)
        if worker is not None:
            worker.last_seen = time.monotonic()
            worker.jobs.discard(msg.job_id)
            worker.expired.pop(msg.job_id, None)
            if on_time:
                worker.misses, worker.quarantined = 0, False
        if not on_time and msg.group_id in self.queue:
            self.queue.remove(msg.group_id)  # a late result for a requeued, not yet re-dispatched group: use it
        if not all(msg.scored) or any(o is None for o in msg.overall):
            self._unscored(msg.group_id, turn)
            return
        scores = {"sub_scores": msg.sub_scores, "reasoning": msg.reasoning, "worker_id": msg.worker_id}
        turn.scored.append((msg.group_id, [float(o) for o in msg.overall], scores))

    def _after_scores(self, turn: Turn, scored: list[bool], dropped: list[bool]) -> None:
        for (group_id, _, _), ok in zip(turn.scored, scored, strict=True):
            self.payloads.pop(group_id, None)
            self.requeues.pop(group_id, None)
            if ok:
                self.gauges["results"] += 1
                self.log.debug("group_scored", group_id=group_id)
            else:
                self.gauges["duplicate_results"] += 1
                self.log.info("score_result_duplicate", group_id=group_id)
        for (group_id, _), ok in zip(turn.unscorable, dropped, strict=True):
            self.payloads.pop(group_id, None)
            self.requeues.pop(group_id, None)
            if ok:
                self.log.warning("group_dropped_unscorable", group_id=group_id)

    def _unscored(self, group_id: str, turn: Turn) -> None:
        """Some edit could not be scored: requeue the group once, then drop it (counted). Never invent a score."""
        if group_id not in self.payloads:
            status = self.store.get_status(group_id)
            if status is None or status["state"] != "pending":
                return  # a late unscored result for a group already decided
        self.requeues[group_id] += 1
        if self.requeues[group_id] <= 1:
            self.gauges["unscored_requeued"] += 1
            self.log.warning("score_requeued", group_id=group_id, reason="unscored")
            self.queue.append(group_id)
        else:
            turn.unscorable.append((group_id, "unscored after retry"))

    def _check_workers(self) -> None:
        now = time.monotonic()
        for worker_id, worker in list(self.workers.items()):
            if now - worker.last_seen > wire.SCORER_LIVENESS_S:
                del self.workers[worker_id]
                self.log.warning("scorer_dead", worker_id=worker_id, jobs=len(worker.jobs))
                for job_id in list(worker.jobs):
                    self._requeue(job_id, "worker_dead")
        for job_id, job in list(self.jobs.items()):
            if job.deadline < now:
                worker = self.workers.get(job.worker_id)
                # The late job keeps its slot on the worker until it answers or dies (a slow scorer is not handed a
                # second job to miss as well); every further deadline it stays unanswered counts as another miss.
                if worker is not None:
                    worker.expired[job_id] = now + self.score_deadline_s
                    self._missed(worker)
                self._requeue(job_id, "deadline")
        for worker in self.workers.values():
            for job_id, again in list(worker.expired.items()):
                if again < now:
                    worker.expired[job_id] = now + self.score_deadline_s
                    self._missed(worker)

    def _missed(self, worker: Worker) -> None:
        worker.misses += 1
        live = sum(not w.quarantined for w in self.workers.values())
        if worker.misses >= wire.QUARANTINE_AFTER_MISSES and not worker.quarantined and live > 1:
            worker.quarantined = True  # never the last live scorer: then slow is better than nothing
            self.gauges["scorers_quarantined"] += 1
            self.log.error("scorer_quarantined", worker_id=worker.worker_id, misses=worker.misses)

    def _requeue(self, job_id: str, reason: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self.gauges[f"requeued/{reason}"] += 1
            self.log.warning("score_requeued", group_id=job.group_id, reason=reason, worker_id=job.worker_id)
            self.queue.appendleft(job.group_id)

    def _dispatch(self) -> None:
        """Round-robin, one job per worker per pass, so every live scorer gets work (and a stuck one is found)."""
        workers = [w for w in self.workers.values() if not w.quarantined]
        if not workers:
            return
        self._rr = (self._rr + 1) % len(workers)
        workers = workers[self._rr :] + workers[: self._rr]
        progress = True
        while self.queue and progress:
            progress = False
            for worker in workers:
                if not self.queue or len(worker.jobs) >= worker.capacity:
                    continue
                group_id = self.queue.popleft()
                payload = self.payloads.get(group_id) or self._load_payload(group_id)
                progress = True
                if payload is None:
                    continue  # no longer pending (scored by a late result, or dropped)
                job = Job(new_id(), group_id, worker.worker_id, time.monotonic() + self.score_deadline_s)
                self.jobs[job.job_id] = job
                worker.jobs.add(job.job_id)
                self._send(worker.identity, wire.ScoreJob(job.job_id, group_id, *payload))

    def _load_payload(self, group_id: str) -> tuple[str, str, bytes, list[bytes]] | None:
        """The ScoreJob fields of a pending group, from LMDB (after a restart; normally kept in memory)."""
        status = self.store.get_status(group_id)
        record = self.store.get_record(group_id)
        if status is None or record is None or status["state"] != "pending":
            return None
        payload = _job_payload(wire.decode(wire.decode_record(record)))
        self.payloads[group_id] = payload
        return payload

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
            self._send(identity, wire.Wait(msg.request_id, wire.STORAGE_RETRY_S, "storage_unavailable", self.weights))
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
                "queue/pending_scoring": len(self.queue),
                "queue/jobs_inflight": len(self.jobs),
                "queue/ready": self.store.ready_count(),
                "scorers": len(self.workers),
                "scorers_live": sum(not w.quarantined for w in self.workers.values()),
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
