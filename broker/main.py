"""``editrl broker --config topo.yaml``: the message broker and replay owner (one per topology)."""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="editrl broker", description=__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)

    from editrl.common.config import ConfigError, load_config
    from editrl.common.log import set_process_title, setup_logging

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"editrl broker: config error: {exc}", file=sys.stderr)
        return 2
    set_process_title("editrl::broker")
    log = setup_logging("broker", 0, cfg.run_dir)

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
    )
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    try:
        broker.run(should_stop=lambda: bool(stopping))
    finally:
        log.info("broker_stopped", counters=broker.counters())
        broker.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
