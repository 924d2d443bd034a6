"""``editrl learner --config topo.yaml``: the trainer; run under torchrun (``editrl up`` does that for you).

    python -m torch.distributed.run --nproc_per_node 2 -m editrl.learner.main --config topo.yaml

Run directly (no torchrun environment) it starts a single-rank process group itself.
"""

from __future__ import annotations

import os


def main(argv: list[str] | None = None) -> int:
    from editrl.common.entry import role_parser, run_guarded, start_role, stop_flag
    from editrl.common.net import free_local_port

    parser = role_parser("learner", __doc__, with_id=False)
    parser.add_argument("--max-steps", type=int, default=None, help="override learner.max_steps")

    def rank(args: object, cfg: object) -> int:
        if "RANK" not in os.environ:  # plain `editrl learner`: a one-rank group
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            port = cfg.learner.master_port or free_local_port()  # type: ignore[attr-defined]
            os.environ.setdefault("MASTER_PORT", str(port))
        return int(os.environ["RANK"])

    args, cfg, log = start_role("learner", parser, argv, proc_id=rank)
    rank_id = int(os.environ["RANK"])
    import torch
    import torch.distributed as dist

    torch.set_num_threads(cfg.learner.threads)
    torch.manual_seed(cfg.run.seed + rank_id)
    dist.init_process_group("gloo")
    from editrl.learner.loop import Learner

    should_stop = stop_flag()
    max_steps = cfg.learner.max_steps if args.max_steps is None else args.max_steps
    learner = Learner(cfg, log)

    def body() -> int:
        try:
            learner.run(should_stop=should_stop, max_steps=max_steps)
        except TimeoutError:
            pass
        finally:
            log.info("learner_stopped", step=learner.step, version=learner.version)
            learner.close()
            dist.destroy_process_group()
        return 0

    return run_guarded("learner", log, body)


if __name__ == "__main__":
    from editrl.common.entry import exit_now

    exit_now(main())  # after main's own clean-up; skips ~1.4 s of interpreter teardown
