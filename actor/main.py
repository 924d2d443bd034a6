"""``editrl actor --config topo.yaml --id N``: a stateless rollout worker.

Loop: lease → maybe load weights → sample a group → send (resend with the same ids until acknowledged) → repeat.
Weights are swapped only between groups; a group is generated only with a version that is fully loaded and
checksummed, and records that version. A restarted actor reconnects and loads the latest version from its first
lease reply.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="editrl actor", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--max-groups", type=int, default=0, help="exit after this many groups (0 = run until stopped)")
    args = parser.parse_args(argv)

    from editrl.common.config import ConfigError, load_config
    from editrl.common.log import set_process_title, setup_logging

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"editrl actor: config error: {exc}", file=sys.stderr)
        return 2
    set_process_title(f"editrl::actor-{args.id}")
    log = setup_logging("actor", args.id, cfg.run_dir)

    import torch

    torch.set_num_threads(cfg.actors.threads)
    from editrl.actor.loop import Actor

    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    actor = Actor(cfg, args.id, log)
    t0 = time.monotonic()
    try:
        actor.run(should_stop=lambda: bool(stopping), max_groups=args.max_groups)
    except TimeoutError:
        pass  # stopped while waiting for the broker
    finally:
        log.info("actor_stopped", groups=actor.n_groups, seconds=round(time.monotonic() - t0, 1))
        actor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
