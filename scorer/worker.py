"""The scorer's loop: announce READY(capacity) → receive ScoreJobs → decode images → ``backend.score`` → ScoreResults.

Failure model
- Liveness: a heartbeat thread with its own socket proves the process alive even during a long scoring call; whether
  scoring progresses is the broker's per-job deadline (a scorer that heartbeats but never answers is requeued, then
  quarantined). While idle the loop re-announces READY, which re-registers it with a restarted broker.
- Every job gets exactly one ScoreResult, and a score is never invented. A job that cannot be decoded (its message or
  its images), a backend that raises (any ``Exception``) or returns something unusable for it, and a result that
  cannot be encoded all give that job every edit unscored (``scored=False, overall=None``), with a reason naming the
  error class and a short message; each is logged once (``job_unscored``, with job and group id) and counted
  (``scorer_stopped`` reports the counts). The broker requeues such a group once, then drops it.
- Batches (``scorers.batch`` > 1): when ``score_many`` raises or returns the wrong number of groups, each group of the
  batch is scored again on its own, so only the group that fails is unscored (a failed batch costs a second pass).
- An edit whose Score is unusable (not a Score, a non-finite ``overall``) is unscored; a sub-score that is not a
  finite number is dropped, said in the edit's reasoning.
- Every result is fitted to :data:`~editrl.common.fit.FIT_META_BYTES` (:func:`~editrl.common.fit.fit_score_result`:
  long reasoning is cut with a marker, scores untouched) and checked by decoding it as the broker will, so no reply
  is ever rejected for its size and left unanswered.
- With ``scorers.gold``, a share of the fully scored groups is also judged by the held-out gold backend
  (:mod:`editrl.scorer.gold`); a gold failure is logged and counted and the training scores go out without gold.
- A failed CURVE handshake raises HandshakeError (the process exits non-zero with the reason).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import threading
import time
from typing import Any

import msgpack
import zmq

from editrl.common import codec, wire
from editrl.common.config import TopologyConfig
from editrl.common.fit import cap_text, fit_score_result
from editrl.common.images import from_png
from editrl.common.net import harden, new_id
from editrl.common.security import HandshakeWatch, secure_client
from editrl.scorer.backend import ScoreBackend, ScoreRequest
from editrl.scorer.gold import GoldScorer


def run_worker(
    cfg: TopologyConfig, index: int, backend: ScoreBackend, log: Any, should_stop: Any, gold: GoldScorer | None = None
) -> int:
    worker_id = f"scorer-{index}"
    ctx = zmq.Context()
    sock = harden(ctx.socket(zmq.DEALER))
    # A routing id unique to this process: the broker tells a restarted scorer (same worker id, new id) from the
    # old one and requeues the jobs the dead process held at once.
    sock.setsockopt(zmq.ROUTING_ID, f"{worker_id}-{new_id()[:12]}".encode())
    secure_client(sock, cfg.security, "scorer")
    watch = HandshakeWatch(sock, cfg.broker.endpoint)
    sock.connect(cfg.broker.endpoint)
    done = threading.Event()
    beat = threading.Thread(target=_heartbeats, args=(ctx, cfg, worker_id, done), daemon=True)
    beat.start()
    batch = cfg.scorers.batch  # groups per backend call; announced as our capacity so the broker keeps us full
    ready = codec.encode(wire.ScorerReady(worker_id, cfg.scorers.backend, batch))
    last_ready = 0.0
    n_jobs = 0
    counts: collections.Counter[str] = collections.Counter()  # jobs_unscored, replies_truncated, batch_failures, ...
    gold_info = {} if gold is None else {"gold_backend": gold.backend.name, "gold_share": gold.share}
    log.info("scorer_started", backend=cfg.scorers.backend, endpoint=cfg.broker.endpoint, **gold_info)
    try:
        while not should_stop():
            watch.check()
            if time.monotonic() - last_ready >= cfg.timers.heartbeat_interval_s:
                with contextlib.suppress(zmq.Again):  # never block on a broker that is down: the next one will do
                    sock.send_multipart(ready, flags=zmq.NOBLOCK)  # idle re-announcement: re-registers us after restart
                last_ready = time.monotonic()
            if not sock.poll(100):
                continue
            jobs, undecodable = _receive_jobs(sock, batch, worker_id, log, counts)
            if not jobs and not undecodable:
                continue
            t0 = time.monotonic()
            for result in undecodable + score_jobs(backend, jobs, worker_id, log, gold, counts):
                sock.send_multipart(codec.encode(result))
            n_jobs += len(jobs) + len(undecodable)
            log.debug("jobs_scored", groups=len(jobs), seconds=round(time.monotonic() - t0, 4), n_jobs=n_jobs)
    finally:
        done.set()
        gold_counts = {} if gold is None else {"gold_groups": gold.groups, "gold_failures": gold.failures}
        log.info("scorer_stopped", jobs=n_jobs, **counts, **gold_counts)
        watch.close()
        sock.close(linger=0)
    return 0


def _heartbeats(ctx: zmq.Context, cfg: TopologyConfig, worker_id: str, done: threading.Event) -> None:
    sock = harden(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.ROUTING_ID, f"{worker_id}-hb-{os.getpid()}".encode())
    secure_client(sock, cfg.security, "scorer")
    sock.connect(cfg.broker.endpoint)
    beat = codec.encode(wire.Heartbeat(worker_id))
    while not done.wait(cfg.timers.heartbeat_interval_s):
        with contextlib.suppress(zmq.Again):
            sock.send_multipart(beat, flags=zmq.NOBLOCK)
    sock.close(linger=0)


def _receive_jobs(
    sock: zmq.Socket, batch: int, worker_id: str, log: Any, counts: collections.Counter[str], linger_ms: int = 5
) -> tuple[list[wire.ScoreJob], list[wire.ScoreResult]]:
    """What is waiting, up to ``batch`` jobs (a few ms of linger lets a burst arrive, so groups pack together), and
    an all-unscored answer for every job that arrived but does not decode (e.g. a broker speaking a newer protocol)."""
    jobs: list[wire.ScoreJob] = []
    answers: list[wire.ScoreResult] = []
    while len(jobs) + len(answers) < batch and sock.poll(0 if not (jobs or answers) else linger_ms):
        frames = sock.recv_multipart(copy=False)
        try:
            msg = codec.decode(frames)
        except wire.WireError as exc:
            job = _salvage_job(frames)
            if job is None:
                log.warning("message_rejected", reason=exc.reason)
                continue
            counts["jobs_undecodable"] += 1
            reason = f"undecodable job: {_describe(exc)}"
            answers.append(_sendable(_unscored(job, worker_id, reason, log, counts), job, log, counts))
            continue
        if isinstance(msg, wire.ScoreJob):
            jobs.append(msg)
    return jobs, answers


def _salvage_job(frames: list[Any]) -> wire.ScoreJob | None:
    """The ids and edit count of a ScoreJob that failed strict decoding (enough to answer it unscored), or None."""
    try:
        meta = msgpack.unpackb(getattr(frames[0], "buffer", frames[0]), raw=False)
        if meta["type"] != "ScoreJob":
            return None
        fields = meta["fields"]
        ids = fields["job_id"], fields["group_id"]
        n_edits = len(fields["edit_pngs"])
    except Exception:  # anything malformed: not a job we can answer
        return None
    if not all(isinstance(i, str) and 0 < len(i.encode()) <= wire.MAX_ID_BYTES for i in ids):
        return None
    return wire.ScoreJob(ids[0], ids[1], "", "", b"", [b""] * n_edits)


def score_jobs(
    backend: ScoreBackend,
    jobs: list[wire.ScoreJob],
    worker_id: str,
    log: Any,
    gold: GoldScorer | None = None,
    counts: collections.Counter[str] | None = None,
) -> list[wire.ScoreResult]:
    """ScoreJobs → exactly one sendable ScoreResult each, in order; never raises for a job, its backend or its reply.

    Several groups go in one backend call when the backend has ``score_many``; if that call fails, each group is
    scored on its own. A job whose images cannot be decoded, whose backend call raises or returns an unusable result,
    or whose result cannot be encoded comes back with every edit unscored (see the module docstring): never a made-up
    number. With ``gold``, the selected groups whose edits were all scored also get each edit's held-out gold score
    in its sub-scores (the ``gold`` key is reserved: a training backend's is dropped). ``counts`` (optional) gathers
    the failure counters.
    """
    counts = collections.Counter() if counts is None else counts
    results: dict[str, wire.ScoreResult] = {}
    requests: dict[str, ScoreRequest] = {}
    for job in jobs:
        try:
            requests[job.job_id] = _request(job)
        except Exception as exc:  # from_png raises ValueError; anything else is as unreadable
            results[job.job_id] = _unscored(job, worker_id, f"unreadable job: {_describe(exc)}", log, counts)
    scorable = [job for job in jobs if job.job_id in requests]
    outcomes = _run_backend(backend, [requests[job.job_id] for job in scorable], log, counts)
    for job, outcome in zip(scorable, outcomes, strict=True):
        results[job.job_id] = _result(job, worker_id, outcome, log, counts)
    if gold is not None:
        done = [(requests[job.job_id], results[job.job_id]) for job in scorable if all(results[job.job_id].scored)]
        _attach_gold(gold, done, log)
    return [_sendable(results[job.job_id], job, log, counts) for job in jobs]


def score_job(backend: ScoreBackend, job: wire.ScoreJob, worker_id: str, log: Any) -> wire.ScoreResult:
    return score_jobs(backend, [job], worker_id, log)[0]


def _request(job: wire.ScoreJob) -> ScoreRequest:
    return ScoreRequest(
        group_id=job.group_id,
        instruction=job.instruction,
        task_type=job.task_type,
        source=from_png(job.source_png),
        edits=[from_png(p) for p in job.edit_pngs],
    )


def _run_backend(
    backend: ScoreBackend, requests: list[ScoreRequest], log: Any, counts: collections.Counter[str]
) -> list[Any]:
    """One outcome per request, in order: what the backend returned for it, or the exception its call raised."""
    many = getattr(backend, "score_many", None)
    if many is not None and len(requests) > 1:
        try:
            outcomes = many(requests)
            if isinstance(outcomes, list) and len(outcomes) == len(requests):
                return outcomes
            got = len(outcomes) if isinstance(outcomes, list) else type(outcomes).__name__
            raise RuntimeError(f"score_many returned {got} groups for {len(requests)}")
        except Exception as exc:  # one group may have broken the batch: give each its own call
            counts["batch_failures"] += 1
            log.warning("batch_failed", groups=[r.group_id for r in requests], error=_describe(exc))
    return [_score_one(backend, request) for request in requests]


def _score_one(backend: ScoreBackend, request: ScoreRequest) -> Any:
    try:
        return backend.score(request)
    except Exception as exc:  # a backend failure must not take the worker down, nor leave the job unanswered
        return exc


def _result(
    job: wire.ScoreJob, worker_id: str, outcome: Any, log: Any, counts: collections.Counter[str]
) -> wire.ScoreResult:
    """The ScoreResult of one job from its backend outcome (Scores, an exception, or anything else)."""
    n = len(job.edit_pngs)
    if isinstance(outcome, BaseException):
        return _unscored(job, worker_id, f"backend error: {_describe(outcome)}", log, counts)
    if not isinstance(outcome, list | tuple) or len(outcome) != n:
        got = f"{len(outcome)} scores" if isinstance(outcome, list | tuple) else type(outcome).__name__
        return _unscored(job, worker_id, f"backend returned {got} for {n} edits", log, counts)
    edits = [_wire_edit(score) for score in outcome]
    return wire.ScoreResult(
        job_id=job.job_id,
        group_id=job.group_id,
        worker_id=worker_id,
        scored=[e[0] for e in edits],
        overall=[e[1] for e in edits],
        sub_scores=[e[2] for e in edits],
        reasoning=[e[3] for e in edits],
    )


def _wire_edit(score: Any) -> tuple[bool, float | None, dict[str, float], str]:
    """(scored, overall, sub_scores, reasoning) of one edit as the wire takes them; unusable → unscored."""
    try:
        reasoning = _text(score.reasoning)
        if not score.scored:
            return False, None, {}, reasoning
        overall = float(score.overall)
        subs = {_text(k): v for k, v in dict(score.sub_scores).items() if k != wire.GOLD_SUB_SCORE}
    except Exception as exc:
        return False, None, {}, f"backend returned an unusable score: {_describe(exc)}"
    if not math.isfinite(overall):
        return False, None, {}, f"backend returned a non-finite overall ({overall}): {cap_text(reasoning)}"
    numbers = {k: _finite(v) for k, v in subs.items()}
    kept = {k: v for k, v in numbers.items() if v is not None}
    if len(kept) < len(numbers):
        reasoning += f" [{len(numbers) - len(kept)} sub-scores dropped: not finite numbers]"
    return True, overall, kept, reasoning


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except Exception:
        return None
    return number if math.isfinite(number) and not isinstance(value, bool | str) else None


def _text(value: Any) -> str:
    """``value`` as text the wire can carry (lone surrogates, e.g. from a judge's JSON, become '?')."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


def _attach_gold(gold: GoldScorer, pairs: list[tuple[ScoreRequest, wire.ScoreResult]], log: Any) -> None:
    """Gold scores onto fully scored results; whatever goes wrong costs only the gold scores (GoldScorer catches its
    backend's errors; this also catches an unusable gold reply)."""
    if not pairs:
        return
    try:
        gold.attach(pairs)
    except Exception as exc:
        gold.failures += 1
        log.warning("gold_failed", group_ids=[r.group_id for r, _ in pairs], error=_describe(exc))


def _sendable(
    result: wire.ScoreResult, job: wire.ScoreJob, log: Any, counts: collections.Counter[str]
) -> wire.ScoreResult:
    """``result`` fitted to the wire budget and checked by decoding it as the broker will; a result that still cannot
    be sent becomes all-unscored with the reason (which always can)."""
    try:
        fitted = fit_score_result(result)
        codec.decode(codec.encode(fitted))
    except Exception as exc:
        reason = f"reply could not be encoded: {_describe(exc)}"
        return _unscored(job, result.worker_id, reason, log, counts)
    if fitted is not result:
        counts["replies_truncated"] += 1
        log.warning("reply_truncated", job_id=job.job_id, group_id=job.group_id, truncated=counts["replies_truncated"])
    return fitted


def _unscored(
    job: wire.ScoreJob, worker_id: str, reason: str, log: Any, counts: collections.Counter[str]
) -> wire.ScoreResult:
    counts["jobs_unscored"] += 1
    log.warning(
        "job_unscored", job_id=job.job_id, group_id=job.group_id, reason=reason, unscored=counts["jobs_unscored"]
    )
    n = len(job.edit_pngs)
    return wire.ScoreResult(
        job.job_id, job.group_id, worker_id, [False] * n, [None] * n, [{} for _ in range(n)], [reason] * n
    )


def _describe(exc: BaseException) -> str:
    """An exception for a reason: its class and a bounded message."""
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails still names its class
        message = "(unprintable)"
    return f"{type(exc).__name__}: {cap_text(message)}"
