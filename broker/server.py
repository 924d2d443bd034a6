"""The broker: one ROUTER socket, the only durable state, and the dispatcher between actors, scorers and learners.

Loop: poll → drain a batch of messages → apply every durable change of the turn in ONE fsync'd LMDB transaction →
answer → dispatch score jobs to idle scorers → requeue jobs of dead or late scorers → expire leases. Never an
infinite poll.

Failure model
- A message that does not decode is rejected, counted by reason in ``rejected/<reason>`` and logged once per reason;
  the broker stays up and serves the next message.
- Roles: every message type is accepted only from the role that owns it (actor: lease, group, skip; scorer: ready,
  heartbeat, result; learner: sample, publish, reject; tool: check; status from anyone), the role being what the
  ZAP handshake authenticated (:func:`editrl.common.security.peer_role`: a CURVE key or the run's role secret).
  Anything else is refused (``rejected/role_forbidden``) and answered ``Ack(ok=False)``.
- A RolloutGroup is acknowledged only after its LMDB commit; a resent group (same ``group_id``) is acknowledged
  again and stored once. A new group must claim a lease this broker issued to that actor for that task
  (:mod:`editrl.broker.leases`) and pass :class:`~editrl.broker.admission.GroupRules` (G, version, family, text
  sizes, PNG headers); otherwise ``Ack(ok=False, "rejected: <reason>: ...")``, counted ``rejected/<reason>``.
- Poison: a group whose score job failed ``max_job_attempts`` times is quarantined, as is one a learner's family
  check refused (``RejectGroups``); quarantined groups give their admission slot back.
- Weights: a ``PublishWeights`` must be the next version (latest + 1) at the run's weights directory or the
  learner's stream endpoint (:meth:`GroupRules.check_publish`); a resend of the latest is acknowledged again.
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

from editrl.broker.admission import GroupRules, Refused
from editrl.broker.leases import Grant, LeaseBook
from editrl.broker.processes import ProcessTable
from editrl.broker.scorers import ScorerPool, job_payload
from editrl.broker.store import ReplayStore, Sampled, SampleSpec
from editrl.common import codec, wire
from editrl.common.net import harden
from editrl.common.roles import peer_role
from editrl.common.security import SecurityConfig, ServerWatch, secure_server
from editrl.common.tasks import Task

DRAIN_BATCH = 256  # messages handled per loop turn before committing
ANYONE = frozenset({"actor", "scorer", "learner", "tool"})
ROLES: dict[type, frozenset[str]] = {  # who may send what (a peer without an authenticated role: role auth is off)
    wire.LeaseRequest: frozenset({"actor"}),
    wire.RolloutGroup: frozenset({"actor"}),
    wire.SkipTask: frozenset({"actor"}),
    wire.ScorerReady: frozenset({"scorer"}),
    wire.Heartbeat: frozenset({"scorer"}),
    wire.ScoreResult: frozenset({"scorer"}),
    wire.SampleRequest: frozenset({"learner"}),
    wire.PublishWeights: frozenset({"learner"}),
    wire.RejectGroups: frozenset({"learner"}),
    wire.CheckGroup: frozenset({"tool"}),
    wire.StatusRequest: ANYONE,
}


@dataclass
class Turn:
    """What one loop turn collected; everything durable in it is applied in one transaction."""

    size: int = 0
    groups: list[tuple[bytes, wire.RolloutGroup]] = field(default_factory=list)
    scored: list[tuple[str, list[float], dict[str, Any]]] = field(default_factory=list)
    unscorable: list[tuple[str, str]] = field(default_factory=list)
    samples: list[tuple[bytes, wire.SampleRequest]] = field(default_factory=list)
    leases: list[tuple[bytes, wire.LeaseRequest]] = field(default_factory=list)
    released: list[tuple[str, str]] = field(default_factory=list)  # (lease id, why) to close
    skips: list[tuple[bytes, wire.SkipTask]] = field(default_factory=list)  # answered after the commit
    quarantine: list[tuple[str, str, tuple[int, int] | None]] = field(default_factory=list)  # (group, why, batch)
    rejects: list[tuple[bytes, wire.RejectGroups]] = field(default_factory=list)  # answered after the commit

    def has_writes(self) -> bool:
        return bool(
            self.groups or self.scored or self.unscorable or self.samples or self.leases or self.released or self.skips
            or self.quarantine
        )  # fmt: skip


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
        rules: GroupRules | None = None,
        max_job_attempts: int = 3,
        learner_ranks: int | None = None,
    ) -> None:
        if not tasks:
            raise ValueError("the task list is empty")
        self.store, self.tasks, self.log = store, tasks, log
        self.groups_per_step, self.max_staleness = groups_per_step, max_staleness
        self.lease_timeout_s, self.score_deadline_s = lease_timeout_s, score_deadline_s
        self.storage_retry_s = storage_retry_s
        self.rules = rules or GroupRules()
        self.learner_ranks = learner_ranks  # SampleRequest ranks must be in 0..this-1 (None: not checked)
        self.ctx = ctx or zmq.Context()
        self.sock = harden(self.ctx.socket(zmq.ROUTER), hwm=10000)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted scorer reusing its id takes over the route
        security = security or SecurityConfig()
        self.auth = secure_server(self.sock, self.ctx, security)  # CURVE or PLAIN role secrets + ZAP, or None
        self.roles_enforced = security.roles_enforced  # then a message without an authenticated role is refused
        self.server_watch = ServerWatch(self.sock, self.auth)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        store.on_resize = lambda size: self.log.warning("replay_map_resized", map_size_bytes=size)
        self.gauges: collections.Counter[str] = collections.Counter()  # process-lifetime counters (not durable)
        self.leases = LeaseBook(store, tasks, lease_timeout_s, log, self.gauges)
        self.weights: dict[str, Any] = store.get_meta("weights") or wire.weights_dict(
            wire.WeightsInfo(version=0, uri="", sha256="", kind="lora")
        )
        self.scorers = ScorerPool(
            store, log, self.gauges, self._send, score_deadline_s, scorer_liveness_s, max_job_attempts
        )
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
            task_cursor=self.leases.cursor,
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
        carry = self.carry
        turn = Turn(
            scored=carry.scored, unscorable=carry.unscorable, released=carry.released, quarantine=carry.quarantine
        )
        turn.quarantine += self.scorers.take_poisoned()
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
                role = peer_role(payload[0])
                try:
                    allowed = ROLES.get(type(msg))  # None: no peer sends it (a reply type): unexpected_type below
                    if allowed is not None and (role or self.roles_enforced) and role not in allowed:
                        raise Refused("role_forbidden", f"{type(msg).__name__} from a {role or 'peer without a role'}")
                    self._classify(identity, msg, turn)
                except wire.WireError as exc:  # valid framing, invalid content (e.g. a bad weights map)
                    self._reject(identity, exc)
                except Refused as exc:  # well-formed, but not something this peer may have
                    self._refuse(identity, msg, exc)
        if turn.has_writes():
            self._commit(turn)
        self._check_handshakes()
        self.scorers.check()
        self.scorers.dispatch()
        self.leases.expire()

    def _classify(self, identity: bytes, msg: Any, turn: Turn) -> None:
        if isinstance(msg, wire.RolloutGroup):
            turn.groups.append((identity, msg))
        elif isinstance(msg, wire.ScoreResult):
            self.scorers.on_result(msg, turn)
        elif isinstance(msg, wire.SampleRequest):
            if self.learner_ranks is not None and not 0 <= msg.rank < self.learner_ranks:
                raise Refused("bad_rank", f"rank {msg.rank}, the learner has {self.learner_ranks}")
            turn.samples.append((identity, msg))
        elif isinstance(msg, wire.RejectGroups):
            if len(msg.group_ids) != len(msg.reasons):
                raise Refused("bad_reject", f"{len(msg.group_ids)} groups, {len(msg.reasons)} reasons")
            turn.rejects.append((identity, msg))
            pairs = zip(msg.group_ids, msg.reasons, strict=True)
            turn.quarantine += [(g, f"learner: {r}", (msg.rank, msg.step)) for g, r in pairs]
        elif isinstance(msg, wire.CheckGroup):
            self.scorers.add_check(identity, msg)
        elif isinstance(msg, wire.LeaseRequest):
            resent = self.leases.resent(msg)
            if resent is not None:  # a resend (lost reply, broker restart): the same lease again, not a second
                self._send(identity, self.leases.message(msg, *resent, self.weights))
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

    def _admit(self, turn: Turn) -> None:
        """Refuse the new groups of ``turn`` that no learner could train (a resend of a stored group is a duplicate,
        acknowledged as such, before any check: its first copy passed them)."""
        accepted, claimed = [], {}  # claimed: lease id → group id, within this turn
        for identity, g in turn.groups:
            if g.group_id not in claimed.values() and self.store.get_status(g.group_id) is None:
                try:
                    self.leases.claim(g, claimed)
                except Refused as exc:
                    self._refuse(identity, g, exc)
                    continue
                try:
                    self.rules.check_group(g, int(self.weights["version"]))
                except Refused as exc:  # the lease was this actor's: closed, its slot given back
                    self._refuse(identity, g, exc)
                    turn.released.append((g.lease_id, f"rejected:{exc.reason}"))
                    self.leases.closed_by_group(g.lease_id)
                    continue
            accepted.append((identity, g))
        turn.groups = accepted

    def _commit(self, turn: Turn) -> None:
        self._admit(turn)
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
        grants = self.leases.plan(turn.leases)
        released = [
            *turn.released,
            *((g.lease_id, f"used:{g.group_id}") for _, g in turn.groups),
            *((g.replaces, "expired") for g in grants if g.replaces),
        ]
        try:
            result = self.store.commit_turn(
                inserts=inserts,
                scored=turn.scored,
                unscorable=turn.unscorable,
                samples=[
                    SampleSpec(m.rank, m.step, max(0, m.offset), max(0, m.max_groups), m.min_version)
                    for _, m in turn.samples
                ],
                task_cursor=self.leases.cursor if self.leases.cursor != self.leases.committed_cursor else None,
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
                lease_closes=released,
                quarantine=turn.quarantine,
            )  # committed (fsync) before any reply below
        except lmdb.Error as exc:
            self._commit_failed(turn, grants, exc)
            return
        if not self.storage_ok:
            self.storage_ok = True
            self.log.warning("storage_recovered")
        self.durable = result.counters
        self.leases.committed_cursor = self.leases.cursor
        self._answer_groups(turn, result.inserted)
        self._answer_skips(turn)
        self.scorers.after_scores(turn, result.scored, result.dropped)
        self._answer_quarantine(turn, result.quarantined)
        for (identity, req), (taken, stale) in zip(turn.samples, result.samples, strict=True):
            if stale:
                self.log.info("groups_dropped_stale", count=stale, min_version=req.min_version)
            if taken:
                self._send(identity, _batch(req.request_id, taken, stale))
            else:
                self._send(identity, wire.Wait(req.request_id, 0.1, "replay_empty", self.weights))
                self.processes.waited(req, 0.1)
        for grant in grants:
            self.leases.grant(grant)
            self._send(grant.identity, self.leases.message(grant.request, grant.lease_id, grant.task_index,
                                                           self.weights))  # fmt: skip

    def _answer_quarantine(self, turn: Turn, done: list[bool]) -> None:
        for (group_id, reason, batch), ok in zip(turn.quarantine, done, strict=True):
            self.scorers.forget(group_id)
            if ok:
                self.log.error("group_quarantined", group_id=group_id, reason=reason[:300], batch=batch)
        for identity, msg in turn.rejects:
            self._send(identity, wire.Ack(msg.request_id, True, "quarantined", self.weights))

    def _commit_failed(self, turn: Turn, grants: list[Grant], exc: Exception) -> None:
        """Nothing of this turn is durable: say so to every waiting client and keep what cannot be resent."""
        self.gauges["storage_failures"] += 1
        if self.storage_ok:
            self.log.error("storage_write_failed", error=str(exc)[:200], action="not acknowledging; retrying")
        self.storage_ok = False
        self.leases.rollback(grants)
        quarantine = [q for q in turn.quarantine if q[2] is None]  # the learner resends its own rejects
        self.carry = Turn(scored=turn.scored, unscorable=turn.unscorable, released=turn.released, quarantine=quarantine)
        for identity, g in [*turn.groups, *turn.skips, *turn.rejects]:
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

    def _refuse(self, identity: bytes, msg: Any, exc: Refused) -> None:
        """A well-formed message refused: counted under its reason, logged once per reason, answered so an honest
        client stops resending (``rejected:`` is final for it)."""
        self.gauges[f"rejected/{exc.reason}"] += 1
        if exc.reason not in self._logged_reasons:
            self._logged_reasons.add(exc.reason)
            self.log.warning("message_refused", reason=exc.reason, type=type(msg).__name__, detail=str(exc)[:300])
        request_id = getattr(msg, "request_id", None)
        if isinstance(request_id, str):
            self._send(identity, wire.Ack(request_id, False, f"rejected: {str(exc)[:300]}", self.weights))

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
        later) plus every group that left without being trained (dropped, evicted or quarantined), so producers
        never deadlock."""
        c = self.durable
        dropped = c["dropped_stale"] + c["dropped_unscorable"] + c["evicted_unconsumed"] + c["quarantined"]
        budget = (self.max_staleness + 1 + self.learner_step) * self.groups_per_step + dropped
        return c["ingested"] + len(self.leases) + extra < budget

    def _answer_groups(self, turn: Turn, inserted: list[bool]) -> None:
        for (identity, g), is_new in zip(turn.groups, inserted, strict=True):
            self.leases.closed_by_group(g.lease_id)
            if is_new:
                self.scorers.add(g.group_id, job_payload(g))
                self.log.debug("group_stored", group_id=g.group_id, actor_id=g.actor_id, version=g.policy_version)
            else:
                self.log.info("replay_insert_duplicate", group_id=g.group_id)
            self._send(identity, wire.Ack(g.request_id, True, "stored" if is_new else "duplicate", self.weights))

    def _on_skip(self, identity: bytes, msg: wire.SkipTask, turn: Turn) -> None:
        entry = self.leases.open.get(msg.lease_id)
        if entry is not None and entry.actor_id != msg.actor_id:
            raise Refused("lease_of_another_actor", f"lease {msg.lease_id} was issued to {entry.actor_id}")
        turn.released.append((msg.lease_id, "skipped"))
        turn.skips.append((identity, msg))

    def _answer_skips(self, turn: Turn) -> None:
        for identity, msg in turn.skips:
            if self.leases.open.pop(msg.lease_id, None) is not None:
                self.gauges["tasks_skipped"] += 1
                self.log.warning("task_skipped", task_id=msg.task_id, actor_id=msg.actor_id, reason=msg.reason)
            self._send(identity, wire.Ack(msg.request_id, True, "skipped", self.weights))

    # -- learners ----------------------------------------------------------------------------------------------

    def _on_publish(self, identity: bytes, msg: wire.PublishWeights) -> None:
        info = wire.weights_from_dict(msg.weights)
        if wire.weights_dict(info) == self.weights:  # a resend (lost ack): acknowledged again below
            newer = False
        else:
            self.rules.check_publish(info, int(self.weights["version"]))  # raises Refused
            newer = True
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
