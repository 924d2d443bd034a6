"""``editrl replay``: read-only inspection of a replay LMDB (``ls``, ``stats``, ``show``, ``export``).

Safe while the broker runs: the environment is opened as an ordinary LMDB reader (``readonly=True`` with the lock
file, never ``lock=False``, which would let the broker reuse pages a reader still sees). Every read is one short
read-only transaction that copies what it needs out and ends before anything is printed, decoded or written, so a
reader never pins old pages across user-visible work. ``stats`` and ``ls`` read the status table and the counters in
ONE transaction: the store writes a state change and its counters in the same commit, so they always agree.

Terms are the store's (see :mod:`editrl.broker.store`): a group's ``state`` is ``pending``, ``ready`` (scored,
sampleable), ``consumed``, ``stale``, ``unscorable``, ``quarantined`` (poison: its score job kept failing, or a
learner's family check refused it; ``reason`` says which) or ``evicted``; a consumed/stale/unscorable group pushed out by
capacity keeps its state with ``evicted: true`` and its record (images) is gone. Rewards are the per-edit
``overall`` scores; sub-scores and the judge's reasoning are ``status["scores"]["sub_scores"|"reasoning"]``.

The functions below are pure (arguments in, plain dicts out) and raise :class:`ReplayToolError` for bad input;
``run`` turns that into exit code 2 with the message. Heavy imports (lmdb, numpy, PIL, matplotlib) are lazy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("pending", "ready", "consumed", "stale", "unscorable", "quarantined", "evicted")
SORT_KEYS = ("time", "version", "reward")
REPLAY_DIR = "replay.lmdb"  # the replay's directory inside a run directory
PAGE_SORTS = ("time_asc", "time_desc", "reward_asc", "reward_desc", "version_asc", "version_desc")


class ReplayToolError(Exception):
    """Bad input for a replay tool (missing path, not an LMDB, unknown group id): exit code 2 with this message."""


@dataclass
class Snapshot:
    """What one read transaction saw: every group's status, which records are still stored, counters, sizes."""

    statuses: list[tuple[str, dict[str, Any]]]  # (group_id, status) in key order
    record_bytes: dict[str, int]  # group_id → size of its stored record (evicted groups absent)
    counters: dict[str, int]
    meta: dict[str, Any]  # learner_step, task_cursor, weights, ...
    map_size_bytes: int
    used_bytes: int  # pages in use as of the last commit × page size


# -- opening and reading ------------------------------------------------------------------------------------------


def resolve_lmdb(path: str | Path) -> Path:
    """A run directory (→ ``<run>/replay.lmdb``) or an LMDB directory itself → the LMDB directory."""
    p = Path(path)
    if not p.exists():
        raise ReplayToolError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise ReplayToolError(f"{p}: not a directory (expected a run directory or its {REPLAY_DIR}/)")
    if (p / "data.mdb").is_file():
        return p
    if (p / REPLAY_DIR / "data.mdb").is_file():
        return p / REPLAY_DIR
    raise ReplayToolError(f"{p}: not an LMDB directory (no data.mdb) nor a run directory with {REPLAY_DIR}/")


@contextmanager
def open_replay(path: str | Path) -> Iterator[Any]:
    """The store opened as a reader (``ReplayStore(readonly=True)``, map size as the writer last recorded it)."""
    import lmdb

    from editrl.broker.store import ReplayStore

    lmdb_dir = resolve_lmdb(path)
    try:  # capacity only matters to a writer; map_size 0 = the size recorded in the file
        store = ReplayStore(lmdb_dir, capacity=1, map_size_bytes=0, readonly=True)
    except (lmdb.NotFoundError, lmdb.InvalidError, lmdb.VersionMismatchError) as exc:  # no named tables, not LMDB
        raise ReplayToolError(f"{lmdb_dir}: not an editrl replay LMDB ({type(exc).__name__}: {exc})") from None
    except lmdb.Error as exc:
        raise ReplayToolError(f"{lmdb_dir}: cannot open read-only ({type(exc).__name__}: {exc})") from None
    try:
        yield store
    finally:
        store.close()


def _read(store: Any, fn: Callable[[Any], Any]) -> Any:
    """Run ``fn`` in one short read transaction; adopt the writer's grown map size if it changed since opening.

    Values are zero-copy buffers valid only inside the transaction: ``fn`` copies out (``bytes``) what it keeps, so
    sizing a record (``len``) never reads it.
    """
    import lmdb

    for attempt in range(2):
        try:
            with store.env.begin(buffers=True) as txn:
                return fn(txn)
        except lmdb.MapResizedError:
            if attempt:
                raise
            store.env.set_mapsize(0)


def snapshot(path: str | Path) -> Snapshot:
    """Every group's status, the stored records' sizes, the counters and meta, as one transaction saw them."""
    with open_replay(path) as store:
        return _snapshot(store)


def _snapshot(store: Any) -> Snapshot:
    """Statuses, record sizes and meta in ONE read transaction; decoded after it ended."""
    import msgpack

    def txn_fn(txn: Any) -> tuple[list, dict, dict]:
        statuses = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=store.db["status"])]
        sizes = {bytes(k): len(v) for k, v in txn.cursor(db=store.db["groups"])}
        meta = {bytes(k): bytes(v) for k, v in txn.cursor(db=store.db["meta"])}
        return statuses, sizes, meta

    raw_statuses, raw_sizes, raw_meta = _read(store, txn_fn)
    info, psize = store.env.info(), store.env.stat()["psize"]
    meta = {k.decode(): msgpack.unpackb(v, raw=False) for k, v in raw_meta.items()}
    counters = dict.fromkeys(_counter_keys(), 0)
    counters.update(meta.pop("counters", {}))
    return Snapshot(
        statuses=[(k.decode(), msgpack.unpackb(v, raw=False)) for k, v in raw_statuses],
        record_bytes={k.decode(): n for k, n in raw_sizes.items()},
        counters=counters,
        meta=meta,
        map_size_bytes=info["map_size"],
        used_bytes=(info["last_pgno"] + 1) * psize,
    )


def _counter_keys() -> tuple[str, ...]:
    from editrl.broker.store import COUNTER_KEYS

    return COUNTER_KEYS


def _summary(values: list[float]) -> dict[str, Any]:
    """n, mean, population std, min, max (None when empty)."""
    n = len(values)
    if not n:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def _row(group_id: str, status: dict[str, Any], stored: bool) -> dict[str, Any]:
    rewards = status.get("rewards")
    summary = _summary(rewards) if rewards else {}
    return {
        "group_id": group_id,
        "seq": status.get("seq"),
        "version": status.get("version"),
        "task_type": status.get("task_type"),
        "task_id": status.get("task_id"),
        "instruction": status.get("instruction"),
        "state": status.get("state"),
        "evicted": bool(status.get("evicted")) or status.get("state") == "evicted",
        "stored": stored,
        "t_insert": status.get("t_insert"),
        "group_size": status.get("group_size"),
        "reward_mean": summary.get("mean"),
        "reward_min": summary.get("min"),
        "reward_max": summary.get("max"),
    }


# -- ls / stats ---------------------------------------------------------------------------------------------------


def list_groups(
    path: str | Path,
    sort: str = "time",
    task_type: str | None = None,
    limit: int | None = None,
    descending: bool = False,
) -> list[dict[str, Any]]:
    """One row per group (evicted ones included), filtered by task type, sorted, then cut to ``limit``.

    ``time`` is insertion order (seq). Groups without a reward sort after the scored ones in either direction.
    """
    if sort not in SORT_KEYS:
        raise ReplayToolError(f"--sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
    if limit is not None and limit < 0:
        raise ReplayToolError(f"--limit must be >= 0, got {limit}")
    snap = snapshot(path)
    rows = [_row(gid, st, gid in snap.record_bytes) for gid, st in snap.statuses]
    if task_type is not None:
        rows = [r for r in rows if r["task_type"] == task_type]
    field = {"time": "seq", "version": "version", "reward": "reward_mean"}[sort]
    rows.sort(key=lambda r: r["seq"])
    rows.sort(key=lambda r: r[field] if r[field] is not None else 0, reverse=descending)  # stable: ties by seq
    rows.sort(key=lambda r: r[field] is None)
    return rows if limit is None else rows[:limit]


def replay_stats(path: str | Path) -> dict[str, Any]:
    """Counts per state, storage sizes, record sizes, reward summaries per version and task type, drops/evictions."""
    lmdb_dir = resolve_lmdb(path)
    snap = snapshot(lmdb_dir)
    states = {**dict.fromkeys(STATES, 0), **Counter(st["state"] for _, st in snap.statuses)}
    scored = [st for _, st in snap.statuses if st.get("rewards")]
    c = snap.counters
    files = [f for f in lmdb_dir.iterdir() if f.is_file()]
    return {
        "lmdb": str(lmdb_dir),
        "groups": len(snap.statuses),
        "states": states,
        "records_stored": len(snap.record_bytes),
        "evicted_records": sum(1 for _, st in snap.statuses if st.get("evicted")),
        "counters": c,
        "drops": {
            "stale": c["dropped_stale"],
            "unscorable": c["dropped_unscorable"],
            "quarantined": c.get("quarantined", 0),
            "duplicates": c["duplicate_groups"],
        },
        "evictions": {"evicted": c["evicted"], "evicted_unconsumed": c["evicted_unconsumed"]},
        "storage": {
            "disk_bytes": sum(f.stat().st_size for f in files),
            "disk_allocated_bytes": sum(f.stat().st_blocks * 512 for f in files),
            "used_bytes": snap.used_bytes,
            "map_size_bytes": snap.map_size_bytes,
        },
        "record_bytes": {
            **_summary([float(n) for n in snap.record_bytes.values()]),
            "total": sum(snap.record_bytes.values()),
        },
        "rewards": {"groups": len(scored), **_summary([r for st in scored for r in st["rewards"]])},
        "by_version": _reward_summaries(scored, "version"),
        "by_task_type": _reward_summaries(scored, "task_type"),
        "weights_version": (snap.meta.get("weights") or {}).get("version"),
        "learner_step": snap.meta.get("learner_step"),
    }


def _reward_summaries(scored: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Edit-reward summaries of scored groups per value of ``key`` (version or task type), sorted by that value."""
    parts: dict[Any, list[list[float]]] = {}
    for st in scored:
        parts.setdefault(st[key], []).append(st["rewards"])
    return [{key: k, "groups": len(v), **_summary([r for rs in v for r in rs])} for k, v in sorted(parts.items())]


# -- show ---------------------------------------------------------------------------------------------------------


def _fetch(store: Any, group_id: str) -> tuple[dict[str, Any] | None, Any]:
    """``(status or None if unknown, RolloutGroup or None if evicted)``: one short transaction, decoded after it."""
    import msgpack

    from editrl.common import codec, wire

    gid = group_id.encode()
    if not 0 < len(gid) <= wire.MAX_ID_BYTES:  # also keeps LMDB's key-size error away
        return None, None

    def txn_fn(txn: Any) -> tuple[bytes | None, bytes | None]:
        status, record = txn.get(gid, db=store.db["status"]), txn.get(gid, db=store.db["groups"])
        return (None if status is None else bytes(status)), (None if record is None else bytes(record))

    raw_status, record = _read(store, txn_fn)
    if raw_status is None:
        return None, None
    try:
        group = None if record is None else codec.decode(codec.decode_record(record))
    except wire.WireError as exc:
        raise ReplayToolError(f"the stored record of group {group_id} does not decode: {exc}") from None
    return msgpack.unpackb(raw_status, raw=False), group


def load_group(path: str | Path, group_id: str) -> tuple[dict[str, Any], Any]:
    """``(status, RolloutGroup or None if its record was evicted)``; unknown id → ReplayToolError."""
    with open_replay(path) as store:
        status, group = _fetch(store, group_id)
    if status is None:
        raise ReplayToolError(f"unknown group id {group_id!r} in {resolve_lmdb(path)}")
    return status, group


def _png_info(png: bytes) -> dict[str, Any]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return {"width": im.width, "height": im.height, "bytes": len(png)}


def show_group(path: str | Path, group_id: str, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything about one group: metadata, source, and per edit its reward, sub-scores and judge reasoning.

    With ``out_dir``: writes ``source.png`` and ``edit_<i>.png`` there (not possible once the record is evicted).
    """
    status, group = load_group(path, group_id)
    scores = status.get("scores") or {}
    rewards = status.get("rewards")
    n = len(group.edit_pngs) if group is not None else status.get("group_size") or len(rewards or [])
    edits = []
    for i in range(n):
        edit = {
            "index": i,
            "reward": rewards[i] if rewards else None,
            "sub_scores": (scores.get("sub_scores") or [{}] * n)[i],
            "reasoning": (scores.get("reasoning") or [""] * n)[i],
        }
        if group is not None:
            edit["image"] = _png_info(group.edit_pngs[i])
        edits.append(edit)
    info = {
        **_row(group_id, status, group is not None),
        "actor_id": status.get("actor_id"),
        "scorer": scores.get("worker_id"),
        "unscorable_reason": status.get("reason"),
        "family": group.family if group is not None else None,
        "source": _png_info(group.source_png) if group is not None else None,
        "edits": edits,
        "files": [],
    }
    if out_dir is not None:
        if group is None:
            raise ReplayToolError(f"group {group_id} was evicted: its images are no longer stored")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        named = [("source.png", group.source_png), *((f"edit_{i}.png", png) for i, png in enumerate(group.edit_pngs))]
        for name, png in named:
            (out / name).write_bytes(png)
            info["files"].append(str(out / name))
    return info


# -- export -------------------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def format_ls(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'group_id':34s} {'seq':>5s} {'ver':>4s} {'task_type':14s} {'state':20s} "
        f"{'mean':>6s} {'min':>6s} {'max':>6s}  instruction"
    ]
    for r in rows:
        state = r["state"] + (" (evicted)" if r["evicted"] and r["state"] != "evicted" else "")
        lines.append(
            f"{r['group_id']:34s} {r['seq']:5d} {r['version']:4d} {r['task_type']:14s} {state:20s} "
            f"{_fmt(r['reward_mean']):>6s} {_fmt(r['reward_min']):>6s} {_fmt(r['reward_max']):>6s}  {r['instruction']}"
        )
    lines.append(f"{len(rows)} groups")
    return "\n".join(lines)


def format_stats(s: dict[str, Any]) -> str:
    st, rb, r = s["storage"], s["record_bytes"], s["rewards"]
    mib = 1 << 20
    lines = [
        f"replay {s['lmdb']}: {s['groups']} groups "
        f"({s['records_stored']} records stored, {s['evicted_records']} evicted)",
        "states      " + "  ".join(f"{k} {v}" for k, v in s["states"].items()),
        f"storage     {st['disk_bytes'] / mib:.2f} MiB on disk, {st['used_bytes'] / mib:.2f} MiB used, "
        f"map size {st['map_size_bytes'] / mib:.0f} MiB",
        f"records     n {rb['n']}  total {rb['total'] / mib:.2f} MiB  mean {_fmt(rb['mean'], 0)} B  "
        f"min {_fmt(rb['min'], 0)} B  max {_fmt(rb['max'], 0)} B",
        f"drops       stale {s['drops']['stale']}  unscorable {s['drops']['unscorable']}  "
        f"quarantined {s['drops']['quarantined']}  "
        f"duplicates {s['drops']['duplicates']}",
        f"evictions   {s['evictions']['evicted']} (unconsumed {s['evictions']['evicted_unconsumed']})",
        f"rewards     groups {r['groups']}  edits {r['n']}  mean {_fmt(r['mean'])}  std {_fmt(r['std'])}  "
        f"min {_fmt(r['min'])}  max {_fmt(r['max'])}",
        f"{'version':>14s} {'groups':>7s} {'edits':>6s} {'mean':>7s} {'std':>7s} {'min':>7s} {'max':>7s}",
    ]
    rows = [(f"v{v['version']}", v) for v in s["by_version"]] + [(t["task_type"], t) for t in s["by_task_type"]]
    for name, v in rows:
        lines.append(
            f"{name:>14s} {v['groups']:7d} {v['n']:6d} {_fmt(v['mean']):>7s} {_fmt(v['std']):>7s} "
            f"{_fmt(v['min']):>7s} {_fmt(v['max']):>7s}"
        )
    lines.append("counters    " + "  ".join(f"{k} {v}" for k, v in s["counters"].items()))
    return "\n".join(lines)


def format_show(g: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g["t_insert"])) if g["t_insert"] else "?"
    src = g["source"]
    lines = [
        f"group {g['group_id']} (seq {g['seq']})",
        f"  instruction: {g['instruction']}",
        f"  task {g['task_id']} ({g['task_type']})  version {g['version']}  actor {g['actor_id']}  "
        f"family {g['family']}",
        f"  state {g['state']}{' (evicted: images gone)' if g['evicted'] else ''}  inserted {when}  "
        f"scorer {g['scorer']}",
        f"  source: {src['width']}x{src['height']} PNG, {src['bytes']} bytes" if src else "  source: (evicted)",
    ]
    if g["unscorable_reason"]:
        lines.append(f"  {g['state']}: {g['unscorable_reason']}")
    if g["reward_mean"] is not None:
        lines.append(f"  reward mean {g['reward_mean']:.4f}  min {g['reward_min']:.4f}  max {g['reward_max']:.4f}")
    for e in g["edits"]:
        subs = "  ".join(f"{k} {v:.4f}" for k, v in e["sub_scores"].items())
        lines.append(f"  edit {e['index']}: reward {_fmt(e['reward'], 4)}  {subs}")
        if e["reasoning"]:
            lines.append(f"      {e['reasoning']}")
    lines += [f"  wrote {f}" for f in g["files"]]
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------------------------


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``replay`` (with ``ls``, ``stats``, ``show``, ``export``) to ``editrl``'s subparsers; handler: ``run``."""
    replay = subparsers.add_parser("replay", help="inspect a replay LMDB read-only (ls, stats, show, export)")
    sub = replay.add_subparsers(dest="replay_command", required=True)
    where = "a run directory (uses <run>/replay.lmdb) or the LMDB directory itself"
    ls = sub.add_parser("ls", help="one line per group: id, version, task type, state, rewards")
    ls.add_argument("path", metavar="RUN_OR_LMDB", help=where)
    ls.add_argument("--sort", choices=SORT_KEYS, default="time", help="time = insertion order (default)")
    ls.add_argument("--desc", action="store_true", help="descending (groups without rewards stay last)")
    ls.add_argument("--task-type", default=None)
    ls.add_argument("--limit", type=int, default=None)
    ls.add_argument("--json", action="store_true")
    stats = sub.add_parser("stats", help="counts per state, sizes, reward summaries, drops and evictions")
    stats.add_argument("path", metavar="RUN_OR_LMDB", help=where)
    stats.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one group: instruction, every edit's reward, sub-scores and reasoning")
    show.add_argument("group_id", metavar="GROUP_ID")
    show.add_argument("path", metavar="RUN_OR_LMDB", help=where)
    show.add_argument("--json", action="store_true")
    show.add_argument("--out", default=None, metavar="DIR", help="write source.png and edit_<i>.png here")
    export = sub.add_parser("export", help="a static HTML viewer of the groups (no network)")
    export.add_argument("path", metavar="RUN_OR_LMDB", help=where)
    export.add_argument("--html", required=True, metavar="DIR", help="writes DIR/index.html and DIR/img/")
    export.add_argument("--png", action="store_true", help="also reward_hist.png, reward_by_version.png (matplotlib)")
    export.add_argument("--limit", type=int, default=None, help="only the newest N stored groups")
    return replay


def run(args: argparse.Namespace) -> int:
    """Handler for ``editrl replay ...``: 0 on success, 2 with a message on bad input."""
    try:
        if args.replay_command == "ls":
            rows = list_groups(args.path, args.sort, args.task_type, args.limit, args.desc)
            print(json.dumps(rows) if args.json else format_ls(rows))
        elif args.replay_command == "stats":
            stats = replay_stats(args.path)
            print(json.dumps(stats) if args.json else format_stats(stats))
        elif args.replay_command == "show":
            info = show_group(args.path, args.group_id, args.out)
            print(json.dumps(info) if args.json else format_show(info))
        else:
            from editrl.scripts.replay_html import export_html

            summary = export_html(args.path, args.html, png=args.png, limit=args.limit)
            print(f"wrote {summary['index']}: {summary['groups']} groups, {summary['images']} images")
            for plot in summary["plots"]:
                print(f"wrote {os.path.join(args.html, plot)}")
    except ReplayToolError as exc:
        print(f"editrl replay: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `editrl replay ls RUN | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # writing the --out / --html files
        print(f"editrl replay: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m editrl.scripts.replay ls RUN``: the same command without going through ``editrl``."""
    parser = argparse.ArgumentParser(prog="editrl")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["replay", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
