"""``editrl scorer --config topo.yaml --id N``: a stateless scoring worker (loop in :mod:`editrl.scorer.worker`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from editrl.common.entry import role_parser, run_guarded, start_role, stop_flag

    args, cfg, log = start_role("scorer", role_parser("scorer", __doc__), argv)
    from editrl.scorer.backend import make_backend
    from editrl.scorer.gold import GoldScorer
    from editrl.scorer.worker import run_worker

    try:
        backend = make_backend({"backend": cfg.scorers.backend, **cfg.scorers.options})
    except ValueError as exc:
        print(f"editrl scorer: scorers.backend: {exc}", file=sys.stderr)
        return 2
    gold = None
    if cfg.scorers.gold is not None:  # the held-out scorer (editrl.scorer.gold), on a share of the groups
        try:
            gold_backend = make_backend({"backend": cfg.scorers.gold.backend, **cfg.scorers.gold.options})
        except ValueError as exc:
            print(f"editrl scorer: scorers.gold: {exc}", file=sys.stderr)
            return 2
        gold = GoldScorer(gold_backend, cfg.scorers.gold.share, log)
    should_stop = stop_flag()
    return run_guarded("scorer", log, lambda: run_worker(cfg, args.id, backend, log, should_stop, gold))


if __name__ == "__main__":
    from editrl.common.entry import exit_now

    exit_now(main())  # a judge's torch/transformers modules: skip their interpreter teardown
