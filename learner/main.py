"""``editrl learner --config topo.yaml``: the trainer; run under torchrun (``editrl up`` does that for you).

    python -m torch.distributed.run --nproc_per_node 2 -m editrl.learner.main --config topo.yaml

Run directly (no torchrun environment) it starts a single-rank process group itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="editrl learner", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--max-steps", type=int, default=None, help="override learner.max_steps")
    args = parser.parse_args(argv)

    from editrl.common.config import ConfigError, load_config
    from editrl.common.log import set_process_title, setup_logging

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"editrl learner: config error: {exc}", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:  # plain `editrl learner`: a one-rank group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(cfg.learner.master_port))
    rank = int(os.environ["RANK"])
    set_process_title(f"editrl::learner-{rank}")
    log = setup_logging("learner", rank, cfg.run_dir)

    import torch
    import torch.distributed as dist

    torch.set_num_threads(cfg.learner.threads)
    torch.manual_seed(cfg.run.seed + rank)
    dist.init_process_group("gloo")
    from editrl.learner.loop import Learner

    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    max_steps = cfg.learner.max_steps if args.max_steps is None else args.max_steps
    learner = Learner(cfg, log)
    try:
        learner.run(should_stop=lambda: bool(stopping), max_steps=max_steps)
    except TimeoutError:
        pass
    finally:
        log.info("learner_stopped", step=learner.step, version=learner.version)
        learner.close()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
