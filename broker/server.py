"""The broker: one ROUTER socket, the only durable state, and the dispatcher between actors, scorers and learners.

Loop: poll → drain a batch of messages → store new groups in ONE fsync'd transaction → acknowledge them → dispatch
score jobs to idle scorers → requeue jobs of dead or late scorers → expire leases. Never an infinite poll.

Failure model
- A message that does not decode is rejected, counted by reason in ``rejected/<reason>`` and logged once per reason;
  the broker stays up and serves the next message.
- A RolloutGroup is acknowledged only after its LMDB commit; a resent group (same ``group_id``) is acknowledged
  again and stored once.
- A scorer silent for ``SCORER_LIVENESS_S`` is dead; a job past its deadline is late: both are requeued. A result
  for a group that is no longer pending (a late duplicate) is counted and ignored.
- Admission control (flow control lives in the application): a lease is granted only while
  ``ingested + running < (η + v + 1)·B + dropped`` — AReaL's rule, with v the learner step of the latest published
  weights and every group that left untrained (stale, unscorable, evicted) given back.
- In-memory only (rebuilt after a restart): leases, scorer registry, job assignments. Pending groups are reloaded
  from LMDB and re-dispatched, so a restart loses no work.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from editrl.broker.store import ReplayStore
from editrl.common import wire
from editrl.common.net import harden, new_id
from editrl.common.tasks import Task

DRAIN_BATCH = 256  # messages handled per loop turn before committing


@dataclass
class Turn:
    """What one loop turn collected; everything durable in it is applied in one transaction."""

    size: int = 0
    groups: list[tuple[bytes, wire.RolloutGroup]] = field(default_factory=list)
    scored: list[tuple[str, list[float], dict[str, Any]]] = field(default_factory=list)
    unscorable: list[tuple[str, str]] = field(default_factory=list)
    samples: list[tuple[bytes, wire.SampleRequest]] = field(default_factory=list)
    leases: list[tuple[bytes, wire.LeaseRequest]] = field(default_factory=list)

    def has_writes(self) -> bool:
        return bool(self.groups or self.scored or self.unscorable or self.samples or self.leases)


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


@dataclass
class Worker:
    identity: bytes
    worker_id: str
    capacity: int
    last_seen: float
    jobs: set[str] = field(default_factory=set)


@dataclass
class Job:
    job_id: str
    group_id: str
    identity: bytes
    deadline: float


@dataclass
class LeaseEntry:
    task_index: int
    actor_id: str
    deadline: float


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
    ) -> None:
        if not tasks:
            raise ValueError("the task list is empty")
        self.store, self.tasks, self.log = store, tasks, log
        self.groups_per_step, self.max_staleness = groups_per_step, max_staleness
        self.lease_timeout_s, self.score_deadline_s = lease_timeout_s, score_deadline_s
        self.ctx = ctx or zmq.Context()
        self.sock = harden(self.ctx.socket(zmq.ROUTER), hwm=10000)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers: dict[bytes, Worker] = {}
        self.jobs: dict[str, Job] = {}
        self.leases: dict[str, LeaseEntry] = {}
        self.retry_tasks: collections.deque[int] = collections.deque()
        self.requeues: dict[str, int] = collections.Counter()
        self.queue: collections.deque[str] = collections.deque(store.pending_ids())  # groups awaiting a scorer
        self.weights: dict[str, Any] = store.get_meta("weights") or wire.weights_dict(
            wire.WeightsInfo(version=0, uri="", sha256="", kind="lora")
        )
        self.gauges: collections.Counter[str] = collections.Counter()  # process-lifetime counters (not durable)
        self.durable: dict[str, int] = store.counters()  # the LMDB counters as of the last commit
        self.learner_step: int = store.get_meta("learner_step") or 0  # learner step of the latest published weights
        self.payloads: dict[str, tuple[str, str, bytes, list[bytes]]] = {}  # ScoreJob fields of pending groups
        self._logged_reasons: set[str] = set()
        self.log.info(
            "broker_started", endpoint=self.endpoint, pending=len(self.queue), weights=self.weights["version"]
        )

    # -- main loop ---------------------------------------------------------------------------------------------

    def run(self, should_stop: Any = lambda: False) -> None:
        while not should_stop():
            self.step(timeout_ms=100)

    def step(self, timeout_ms: int = 100) -> None:
        """One loop turn: drain what arrived, apply every durable change in ONE transaction, then answer.

        Replies that depend on durable state (acks, leases, batches) are sent only after the commit.
        """
        turn = Turn()
        if self.sock.poll(timeout_ms):
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
                self._classify(identity, msg, turn)
        if turn.has_writes():
            self._commit(turn)
        self._check_workers()
        self._dispatch()
        self._expire_leases()

    def _classify(self, identity: bytes, msg: Any, turn: Turn) -> None:
        if isinstance(msg, wire.RolloutGroup):
            turn.groups.append((identity, msg))
        elif isinstance(msg, wire.ScoreResult):
            self._on_result(identity, msg, turn)
        elif isinstance(msg, wire.SampleRequest):
            turn.samples.append((identity, msg))
        elif isinstance(msg, wire.LeaseRequest):
            if self.admission_open(extra=len(turn.leases)):
                turn.leases.append((identity, msg))
            else:
                self.gauges["lease_waits"] += 1
                self._send(identity, wire.Wait(msg.request_id, 0.2, "admission", self.weights))
        elif isinstance(msg, wire.ScorerReady | wire.Heartbeat):
            self._on_worker(identity, msg)
        elif isinstance(msg, wire.PublishWeights):
            self._on_publish(identity, msg)
        elif isinstance(msg, wire.SkipTask):
            self._on_skip(identity, msg)
        elif isinstance(msg, wire.StatusRequest):
            self._send(identity, wire.Status(msg.request_id, self.counters(), self.weights))
        else:
            self._reject(identity, wire.WireError("unexpected_type", type(msg).__name__))

    def _commit(self, turn: Turn) -> None:
        inserts = [(g.group_id, wire.encode_record(wire.encode(g)), _group_info(g)) for _, g in turn.groups]
        retry = [self.retry_tasks.popleft() for _ in range(min(len(turn.leases), len(self.retry_tasks)))]
        result = self.store.commit_turn(
            inserts=inserts,
            scored=turn.scored,
            unscorable=turn.unscorable,
            samples=[(max(0, m.max_groups), m.min_version) for _, m in turn.samples],
            leases=len(turn.leases) - len(retry),
            n_tasks=len(self.tasks),
        )  # committed (fsync) before any reply below
        self.durable = result.counters
        for (identity, g), is_new in zip(turn.groups, result.inserted, strict=True):
            self.leases.pop(g.lease_id, None)
            if is_new:
                self.queue.append(g.group_id)
                self.payloads[g.group_id] = _job_payload(g)
            else:
                self.log.info("replay_insert_duplicate", group_id=g.group_id)
            self._send(identity, wire.Ack(g.request_id, True, "stored" if is_new else "duplicate", self.weights))
        for (group_id, _, _), ok in zip(turn.scored, result.scored, strict=True):
            self.payloads.pop(group_id, None)
            if ok:
                self.gauges["results"] += 1
            else:
                self.gauges["duplicate_results"] += 1
                self.log.info("score_result_duplicate", group_id=group_id)
        for (group_id, _), ok in zip(turn.unscorable, result.dropped, strict=True):
            self.payloads.pop(group_id, None)
            if ok:
                self.log.warning("group_dropped_unscorable", group_id=group_id)
        for (identity, req), (taken, stale) in zip(turn.samples, result.samples, strict=True):
            if stale:
                self.log.info("groups_dropped_stale", count=stale, min_version=req.min_version)
            if taken:
                batch = wire.Batch(req.request_id, [rec for _, rec, _ in taken], [r for _, _, r in taken], stale)
                self._send(identity, batch)
            else:
                self._send(identity, wire.Wait(req.request_id, 0.1, "replay_empty", self.weights))
        cursors = retry + [c % len(self.tasks) for c in result.task_indices]
        for (identity, req), index in zip(turn.leases, cursors, strict=True):
            self._grant_lease(identity, req, index)

    def _reject(self, identity: bytes, exc: wire.WireError) -> None:
        self.gauges[f"rejected/{exc.reason}"] += 1
        if exc.reason not in self._logged_reasons:  # once per reason: a flood of garbage must not flood the log
            self._logged_reasons.add(exc.reason)
            self.log.warning("message_rejected", reason=exc.reason, detail=str(exc)[:200], peer=identity[:32].hex())

    def _send(self, identity: bytes, msg: Any) -> None:
        try:
            self.sock.send_multipart([identity, *wire.encode(msg)], copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer left; it will resend with the same ids
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

    def _grant_lease(self, identity: bytes, msg: wire.LeaseRequest, index: int) -> None:
        task = self.tasks[index]
        lease_id = new_id()
        self.leases[lease_id] = LeaseEntry(index, msg.actor_id, time.monotonic() + self.lease_timeout_s)
        self._send(
            identity,
            wire.Lease(
                request_id=msg.request_id,
                lease_id=lease_id,
                task_id=task.task_id,
                instruction=task.instruction,
                task_type=task.task_type,
                input_images=list(task.input_images),
                weights=self.weights,
            ),
        )

    def _on_skip(self, identity: bytes, msg: wire.SkipTask) -> None:
        self.leases.pop(msg.lease_id, None)
        self.gauges["tasks_skipped"] += 1
        self.log.warning("task_skipped", task_id=msg.task_id, actor_id=msg.actor_id, reason=msg.reason)
        self._send(identity, wire.Ack(msg.request_id, True, "skipped", self.weights))

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for lease_id, lease in list(self.leases.items()):
            if lease.deadline < now:
                del self.leases[lease_id]
                self.retry_tasks.append(lease.task_index)
                self.gauges["leases_expired"] += 1
                self.log.warning("lease_expired", lease_id=lease_id, actor_id=lease.actor_id)

    # -- scorers -----------------------------------------------------------------------------------------------

    def _on_worker(self, identity: bytes, msg: wire.ScorerReady | wire.Heartbeat) -> None:
        worker = self.workers.get(identity)
        if worker is None:
            capacity = msg.capacity if isinstance(msg, wire.ScorerReady) else 1
            worker = self.workers[identity] = Worker(identity, msg.worker_id, max(1, capacity), time.monotonic())
            self.log.info("scorer_joined", worker_id=msg.worker_id, capacity=worker.capacity)
        worker.last_seen = time.monotonic()

    def _on_result(self, identity: bytes, msg: wire.ScoreResult, turn: Turn) -> None:
        job = self.jobs.pop(msg.job_id, None)
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
            worker.jobs.discard(msg.job_id)
        if job is None and msg.group_id in self.queue:
            self.queue.remove(msg.group_id)  # a late result for a requeued, not yet re-dispatched group: use it
        if not all(msg.scored) or any(o is None for o in msg.overall):
            self._unscored(msg.group_id, turn)
            return
        scores = {"sub_scores": msg.sub_scores, "reasoning": msg.reasoning, "worker_id": msg.worker_id}
        turn.scored.append((msg.group_id, [float(o) for o in msg.overall], scores))

    def _unscored(self, group_id: str, turn: Turn) -> None:
        """Some edit could not be scored: requeue the group once, then drop it (counted). Never invent a score."""
        self.requeues[group_id] += 1
        if self.requeues[group_id] <= 1:
            self.gauges["unscored_requeued"] += 1
            self.log.warning("score_requeued", group_id=group_id, reason="unscored")
            self.queue.append(group_id)
        else:
            turn.unscorable.append((group_id, "unscored after retry"))

    def _check_workers(self) -> None:
        now = time.monotonic()
        for identity, worker in list(self.workers.items()):
            if now - worker.last_seen > wire.SCORER_LIVENESS_S:
                del self.workers[identity]
                self.log.warning("scorer_dead", worker_id=worker.worker_id, jobs=len(worker.jobs))
                for job_id in worker.jobs:
                    self._requeue(job_id, "worker_dead")
        for job_id, job in list(self.jobs.items()):
            if job.deadline < now:
                worker = self.workers.get(job.identity)
                if worker is not None:
                    worker.jobs.discard(job_id)
                self._requeue(job_id, "deadline")

    def _requeue(self, job_id: str, reason: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self.gauges[f"requeued/{reason}"] += 1
            self.log.warning("score_requeued", group_id=job.group_id, reason=reason)
            self.queue.appendleft(job.group_id)

    def _dispatch(self) -> None:
        for worker in self.workers.values():
            while self.queue and len(worker.jobs) < worker.capacity:
                group_id = self.queue.popleft()
                payload = self.payloads.get(group_id) or self._load_payload(group_id)
                if payload is None:
                    continue  # no longer pending (scored by a late result, or dropped)
                job = Job(new_id(), group_id, worker.identity, time.monotonic() + self.score_deadline_s)
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
        if info.version > self.weights["version"]:
            self.weights = wire.weights_dict(info)
            self.learner_step = max(self.learner_step, msg.learner_step)
            self.store.set_meta("weights", self.weights)
            self.store.set_meta("learner_step", self.learner_step)
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
                "leases": len(self.leases),
                "weights_version": int(self.weights["version"]),
            }
        )
        return out

    def close(self) -> None:
        self.sock.close(linger=0)
