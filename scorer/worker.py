"""The scorer's loop: announce READY(capacity) → receive a ScoreJob → decode images → ``backend.score`` → ScoreResult.

Failure model
- Liveness: a heartbeat thread with its own socket proves the process alive even during a long scoring call; whether
  scoring progresses is the broker's per-job deadline (a scorer that heartbeats but never answers is requeued, then
  quarantined). While idle the loop re-announces READY, which re-registers it with a restarted broker.
- A job whose images cannot be decoded, or a backend error, comes back with every edit unscored (the broker requeues
  the group once, then drops it, counted): a score is never invented.
- A failed CURVE handshake raises HandshakeError (the process exits non-zero with the reason).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import zmq

from editrl.common import wire
from editrl.common.config import TopologyConfig
from editrl.common.images import from_png
from editrl.common.net import harden, new_id
from editrl.common.security import HandshakeWatch, secure_client
from editrl.scorer.backend import ScoreBackend, ScoreRequest


def run_worker(cfg: TopologyConfig, index: int, backend: ScoreBackend, log: Any, should_stop: Any) -> int:
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
    ready = wire.encode(wire.ScorerReady(worker_id, cfg.scorers.backend, 1))
    last_ready = 0.0
    n_jobs = 0
    log.info("scorer_started", backend=cfg.scorers.backend, endpoint=cfg.broker.endpoint)
    try:
        while not should_stop():
            watch.check()
            if time.monotonic() - last_ready >= wire.HEARTBEAT_INTERVAL_S:
                with contextlib.suppress(zmq.Again):  # never block on a broker that is down: the next one will do
                    sock.send_multipart(ready, flags=zmq.NOBLOCK)  # idle re-announcement: re-registers us after restart
                last_ready = time.monotonic()
            if not sock.poll(100):
                continue
            try:
                job = wire.decode(sock.recv_multipart(copy=False))
            except wire.WireError as exc:
                log.warning("message_rejected", reason=exc.reason)
                continue
            if not isinstance(job, wire.ScoreJob):
                continue
            t0 = time.monotonic()
            sock.send_multipart(wire.encode(score_job(backend, job, worker_id, log)))
            n_jobs += 1
            log.debug("job_scored", group_id=job.group_id, seconds=round(time.monotonic() - t0, 4), n_jobs=n_jobs)
    finally:
        done.set()
        log.info("scorer_stopped", jobs=n_jobs)
        watch.close()
        sock.close(linger=0)
    return 0


def _heartbeats(ctx: zmq.Context, cfg: TopologyConfig, worker_id: str, done: threading.Event) -> None:
    sock = harden(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.ROUTING_ID, f"{worker_id}-hb-{os.getpid()}".encode())
    secure_client(sock, cfg.security)
    sock.connect(cfg.broker.endpoint)
    beat = wire.encode(wire.Heartbeat(worker_id))
    while not done.wait(wire.HEARTBEAT_INTERVAL_S):
        with contextlib.suppress(zmq.Again):
            sock.send_multipart(beat, flags=zmq.NOBLOCK)
    sock.close(linger=0)


def score_job(backend: ScoreBackend, job: wire.ScoreJob, worker_id: str, log: Any) -> wire.ScoreResult:
    """ScoreJob → ScoreResult through ``backend``; undecodable images or a backend error → all edits unscored."""

    n = len(job.edit_pngs)
    try:
        request = ScoreRequest(
            group_id=job.group_id,
            instruction=job.instruction,
            task_type=job.task_type,
            source=from_png(job.source_png),
            edits=[from_png(p) for p in job.edit_pngs],
        )
        scores = backend.score(request)
        if len(scores) != n:
            raise ValueError(f"backend returned {len(scores)} scores for {n} edits")
    except Exception as exc:  # a bad job or a backend failure must not take the worker down
        log.warning("job_unscored", group_id=job.group_id, error=str(exc)[:200])
        return wire.ScoreResult(job.job_id, job.group_id, worker_id, [False] * n, [None] * n, [{}] * n, [str(exc)] * n)
    return wire.ScoreResult(
        job_id=job.job_id,
        group_id=job.group_id,
        worker_id=worker_id,
        scored=[s.scored for s in scores],
        overall=[s.overall if s.scored else None for s in scores],
        sub_scores=[{k: float(v) for k, v in s.sub_scores.items()} for s in scores],
        reasoning=[s.reasoning for s in scores],
    )
