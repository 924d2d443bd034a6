"""``editrl broker --config topo.yaml``: the message broker and replay owner (one per topology)."""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from editrl.common.entry import role_parser, start_role, stop_flag

    _, cfg, log = start_role("broker", role_parser("broker", __doc__, with_id=False), argv)

    from editrl.broker.admission import GroupRules
    from editrl.broker.server import Broker
    from editrl.broker.store import ReplayStore
    from editrl.common.tasks import TaskFileError, load_tasks

    try:
        tasks = load_tasks(cfg.data.tasks)
    except (TaskFileError, FileNotFoundError) as exc:
        log.error("tasks_unreadable", error=str(exc))
        print(f"editrl broker: data.tasks: {exc}", file=sys.stderr)
        return 2
    store = ReplayStore(cfg.replay_path, cfg.broker.replay_capacity, cfg.broker.map_size_bytes)
    broker = Broker(
        cfg.broker.endpoint,
        store,
        tasks,
        groups_per_step=cfg.learner.groups_per_step,
        max_staleness=cfg.broker.max_staleness,
        log=log,
        lease_timeout_s=cfg.broker.lease_timeout_s,
        score_deadline_s=cfg.broker.score_deadline_s,
        security=cfg.security,
        scorer_liveness_s=cfg.timers.scorer_liveness_s,
        storage_retry_s=cfg.timers.storage_retry_s,
        rules=GroupRules.from_config(cfg),
        max_job_attempts=cfg.broker.max_job_attempts,
        learner_ranks=cfg.learner.nproc,
    )
    should_stop = stop_flag()
    # Past a file-size limit the kernel sends SIGXFSZ, whose default action kills the process. Ignored, the write
    # fails with EFBIG instead: the commit fails, nothing is acknowledged, and the broker keeps running.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        broker.run(should_stop=should_stop)
    finally:
        log.info("broker_stopped", counters=broker.counters())
        broker.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
