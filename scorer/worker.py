"""The scorer's loop: announce READY(capacity) → receive a ScoreJob → decode images → ``backend.score`` → ScoreResult.

Failure model
- Liveness: a heartbeat thread with its own socket proves the process alive even during a long scoring call; whether
  scoring progresses is the broker's per-job deadline (a scorer that heartbeats but never answers is requeued, then
  quarantined). While idle the loop re-announces READY, which re-registers it with a restarted broker.
- A job whose images cannot be decoded, or a backend error, comes back with every edit unscored (the broker requeues
  the group once, then drops it, counted): a score is never invented.
- With ``scorers.gold``, a share of the fully scored groups is also judged by the held-out gold backend
  (:mod:`editrl.scorer.gold`); a gold failure is logged and counted and the training scores go out without gold.
- A failed CURVE handshake raises HandshakeError (the process exits non-zero with the reason).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import zmq

from editrl.common import codec, wire
from editrl.common.config import TopologyConfig
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
    secure_client(sock, cfg.security)
    watch = HandshakeWatch(sock, cfg.broker.endpoint)
    sock.connect(cfg.broker.endpoint)
    done = threading.Event()
    beat = threading.Thread(target=_heartbeats, args=(ctx, cfg, worker_id, done), daemon=True)
    beat.start()
    batch = cfg.scorers.batch  # groups per backend call; announced as our capacity so the broker keeps us full
    ready = codec.encode(wire.ScorerReady(worker_id, cfg.scorers.backend, batch))
    last_ready = 0.0
    n_jobs = 0
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
            jobs = _receive_jobs(sock, batch, log)
            if not jobs:
                continue
            t0 = time.monotonic()
            for result in score_jobs(backend, jobs, worker_id, log, gold):
                sock.send_multipart(codec.encode(result))
            n_jobs += len(jobs)
            log.debug("jobs_scored", groups=len(jobs), seconds=round(time.monotonic() - t0, 4), n_jobs=n_jobs)
    finally:
        done.set()
        gold_counts = {} if gold is None else {"gold_groups": gold.groups, "gold_failures": gold.failures}
        log.info("scorer_stopped", jobs=n_jobs, **gold_counts)
        watch.close()
        sock.close(linger=0)
    return 0


def _heartbeats(ctx: zmq.Context, cfg: TopologyConfig, worker_id: str, done: threading.Event) -> None:
    sock = harden(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.ROUTING_ID, f"{worker_id}-hb-{os.getpid()}".encode())
    secure_client(sock, cfg.security)
    sock.connect(cfg.broker.endpoint)
    beat = codec.encode(wire.Heartbeat(worker_id))
    while not done.wait(cfg.timers.heartbeat_interval_s):
        with contextlib.suppress(zmq.Again):
            sock.send_multipart(beat, flags=zmq.NOBLOCK)
    sock.close(linger=0)


def _receive_jobs(sock: zmq.Socket, batch: int, log: Any, linger_ms: int = 5) -> list[wire.ScoreJob]:
    """What is waiting, up to ``batch`` jobs (a few ms of linger lets a burst arrive, so groups pack together)."""
    jobs: list[wire.ScoreJob] = []
    while len(jobs) < batch and sock.poll(0 if not jobs else linger_ms):
        try:
            msg = codec.decode(sock.recv_multipart(copy=False))
        except wire.WireError as exc:
            log.warning("message_rejected", reason=exc.reason)
            continue
        if isinstance(msg, wire.ScoreJob):
            jobs.append(msg)
    return jobs


def score_jobs(
    backend: ScoreBackend, jobs: list[wire.ScoreJob], worker_id: str, log: Any, gold: GoldScorer | None = None
) -> list[wire.ScoreResult]:
    """ScoreJobs → ScoreResults, several groups in one backend call when the backend has ``score_many``.

    A job whose images cannot be decoded, or a backend failure, gives that job (or the whole call) all edits
    unscored: never a made-up number. With ``gold``, the selected groups whose edits were all scored also get each
    edit's held-out gold score in its sub-scores (the ``gold`` key is reserved: a training backend's is dropped).
    """
    requests: list[ScoreRequest] = []
    results: dict[str, wire.ScoreResult] = {}
    for job in jobs:
        try:
            requests.append(
                ScoreRequest(
                    group_id=job.group_id,
                    instruction=job.instruction,
                    task_type=job.task_type,
                    source=from_png(job.source_png),
                    edits=[from_png(p) for p in job.edit_pngs],
                )
            )
        except ValueError as exc:
            results[job.job_id] = _unscored(job, worker_id, f"unreadable image: {exc}", log)
    scorable = [job for job in jobs if job.job_id not in results]
    try:
        many = getattr(backend, "score_many", None)
        all_scores = many(requests) if many is not None and len(requests) > 1 else [backend.score(r) for r in requests]
    except Exception as exc:  # a backend failure must not take the worker down
        all_scores = [exc] * len(requests)
    scored: list[tuple[ScoreRequest, wire.ScoreResult]] = []
    for job, request, scores in zip(scorable, requests, all_scores, strict=True):
        if isinstance(scores, Exception) or len(scores) != len(job.edit_pngs):
            reason = str(scores) if isinstance(scores, Exception) else f"backend returned {len(scores)} scores"
            results[job.job_id] = _unscored(job, worker_id, reason, log)
            continue
        results[job.job_id] = wire.ScoreResult(
            job_id=job.job_id,
            group_id=job.group_id,
            worker_id=worker_id,
            scored=[s.scored for s in scores],
            overall=[s.overall if s.scored else None for s in scores],
            sub_scores=[{k: float(v) for k, v in s.sub_scores.items() if k != wire.GOLD_SUB_SCORE} for s in scores],
            reasoning=[s.reasoning for s in scores],
        )
        if all(s.scored for s in scores):
            scored.append((request, results[job.job_id]))
    if gold is not None and scored:
        gold.attach(scored)
    return [results[job.job_id] for job in jobs]


def score_job(backend: ScoreBackend, job: wire.ScoreJob, worker_id: str, log: Any) -> wire.ScoreResult:
    return score_jobs(backend, [job], worker_id, log)[0]


def _unscored(job: wire.ScoreJob, worker_id: str, reason: str, log: Any) -> wire.ScoreResult:
    log.warning("job_unscored", group_id=job.group_id, error=reason[:200])
    n = len(job.edit_pngs)
    return wire.ScoreResult(job.job_id, job.group_id, worker_id, [False] * n, [None] * n, [{}] * n, [reason] * n)
