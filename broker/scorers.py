"""The broker's scorer pool: registry, liveness, deadlines, quarantine, fair dispatch and score results.

Failure model
- A scorer silent for ``liveness_s`` (``timers.scorer_liveness_s``) is dead; its jobs are requeued. A scorer that re-announces itself from a
  new socket (a restarted process with the same worker id) has its predecessor's jobs requeued at once.
- A job past its deadline is late (the scorer heartbeats but is stuck): the group is requeued; the late job keeps
  its slot until the scorer answers or dies. The miss is charged to the scorer only once another scorer completes
  that group (then it was the scorer, not the job), and so is every further deadline the late job stays unanswered.
  After ``QUARANTINE_AFTER_MISSES`` charged misses a scorer gets no more jobs (never the last live one); an on-time
  result or a restart clears it.
- Poison: every failed attempt at a group's job (deadline, the scorer died or restarted holding it) counts; at
  ``max_job_attempts`` the group is quarantined (:meth:`ScorerPool.take_poisoned`, committed by the broker's next
  turn), never requeued again. A job a scorer cannot score comes back unscored (the scorer never stays silent).
- A result must match its job (group and worker) and carry one score per edit; otherwise it raises WireError and
  the broker counts it as rejected. A result for a group no longer pending is a counted duplicate.
- An edit that could not be scored makes the group requeue once, then drop (counted): scores are never invented.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from editrl.broker.store import ReplayStore
from editrl.common import codec, wire
from editrl.common.net import new_id

JobPayload = tuple[str, str, bytes, list[bytes]]  # instruction, task_type, source PNG, edit PNGs


class TurnLike(Protocol):
    scored: list[tuple[str, list[float], dict[str, Any]]]
    unscorable: list[tuple[str, str]]


@dataclass
class Worker:
    worker_id: str
    identity: bytes  # ROUTER routing id of its job socket
    capacity: int
    last_seen: float
    jobs: set[str] = field(default_factory=set)
    misses: int = 0  # deadlines missed (charged: another scorer completed the group)
    expired: dict[str, float] = field(default_factory=dict)  # late job id → when it counts as missed again
    quarantined: bool = False


@dataclass
class Job:
    job_id: str
    group_id: str
    worker_id: str
    deadline: float


def job_payload(g: wire.RolloutGroup) -> JobPayload:
    return (g.instruction, g.task_type, g.source_png, g.edit_pngs)


class ScorerPool:
    def __init__(
        self, store: ReplayStore, log: Any, gauges: collections.Counter, send: Any, score_deadline_s: float,
        liveness_s: float = wire.SCORER_LIVENESS_S, max_job_attempts: int = 3,
    ) -> None:  # fmt: skip
        self.store, self.log, self.gauges, self.send = store, log, gauges, send
        self.score_deadline_s, self.liveness_s, self.max_job_attempts = score_deadline_s, liveness_s, max_job_attempts
        self.attempts: collections.Counter[str] = collections.Counter()  # failed job attempts per group
        self.missed_by: dict[str, set[str]] = {}  # group → scorers whose job on it went past its deadline
        self.late_groups: dict[str, str] = {}  # late job id → its group
        self.completed_late: set[str] = set()  # groups some scorer completed while another's late job is unanswered
        self.poisoned: list[tuple[str, str]] = []  # (group, reason) to quarantine in the broker's next turn
        self.workers: dict[str, Worker] = {}
        self.jobs: dict[str, Job] = {}
        self.requeues: collections.Counter[str] = collections.Counter()
        self.queue: collections.deque[str] = collections.deque(store.pending_ids())  # groups awaiting a scorer
        self.payloads: dict[str, JobPayload] = {}  # ScoreJob fields of pending groups (reloaded lazily)
        self._rr = 0  # round-robin start among scorers
        self.checks: dict[str, tuple[bytes, wire.CheckGroup]] = {}  # transient check groups: never stored

    def add_check(self, identity: bytes, msg: wire.CheckGroup) -> None:
        """Score ``msg`` through the pool and answer ``identity`` directly; nothing is stored (a resend of the same
        request replaces the waiting client and is not queued twice)."""
        gid = "check:" + msg.request_id[:100]
        if gid not in self.checks:
            self.queue.append(gid)
        self.checks[gid] = (identity, msg)
        self.payloads[gid] = (msg.instruction, msg.task_type, msg.source_png, msg.edit_pngs)

    def add(self, group_id: str, payload: JobPayload) -> None:
        """A newly committed pending group."""
        self.queue.append(group_id)
        self.payloads[group_id] = payload

    def counters(self) -> dict[str, int]:
        return {
            "queue/pending_scoring": len(self.queue),
            "queue/jobs_inflight": len(self.jobs),
            "scorers": len(self.workers),
            "scorers_live": sum(not w.quarantined for w in self.workers.values()),
        }

    # -- workers -----------------------------------------------------------------------------------------------

    def on_worker(self, identity: bytes, msg: wire.ScorerReady | wire.Heartbeat) -> None:
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
                self._drop_late(job_id)
            worker.identity, worker.jobs, worker.misses, worker.quarantined = identity, set(), 0, False
            worker.expired.clear()
        worker.last_seen = time.monotonic()

    def on_result(self, msg: wire.ScoreResult, turn: TurnLike) -> None:
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
        self._release(msg, on_time)
        if on_time:
            self._completed(msg.group_id, msg.worker_id)
        if msg.group_id in self.checks:
            self._answer_check(msg)
            return
        if not on_time and msg.group_id in self.queue:
            self.queue.remove(msg.group_id)  # a late result for a requeued, not yet re-dispatched group: use it
        if not all(msg.scored) or any(o is None for o in msg.overall):
            self._unscored(msg.group_id, turn)
            return
        scores = {"sub_scores": msg.sub_scores, "reasoning": msg.reasoning, "worker_id": msg.worker_id}
        turn.scored.append((msg.group_id, [float(o) for o in msg.overall], scores))

    def _answer_check(self, msg: wire.ScoreResult) -> None:
        identity, check = self.checks.pop(msg.group_id)
        self.payloads.pop(msg.group_id, None)
        if msg.group_id in self.queue:
            self.queue.remove(msg.group_id)
        reply = wire.CheckResult(
            check.request_id, check.group_id, msg.worker_id, msg.scored, msg.overall, msg.sub_scores, msg.reasoning
        )
        self.send(identity, reply)

    def _completed(self, group_id: str, worker_id: str) -> None:
        """``worker_id`` answered ``group_id`` in time: every other scorer that let a job on it expire is charged."""
        for other in self.missed_by.pop(group_id, ()):
            worker = self.workers.get(other)
            if other != worker_id and worker is not None:
                self._missed(worker)
        if group_id in self.late_groups.values():
            self.completed_late.add(group_id)

    def take_poisoned(self) -> list[tuple[str, str, None]]:
        """Groups to quarantine (their job failed ``max_job_attempts`` times), for the broker's next turn."""
        out = [(g, reason, None) for g, reason in self.poisoned]
        self.poisoned.clear()
        return out

    def forget(self, group_id: str) -> None:
        """``group_id`` left scoring for good (quarantined): nothing of it stays queued or counted."""
        self.payloads.pop(group_id, None)
        self.requeues.pop(group_id, None)
        self.attempts.pop(group_id, None)
        self.missed_by.pop(group_id, None)
        if group_id in self.queue:
            self.queue.remove(group_id)

    def _release(self, msg: wire.ScoreResult, on_time: bool) -> None:
        """The worker that answered gets its slot back (and its record cleared if it was on time)."""
        worker = self.workers.get(msg.worker_id)
        if worker is not None:
            worker.last_seen = time.monotonic()
            worker.jobs.discard(msg.job_id)
            worker.expired.pop(msg.job_id, None)
            if on_time:
                worker.misses, worker.quarantined = 0, False
        self._drop_late(msg.job_id)

    def after_scores(self, turn: TurnLike, scored: list[bool], dropped: list[bool]) -> None:
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

    def _unscored(self, group_id: str, turn: TurnLike) -> None:
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

    def check(self) -> None:
        now = time.monotonic()
        for worker_id, worker in list(self.workers.items()):
            if now - worker.last_seen > self.liveness_s:
                del self.workers[worker_id]
                self.log.warning("scorer_dead", worker_id=worker_id, jobs=len(worker.jobs))
                for job_id in list(worker.jobs):
                    self._requeue(job_id, "worker_dead")
                    self._drop_late(job_id)
        for job_id, job in list(self.jobs.items()):
            if job.deadline < now:
                worker = self.workers.get(job.worker_id)
                # The late job keeps its slot on the worker until it answers or dies (a slow scorer is not handed a
                # second job to miss as well); every further deadline it stays unanswered counts as another miss.
                if worker is not None:
                    worker.expired[job_id] = now + self.score_deadline_s
                    self.late_groups[job_id] = job.group_id
                self.missed_by.setdefault(job.group_id, set()).add(job.worker_id)
                self._requeue(job_id, "deadline")
        for worker in self.workers.values():
            for job_id, again in list(worker.expired.items()):
                if again < now:
                    worker.expired[job_id] = now + self.score_deadline_s
                    if self.late_groups.get(job_id) in self.completed_late:  # others finish it: this scorer is stuck
                        self._missed(worker)

    def _drop_late(self, job_id: str) -> None:
        group_id = self.late_groups.pop(job_id, None)
        if group_id is not None and group_id not in self.late_groups.values():
            self.completed_late.discard(group_id)

    def _missed(self, worker: Worker) -> None:
        worker.misses += 1
        live = sum(not w.quarantined for w in self.workers.values())
        if worker.misses >= wire.QUARANTINE_AFTER_MISSES and not worker.quarantined and live > 1:
            worker.quarantined = True  # never the last live scorer: then slow is better than nothing
            self.gauges["scorers_quarantined"] += 1
            self.log.error("scorer_quarantined", worker_id=worker.worker_id, misses=worker.misses)

    def _requeue(self, job_id: str, reason: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        self.attempts[job.group_id] += 1
        if self.attempts[job.group_id] >= self.max_job_attempts:  # poison: on whichever scorers, it never completes
            self.gauges["jobs_poisoned"] += 1
            why = f"score job failed {self.attempts[job.group_id]} times (last: {reason} on {job.worker_id})"
            self.log.error("score_job_poisoned", group_id=job.group_id, reason=why)
            if job.group_id in self.checks:  # a transient check: nothing stored to quarantine, the client times out
                self.checks.pop(job.group_id, None)
                self.forget(job.group_id)
            else:
                self.poisoned.append((job.group_id, why))
            return
        self.gauges[f"requeued/{reason}"] += 1
        self.log.warning("score_requeued", group_id=job.group_id, reason=reason, worker_id=job.worker_id)
        self.queue.appendleft(job.group_id)

    def dispatch(self) -> None:
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
                self.send(worker.identity, wire.ScoreJob(job.job_id, group_id, *payload))

    def _load_payload(self, group_id: str) -> JobPayload | None:
        """The ScoreJob fields of a pending group, from LMDB (after a restart; normally kept in memory)."""
        status = self.store.get_status(group_id)
        record = self.store.get_record(group_id)
        if status is None or record is None or status["state"] != "pending":
            return None
        payload = job_payload(codec.decode(codec.decode_record(record)))
        self.payloads[group_id] = payload
        return payload
