"""``editrl scorer --config topo.yaml --id N``: a stateless scoring worker.

Loop: announce READY(capacity) → receive a ScoreJob → decode images → ``backend.score`` → ScoreResult; a heartbeat
every HEARTBEAT_INTERVAL_S while idle. A job whose images cannot be decoded comes back with every edit unscored (the
broker requeues it once, then drops it, counted): a score is never invented.
"""

from __future__ import annotations

import sys
import threading
import time


def main(argv: list[str] | None = None) -> int:
    from editrl.common.entry import role_parser, start_role, stop_flag

    args, cfg, log = start_role("scorer", role_parser("scorer", __doc__), argv)
    import zmq

    from editrl.common import wire
    from editrl.common.net import harden, new_id
    from editrl.scorer.backend import make_backend

    try:
        backend = make_backend({"backend": cfg.scorers.backend, **cfg.scorers.options})
    except ValueError as exc:
        print(f"editrl scorer: scorers.backend: {exc}", file=sys.stderr)
        return 2
    worker_id = f"scorer-{args.id}"
    ctx = zmq.Context()
    sock = harden(ctx.socket(zmq.DEALER))
    # A routing id unique to this process: the broker tells a restarted scorer (same worker id, new id) from the
    # old one and requeues the jobs the dead process held at once.
    sock.setsockopt(zmq.ROUTING_ID, f"{worker_id}-{new_id()[:12]}".encode())
    sock.connect(cfg.broker.endpoint)
    should_stop = stop_flag()
    done = threading.Event()
    beat = threading.Thread(target=_heartbeats, args=(ctx, cfg.broker.endpoint, worker_id, done), daemon=True)
    beat.start()

    ready = wire.encode(wire.ScorerReady(worker_id, cfg.scorers.backend, 1))
    sock.send_multipart(ready)
    last_ready = time.monotonic()
    n_jobs = 0
    log.info("scorer_started", backend=cfg.scorers.backend, endpoint=cfg.broker.endpoint)
    while not should_stop():
        if time.monotonic() - last_ready >= wire.HEARTBEAT_INTERVAL_S:
            sock.send_multipart(ready)  # idle re-announcement: re-registers us with a restarted broker
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
        result = score_job(backend, job, worker_id, log)
        sock.send_multipart(wire.encode(result))
        n_jobs += 1
        log.debug("job_scored", group_id=job.group_id, seconds=round(time.monotonic() - t0, 4), n_jobs=n_jobs)
    done.set()
    log.info("scorer_stopped", jobs=n_jobs)
    sock.close(linger=0)
    return 0


def _heartbeats(ctx, endpoint: str, worker_id: str, done) -> None:  # noqa: ANN001
    """Heartbeat from a thread of its own (own socket), so a long scoring call still proves the process alive;
    whether the scoring itself progresses is the broker's per-job deadline."""
    import os

    import zmq

    from editrl.common import wire
    from editrl.common.net import harden

    sock = harden(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.ROUTING_ID, f"{worker_id}-hb-{os.getpid()}".encode())
    sock.connect(endpoint)
    beat = wire.encode(wire.Heartbeat(worker_id))
    while not done.wait(wire.HEARTBEAT_INTERVAL_S):
        sock.send_multipart(beat)
    sock.close(linger=0)


def score_job(backend, job, worker_id: str, log):  # noqa: ANN001 - typed in the docstring
    """ScoreJob → ScoreResult through ``backend``; undecodable images or a backend error → all edits unscored."""
    from editrl.common import wire
    from editrl.common.images import from_png
    from editrl.scorer.backend import ScoreRequest

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


if __name__ == "__main__":
    sys.exit(main())
