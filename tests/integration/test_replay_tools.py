"""`editrl replay ls|stats|show|export` on a REAL replay written by `editrl up` (3 learner steps, quickstart topology).

Every command's output is checked against what the store itself holds (read here with ``ReplayStore(readonly=True)``):
counts, states, rewards, sub-scores, reasoning, image bytes; and the commands are run while a broker holds the LMDB.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from editrl.broker.store import ReplayStore
from editrl.common import codec
from editrl.scripts.replay import STATES

from .conftest import write_topology

EDITRL = [sys.executable, "-m", "editrl.scripts.cli"]
REPLAY_MODULE = [sys.executable, "-m", "editrl.scripts.replay"]
STEPS = 3
CAPACITY = 10  # < the >= STEPS * 4 groups the run ingests: the oldest (consumed) records are evicted, statuses kept
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class ReplayRun:
    topo: Path
    run_dir: Path
    lmdb_dir: Path
    statuses: dict[str, dict[str, Any]]  # group_id → status, as the store holds it after `editrl up`
    counters: dict[str, int]
    records: dict[str, bytes]  # group_id → stored record (evicted groups absent)


def build_real_replay(request: pytest.FixtureRequest, tmp_path_factory, model_dir: Path, tasks: Path) -> ReplayRun:
    """Run `editrl up` for STEPS learner steps once per session (shared with the browser test) and read the store."""
    cached = getattr(request.session, "_editrl_replay_run", None)
    if cached is not None:
        return cached
    tmp = tmp_path_factory.mktemp("replay_tools")
    topo = write_topology(tmp, model_dir, tasks, broker={"replay_capacity": CAPACITY})
    proc = subprocess.run([*EDITRL, "up", str(topo), "--max-steps", str(STEPS)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp / "run"
    store = ReplayStore(run_dir / "replay.lmdb", capacity=10**6, readonly=True)
    try:
        statuses = dict(store.iter_status())
        counters = store.counters()
        records = {gid: rec for gid in statuses if (rec := store.get_record(gid)) is not None}
    finally:
        store.close()
    assert len(statuses) >= STEPS * 4 and counters["consumed"] >= STEPS * 4
    assert len(records) == CAPACITY and counters["evicted"] == len(statuses) - CAPACITY > 0
    replay = ReplayRun(topo, run_dir, run_dir / "replay.lmdb", statuses, counters, records)
    request.session._editrl_replay_run = replay
    return replay


@pytest.fixture(scope="module")
def replay_run(request, tmp_path_factory, tiny_model_dir, quickstart_tasks) -> ReplayRun:
    return build_real_replay(request, tmp_path_factory, tiny_model_dir, quickstart_tasks)


@pytest.fixture(scope="module")
def replay_cmd() -> list[str]:
    """`editrl replay` once cli.py wires it in; until then the module's own entry point (same parser, same handler)."""
    probe = subprocess.run([*EDITRL, "replay", "--help"], capture_output=True, text=True, timeout=60)
    return [*EDITRL, "replay"] if probe.returncode == 0 else REPLAY_MODULE


def replay(cmd: list[str], *args: Any, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def replay_json(cmd: list[str], *args: Any) -> Any:
    return json.loads(replay(cmd, *args, "--json").stdout)


def scored(run: ReplayRun) -> dict[str, dict[str, Any]]:
    return {gid: st for gid, st in run.statuses.items() if st.get("rewards")}


# -- ls -----------------------------------------------------------------------------------------------------------


def test_ls_lists_every_group_with_the_store_values(replay_run, replay_cmd):
    rows = replay_json(replay_cmd, "ls", replay_run.run_dir)
    assert len(rows) == len(replay_run.statuses) == replay_run.counters["ingested"]
    assert {r["group_id"] for r in rows} == set(replay_run.statuses)
    assert [r["seq"] for r in rows] == sorted(st["seq"] for st in replay_run.statuses.values())  # default: time
    for row in rows:
        status = replay_run.statuses[row["group_id"]]
        for key in ("version", "task_type", "instruction", "state", "seq"):
            assert row[key] == status[key], key
        assert row["stored"] == (row["group_id"] in replay_run.records)
        assert row["evicted"] == (not row["stored"]) == bool(status.get("evicted"))
        if status.get("rewards"):
            assert row["reward_mean"] == pytest.approx(statistics.fmean(status["rewards"]), abs=1e-12)
            assert (row["reward_min"], row["reward_max"]) == (min(status["rewards"]), max(status["rewards"]))
        else:
            assert row["reward_mean"] is None
    # The text form: a header, one line per group (its id and instruction), a count; same via the LMDB path itself.
    lines = replay(replay_cmd, "ls", replay_run.lmdb_dir).stdout.splitlines()
    assert len(lines) == len(rows) + 2 and lines[-1] == f"{len(rows)} groups"
    for line, row in zip(lines[1:-1], rows, strict=True):
        assert line.startswith(row["group_id"]) and line.endswith(row["instruction"]) and row["state"] in line


def test_ls_sorts_filters_and_limits(replay_run, replay_cmd):
    path = replay_run.run_dir
    up = [r["reward_mean"] for r in replay_json(replay_cmd, "ls", path, "--sort", "reward")]
    down = [r["reward_mean"] for r in replay_json(replay_cmd, "ls", path, "--sort", "reward", "--desc")]
    assert len(up) == len(replay_run.statuses) and len(set(up)) > 3
    n_scored = len(scored(replay_run))
    assert up[:n_scored] == sorted(up[:n_scored]) and down[:n_scored] == sorted(down[:n_scored], reverse=True)
    assert all(r is None for r in up[n_scored:] + down[n_scored:])  # unscored groups last either way
    assert up != down
    versions = [r["version"] for r in replay_json(replay_cmd, "ls", path, "--sort", "version")]
    assert versions == sorted(versions) and len(set(versions)) > 1
    assert [r["seq"] for r in replay_json(replay_cmd, "ls", path, "--sort", "time", "--desc")] == sorted(
        (st["seq"] for st in replay_run.statuses.values()), reverse=True
    )
    by_type = Counter(st["task_type"] for st in replay_run.statuses.values())
    assert len(by_type) > 1
    for task_type, n in by_type.items():
        rows = replay_json(replay_cmd, "ls", path, "--task-type", task_type)
        assert len(rows) == n and {r["task_type"] for r in rows} == {task_type}
    assert replay_json(replay_cmd, "ls", path, "--task-type", "no_such_type") == []
    top3 = replay_json(replay_cmd, "ls", path, "--sort", "reward", "--desc", "--limit", "3")
    assert [r["reward_mean"] for r in top3] == down[:3]


# -- stats --------------------------------------------------------------------------------------------------------


def test_stats_match_the_store_counters(replay_run, replay_cmd):
    stats = replay_json(replay_cmd, "stats", replay_run.run_dir)
    c, statuses = replay_run.counters, replay_run.statuses
    assert stats["counters"] == c
    assert stats["groups"] == len(statuses) == c["ingested"]
    assert stats["states"] == {**dict.fromkeys(STATES, 0), **Counter(st["state"] for st in statuses.values())}
    states = stats["states"]
    # The store's bookkeeping identities, as one transaction saw them.
    assert states["consumed"] == c["consumed"] > 0 and states["stale"] == c["dropped_stale"]
    assert states["unscorable"] == c["dropped_unscorable"] and states["evicted"] == c["evicted_unconsumed"]
    assert states["ready"] == c["scored"] - c["consumed"] - c["dropped_stale"] - c["evicted_unconsumed"]
    assert states["pending"] == c["ingested"] - c["scored"] - c["dropped_unscorable"]
    assert stats["drops"] == {"stale": c["dropped_stale"], "unscorable": c["dropped_unscorable"],
                              "quarantined": c["quarantined"], "duplicates": c["duplicate_groups"]}  # fmt: skip
    assert stats["evictions"] == {"evicted": c["evicted"], "evicted_unconsumed": c["evicted_unconsumed"]}
    assert stats["records_stored"] == len(replay_run.records) == c["ingested"] - c["evicted"] == CAPACITY
    assert stats["evicted_records"] == c["evicted"] > 0
    # Rewards: totals, and per-version / per-task-type summaries that add up and equal a recomputation.
    edits = [r for st in scored(replay_run).values() for r in st["rewards"]]
    assert stats["rewards"]["n"] == len(edits) and stats["rewards"]["groups"] == len(scored(replay_run))
    assert stats["rewards"]["mean"] == pytest.approx(statistics.fmean(edits))
    assert stats["rewards"]["std"] == pytest.approx(statistics.pstdev(edits))
    for key, field in (("by_version", "version"), ("by_task_type", "task_type")):
        parts = stats[key]
        assert sum(p["n"] for p in parts) == len(edits) and sum(p["groups"] for p in parts) == len(scored(replay_run))
        assert math.fsum(p["n"] * p["mean"] for p in parts) == pytest.approx(math.fsum(edits))
        for p in parts:
            mine = [r for st in scored(replay_run).values() if st[field] == p[field] for r in st["rewards"]]
            assert p["n"] == len(mine) and p["mean"] == pytest.approx(statistics.fmean(mine))
            assert (p["min"], p["max"]) == (min(mine), max(mine))
            assert p["std"] == pytest.approx(statistics.pstdev(mine))
    assert [p["version"] for p in stats["by_version"]] == sorted({st["version"] for st in scored(replay_run).values()})
    # Sizes: the records' bytes, the file on disk, the map size the broker recorded.
    sizes = [len(r) for r in replay_run.records.values()]
    assert stats["record_bytes"]["total"] == sum(sizes) and stats["record_bytes"]["max"] == max(sizes)
    storage = stats["storage"]
    assert storage["disk_bytes"] >= (replay_run.lmdb_dir / "data.mdb").stat().st_size >= storage["used_bytes"]
    assert storage["used_bytes"] > sum(sizes) and storage["map_size_bytes"] >= storage["used_bytes"]
    text = replay(replay_cmd, "stats", replay_run.lmdb_dir).stdout
    assert "states      " + "  ".join(f"{k} {v}" for k, v in states.items()) in text
    assert f"rewards     groups {len(scored(replay_run))}  edits {len(edits)}" in text


# -- show ---------------------------------------------------------------------------------------------------------


def test_show_prints_the_instruction_rewards_subscores_and_reasoning(replay_run, replay_cmd, tmp_path):
    gid, status = next((g, st) for g, st in scored(replay_run).items() if g in replay_run.records)
    info = replay_json(replay_cmd, "show", gid, replay_run.run_dir)
    assert info["instruction"] == status["instruction"] and info["state"] == status["state"]
    assert [e["reward"] for e in info["edits"]] == status["rewards"]
    assert [e["sub_scores"] for e in info["edits"]] == status["scores"]["sub_scores"]
    assert [e["reasoning"] for e in info["edits"]] == status["scores"]["reasoning"]
    assert all(e["sub_scores"] and e["reasoning"] for e in info["edits"])  # the metric judge fills both
    group = codec.decode(codec.decode_record(replay_run.records[gid]))
    assert len(info["edits"]) == len(group.edit_pngs) == status["group_size"]
    assert info["family"] == group.family and info["source"]["bytes"] == len(group.source_png)

    text = replay(replay_cmd, "show", gid, replay_run.lmdb_dir, "--out", tmp_path / "imgs").stdout
    assert f"instruction: {status['instruction']}" in text
    for i, (reward, reasoning) in enumerate(zip(status["rewards"], status["scores"]["reasoning"], strict=True)):
        assert f"edit {i}: reward {reward:.4f}" in text and reasoning in text
    assert (tmp_path / "imgs/source.png").read_bytes() == group.source_png
    for i, png in enumerate(group.edit_pngs):
        assert (tmp_path / f"imgs/edit_{i}.png").read_bytes() == png


def test_show_of_an_evicted_group_keeps_its_scores_but_has_no_images(replay_run, replay_cmd, tmp_path):
    gid, status = next((g, st) for g, st in replay_run.statuses.items() if g not in replay_run.records)
    info = replay_json(replay_cmd, "show", gid, replay_run.run_dir)
    assert info["evicted"] and not info["stored"] and info["source"] is None
    assert [e["reward"] for e in info["edits"]] == status["rewards"]
    assert [e["reasoning"] for e in info["edits"]] == status["scores"]["reasoning"]
    assert "(evicted: images gone)" in replay(replay_cmd, "show", gid, replay_run.run_dir).stdout
    proc = replay(replay_cmd, "show", gid, replay_run.run_dir, "--out", tmp_path / "imgs", expect=2)
    assert f"group {gid} was evicted" in proc.stderr and not (tmp_path / "imgs").exists()


def test_bad_input_exits_2_with_a_message(replay_run, replay_cmd, tmp_path):
    import lmdb

    proc = replay(replay_cmd, "stats", tmp_path / "missing", expect=2)
    assert "no such file or directory" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain/notes.txt").write_text("not a replay")
    proc = replay(replay_cmd, "ls", tmp_path / "plain", expect=2)
    assert "not an LMDB directory" in proc.stderr and "Traceback" not in proc.stderr
    foreign = lmdb.open(str(tmp_path / "foreign"), map_size=1 << 20)  # an LMDB, but not an editrl replay
    with foreign.begin(write=True) as txn:
        txn.put(b"k", b"v")
    foreign.close()
    proc = replay(replay_cmd, "stats", tmp_path / "foreign", expect=2)
    assert "not an editrl replay LMDB" in proc.stderr and "Traceback" not in proc.stderr
    proc = replay(replay_cmd, "show", "no-such-group", replay_run.run_dir, expect=2)
    assert "unknown group id 'no-such-group'" in proc.stderr and "Traceback" not in proc.stderr


# -- export -------------------------------------------------------------------------------------------------------


class PageParser(HTMLParser):
    """The viewer's groups in document order: their data attributes, hidden flag and images (edit titles too)."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[dict[str, Any]] = []
        self.other_imgs: list[str] = []
        self.external: list[str] = []  # <script src>, <link>: a self-contained page has none
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "section" and "group" in (a.get("class") or "").split():
            self.groups.append({**a, "imgs": [], "titles": [], "edit_rewards": [], "hidden": "hidden" in a})
        elif tag == "figure" and "edit" in (a.get("class") or "").split():
            self.groups[-1]["titles"].append(a.get("title"))
            self.groups[-1]["edit_rewards"].append(a.get("data-reward"))
        elif tag == "img":
            (self.groups[-1]["imgs"] if self.groups else self.other_imgs).append(a["src"])
        elif (tag == "script" and a.get("src")) or tag == "link":
            self.external.append(tag)


def parse_page(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    return parser


def test_export_writes_a_self_contained_viewer_of_every_stored_group(replay_run, replay_cmd, tmp_path):
    out = tmp_path / "viewer"
    proc = replay(replay_cmd, "export", replay_run.run_dir, "--html", out, "--png")
    text = (out / "index.html").read_text()
    page = parse_page(text)
    n_groups = len(replay_run.records)
    n_images = sum(1 + replay_run.statuses[g]["group_size"] for g in replay_run.records)
    assert f"{n_groups} groups, {n_images} images" in proc.stdout
    assert len(page.groups) == n_groups and sum(len(g["imgs"]) for g in page.groups) == n_images
    assert not page.external and "http://" not in text and "https://" not in text
    for src in [s for g in page.groups for s in g["imgs"]] + page.other_imgs:
        assert (out / src).is_file() and (out / src).read_bytes()[:8] == PNG_MAGIC, src
    for g in page.groups:  # data attributes and per-edit rewards/reasoning equal the store's
        status = replay_run.statuses[g["data-group-id"]]
        assert int(g["data-version"]) == status["version"] and g["data-task-type"] == status["task_type"]
        assert float(g["data-reward"]) == pytest.approx(statistics.fmean(status["rewards"]), abs=1e-6)
        assert [float(r) for r in g["edit_rewards"]] == pytest.approx(status["rewards"], abs=1e-6)
        assert g["titles"] == status["scores"]["reasoning"]
    group = page.groups[0]
    record = codec.decode(codec.decode_record(replay_run.records[group["data-group-id"]]))
    assert (out / group["imgs"][0]).read_bytes() == record.source_png  # the source first, then the edits in order
    assert [(out / s).read_bytes() for s in group["imgs"][1:]] == record.edit_pngs

    from PIL import Image

    for plot in ("reward_hist.png", "reward_by_version.png"):
        assert plot in page.other_imgs
        with Image.open(out / plot) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100

    replay(replay_cmd, "export", replay_run.lmdb_dir, "--html", tmp_path / "five", "--limit", 5)
    limited = parse_page((tmp_path / "five/index.html").read_text())
    newest = sorted(replay_run.records, key=lambda g: replay_run.statuses[g]["seq"])[-5:]
    assert [g["data-group-id"] for g in limited.groups] == newest and not limited.other_imgs


# -- concurrent with the broker -----------------------------------------------------------------------------------


def test_commands_read_while_the_broker_holds_the_lmdb(replay_run, replay_cmd):
    log = replay_run.run_dir / "logs/broker-0.jsonl"
    starts_before = log.read_text().count('"broker_started"')
    broker = subprocess.Popen([*EDITRL, "broker", "--config", str(replay_run.topo)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count('"broker_started"') == starts_before and time.monotonic() < deadline:
            assert broker.poll() is None, f"broker exited with {broker.returncode}"
            time.sleep(0.2)
        maps = Path(f"/proc/{broker.pid}/maps").read_text()
        assert str(replay_run.lmdb_dir / "data.mdb") in maps  # the broker has the environment open (mmapped)
        stats = replay_json(replay_cmd, "stats", replay_run.run_dir)
        rows = replay_json(replay_cmd, "ls", replay_run.run_dir)
        info = replay_json(replay_cmd, "show", rows[-1]["group_id"], replay_run.run_dir)
        assert broker.poll() is None, "the broker died while the replay was being read"
    finally:
        broker.terminate()
        try:
            broker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(timeout=30)
    assert stats["groups"] == len(rows) == len(replay_run.statuses)
    assert stats["states"] == {
        **dict.fromkeys(STATES, 0),
        **Counter(st["state"] for st in replay_run.statuses.values()),
    }
    assert info["edits"] and info["instruction"] == replay_run.statuses[rows[-1]["group_id"]]["instruction"]
    assert broker.returncode == 0  # stopped cleanly by SIGTERM: the readers did not disturb it
