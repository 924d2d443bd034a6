"""The one ``editrl`` command. Subcommands import their heavy dependencies only when run, so ``--help`` is instant.

editrl up configs/quickstart.yaml [--max-steps N] [--dry-run]   start and supervise a whole topology
editrl broker|actor|scorer|learner --config topo.yaml [--id N]   run one process of it
editrl make-tiny DIR [--vlm|--trained]                          build the tiny local FLUX-Kontext (or Qwen2.5-VL judge)
editrl make-data DIR                                             write the synthetic quickstart task set
editrl status topo.yaml [--json|--once]                          live table of every process, queues, counters
editrl check topo.yaml                                           score a bundled workload through the live pool
editrl replay ls|stats|show|export RUN                           inspect a replay buffer (read-only, safe while running)
editrl bon topo.yaml --tasks T.jsonl --n N --out DIR             Best-of-N with the live scorer pool, Best-of-1..N
editrl eval topo.yaml --tasks T.jsonl --out DIR [--checkpoint W|--images D]   GEdit-style evaluation, per task group
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

ROLES = ("broker", "actor", "scorer", "learner")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ROLES:
        module = __import__(f"editrl.{argv[0]}.main", fromlist=["main"])
        return module.main(argv[1:])
    parser = argparse.ArgumentParser(prog="editrl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for role in ROLES:
        sub.add_parser(role, help=f"run one {role} process (see `editrl {role} --help`)")
    up = sub.add_parser("up", help="start every process of a topology and supervise them")
    up.add_argument("config")
    up.add_argument("--max-steps", type=int, default=None, help="stop after this many learner steps")
    up.add_argument("--dry-run", action="store_true", help="print the resolved config and commands, start nothing")
    tiny = sub.add_parser("make-tiny", help="build a tiny random-weight FLUX-Kontext pipeline (no download)")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--vlm", action="store_true", help="a tiny Qwen2.5-VL judge instead (garbage replies, by design)")
    tiny.add_argument(
        "--trained", action="store_true", help="train the tiny editor here instead (~6 min on 2 cores; 32 px)"
    )
    data = sub.add_parser("make-data", help="write the synthetic quickstart edit tasks (jsonl + PNGs)")
    data.add_argument("dir")
    data.add_argument("--n-tasks", type=int, default=16)
    data.add_argument("--size", type=int, default=64)
    check = sub.add_parser("check", help="send a known workload through the live broker + scorers and verify it")
    check.add_argument("config")
    check.add_argument("--groups", type=int, default=8)
    check.add_argument("--json", action="store_true")
    check.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for one group's scores")
    keys = sub.add_parser("keys", help="generate CURVE keys: server pair, client pairs and the allowlist")
    keys.add_argument("dir")
    keys.add_argument(
        "--clients",
        default="actor-0,actor-1,scorer-0,learner-0,tool",
        help="comma-separated client key names, one per process; the role is the name up to the first '-' "
        "(actor, scorer, learner, tool)",
    )
    status = sub.add_parser("status", help="a live table of every process of a running topology (until Ctrl-C)")
    status.add_argument("config")
    status.add_argument(
        "--json", action="store_true", help="one JSON snapshot (processes, counters, weights), then exit"
    )
    status.add_argument("--once", action="store_true", help="print the table once and exit")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    from editrl.scripts import bon, evaluate, replay  # standard library only at import: --help stays instant

    bon.register(sub)
    evaluate.register(sub)
    replay.register(sub)
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    commands = {
        "up": _up,
        "make-tiny": _make_tiny,
        "make-data": _make_data,
        "status": _status,
        "keys": _keys,
        "check": _check,
        "replay": replay.run,
    }
    return commands[args.command](args)


def _load(path: str, broker_client: bool = False):  # noqa: ANN202
    """The topology (exit 2 naming the field); with ``broker_client``, also this tool's keys or role secret."""
    from editrl.common.config import ConfigError, load_config

    try:
        cfg = load_config(path)
        if broker_client:
            cfg.security.validate("tool")
        return cfg
    except (ConfigError, ValueError) as exc:
        print(f"editrl: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_scorer_backend(cfg) -> None:  # noqa: ANN001
    """Build the configured score backend (and the gold one) once (cheap: judge models load lazily in the scorer) so a
    bad backend name or option stops `editrl up` before any process starts, instead of a scorer crash loop."""
    from editrl.scorer.backend import make_backend

    try:
        make_backend({"backend": cfg.scorers.backend, **cfg.scorers.options})
    except (ValueError, ImportError) as exc:
        print(f"editrl: config error: scorers.options: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.scorers.gold is not None:
        try:
            make_backend({"backend": cfg.scorers.gold.backend, **cfg.scorers.gold.options})
        except (ValueError, ImportError) as exc:
            print(f"editrl: config error: scorers.gold: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def _up(args: argparse.Namespace) -> int:
    from editrl.common.log import setup_logging
    from editrl.scripts.up import Supervisor, plan, prepare

    cfg = _load(args.config)
    _check_scorer_backend(cfg)
    if cfg.run.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            print("editrl: config error: run.wandb: the wandb package is not installed (pip install wandb)",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(2)
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        for child in plan(cfg, cfg.source_path, args.max_steps):
            print(f"{child.name}: {' '.join(child.argv)}")
        return 0
    log = setup_logging("supervisor", 0, cfg.run_dir)
    prepare(cfg, log)
    print(
        f"editrl: run '{cfg.run.name}' in {cfg.run_dir} (logs: {cfg.run_dir / 'logs'}, TensorBoard: {cfg.run_dir / 'tb'})"
    )
    return Supervisor(cfg, cfg.source_path, args.max_steps, log).run()


def _make_tiny(args: argparse.Namespace) -> int:
    if args.vlm:
        from editrl.common.families.tiny.qwen2_5_vl import build_tiny_qwen2_5_vl

        print(build_tiny_qwen2_5_vl(args.dir, seed=args.seed))
        return 0
    if args.trained:
        from editrl.common.families.tiny.train_editor import train_tiny_editor

        print(train_tiny_editor(args.dir, seed=args.seed))
        return 0
    from editrl.common.families.tiny.flux_kontext import build_tiny_flux_kontext

    print(build_tiny_flux_kontext(args.dir, seed=args.seed))
    return 0


def _make_data(args: argparse.Namespace) -> int:
    from editrl.common.tasks import make_quickstart_tasks

    print(make_quickstart_tasks(args.dir, n_tasks=args.n_tasks, size=args.size))
    return 0


def _ask_broker(cfg, call):  # noqa: ANN001, ANN202
    """Run a client call; a failed handshake (exit 3) or no answer (exit 1) becomes a clear message."""
    from editrl.common.security import HandshakeError

    try:
        return call(), 0
    except HandshakeError as exc:
        print(f"editrl: {exc}", file=sys.stderr)
        return None, 3
    except TimeoutError:
        print(f"editrl: no answer from the broker or its scorers at {cfg.broker.endpoint}", file=sys.stderr)
        return None, 1


def _check(args: argparse.Namespace) -> int:
    from editrl.scripts.check import run_check

    cfg = _load(args.config, broker_client=True)
    summary, code = _ask_broker(cfg, lambda: run_check(cfg, n_groups=args.groups, timeout_s=args.timeout).summary())
    if summary is None:
        return code
    if args.json:
        print(json.dumps(summary))
    else:
        state = "all scored, in range, in order" if summary["ok"] else "FAILED"
        print(f"check: {summary['groups']} groups / {summary['images']} images: {state}")
        print(
            f"latency p50 {summary['latency_p50_s']} s, p95 {summary['latency_p95_s']} s, "
            f"{summary['images_per_s']} images/s"
        )
        for failure in summary["failures"]:
            print(f"  {failure}")
    return 0 if summary["ok"] else 1


def _keys(args: argparse.Namespace) -> int:
    from editrl.common.keys import generate_layout
    from editrl.common.roles import ROLES, role_of_key_name

    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    layout = generate_layout(args.dir, names)
    print(f"server keys:  {layout.root / 'server.key'} (public), {layout.root / 'server.key_secret'} (secret, 0600)")
    print(f"client keys:  {layout.root / 'clients'}/<name>.key[_secret]   allowlist: {layout.allowed_dir}")
    print("roles:        " + ", ".join(f"{n} -> {role_of_key_name(n) or 'NO ROLE'}" for n in names))
    for name in (n for n in names if not role_of_key_name(n)):
        print(
            f"editrl keys: warning: {name!r} does not start with a role ({', '.join(ROLES)}): the broker accepts "
            f"this key but refuses its messages; name it e.g. tool-{name}",
            file=sys.stderr,
        )
    print("topology section for the broker host (clients use client_public_key / client_secret_key instead):")
    for key, value in dataclasses.asdict(layout.broker_config()).items():
        if value != "":  # role_secrets_file: not used with curve
            print(f"  {key}: {value}")
    return 0


def _status(args: argparse.Namespace) -> int:
    import time

    import zmq

    from editrl.common import wire
    from editrl.common.net import BrokerClient, new_id
    from editrl.scripts.status import gold_line, latest_gold, local_pids, render_status

    cfg = _load(args.config, broker_client=True)
    client = BrokerClient(zmq.Context(), cfg.broker.endpoint, "status", 3.0, cfg.security, role="tool")
    try:
        while True:
            reply, code = _ask_broker(cfg, lambda: client.request(wire.StatusRequest(new_id()), retries=0))
            if reply is None:
                return code
            if isinstance(reply, wire.Ack):  # refused, e.g. a CURVE key whose name names no role
                print(f"editrl: the broker refused the status request: {reply.detail}", file=sys.stderr)
                return 1
            pids = local_pids(cfg.run_dir)
            gold = latest_gold(cfg.run_dir) if cfg.scorers.gold is not None else None
            if args.json:
                snapshot = {"processes": reply.processes, "counters": reply.counters, "weights": reply.weights,
                            "local_pids": pids}  # fmt: skip
                if cfg.scorers.gold is not None:
                    snapshot["gold"] = gold
                print(json.dumps(snapshot))
                return 0
            row = gold_line(gold, (cfg.run_dir / "metrics.jsonl").exists()) if cfg.scorers.gold is not None else None
            table = render_status(reply.processes, reply.counters, reply.weights, pids, row)
            if args.once:
                print(table)
                return 0
            print("\033[H\033[J" + table if sys.stdout.isatty() else table + "\n", flush=True)
            try:
                time.sleep(args.interval)
            except KeyboardInterrupt:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
