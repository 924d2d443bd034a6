"""The reward-hacking alarm in the running system: `editrl up` with a held-out gold scorer (``scorers.gold``).

Two runs from the same editor, started once for the module:
- *hacked*: trained on the hackable ``legacy`` metric mapping (flat colours keep PQ 7.3) with the strict metric as
  gold. The training reward rises while gold falls: the learner must warn (``reward_hacking_suspected``, once), set
  ``reward/hacking_alarm`` in metrics.jsonl and TensorBoard, and ``editrl status`` must show it.
- *default*: trained on the default strict metric with the legacy mapping as gold: both move together, the alarm
  stays silent.

Both runs start from the tiny editor trained on a CPU (``trained_tiny_model_dir``: it already makes the intended
edits, so gold has something to lose) with the quickstart's sampler, on the 32-pixel quickstart tasks. Measured on
the hacked run (lr 3e-3): the legacy reward went 7.95 -> ~8.6 in 20 steps and stayed there while gold fell from
8.1 to 4-6; the alarm (window 8, min_rise 0.25, min_fall 1.0) turned on at step 34.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from editrl.broker.store import ReplayStore

from .conftest import read_jsonl, write_topology

EDITOR_FIXTURE = "trained_tiny_model_dir"  # the session fixture of the trained tiny editor (tests/conftest.py)
HACK_MAX_STEPS = 200  # the hacked run stops once the alarm is seen, at the latest after this many steps
DEFAULT_STEPS = 80
GOLD = {"share": 0.5, "window": 8, "min_rise": 0.25, "min_fall": 1.0}  # about 2 gold groups per step of 4
CLI = [sys.executable, "-m", "editrl.scripts.cli"]
SAMPLER = {"num_steps": 4, "noise_level": 0.7, "sde_window": 2}  # configs/quickstart.yaml's


@pytest.fixture(scope="module")
def editor_dir(request: pytest.FixtureRequest) -> Path:
    try:
        return request.getfixturevalue(EDITOR_FIXTURE)
    except pytest.FixtureLookupError:  # pragma: no cover - the fixture is in tests/conftest.py
        pytest.fail(f"no fixture {EDITOR_FIXTURE!r} (tests/conftest.py)")


def _alarm_seen(metrics: Path) -> bool:
    return metrics.exists() and any(row.get("reward/hacking_alarm") == 1.0 for row in _rows(metrics))


def _rows(metrics: Path) -> list[dict[str, Any]]:
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return rows


def _read_status_while_alarmed(run_dir: Path, topo: Path, out: dict[str, Any]) -> None:
    """Both status views of ONE moment: the learner is stopped (SIGSTOP) while they are read, so the alarm cannot
    clear between them (it may, a step later: it compares against any earlier window), and only if the latest step
    with gold still has the alarm on; otherwise nothing is read and the caller tries again after the next steps."""
    from editrl.scripts.status import latest_gold

    pid = int((run_dir / "pids" / "learner-0.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        gold = latest_gold(run_dir)
        if gold is None or gold["alarm"] is not True:
            return
        status = subprocess.run([*CLI, "status", str(topo), "--json"], capture_output=True, text=True, timeout=60)
        table = subprocess.run([*CLI, "status", str(topo), "--once"], capture_output=True, text=True, timeout=60)
        out["status"] = json.loads(status.stdout) if status.returncode == 0 else None
        out["table"] = table.stdout
    finally:
        os.kill(pid, signal.SIGCONT)


def _hacked_run(tmp: Path, editor: Path, tasks: Path) -> dict[str, Any]:
    """Run until the alarm shows in metrics.jsonl (or HACK_MAX_STEPS), read `editrl status` while it runs, stop."""
    scorers = {"options": {"mapping": "legacy"}, "gold": {"backend": "metric", **GOLD}}
    topo = write_topology(
        tmp, editor, tasks, scorers=scorers, policy={"sampler": SAMPLER}, learner={"max_steps": HACK_MAX_STEPS}
    )
    metrics = tmp / "run/metrics.jsonl"
    stdout_path, stderr_path = tmp / "up.out", tmp / "up.err"  # files, not pipes: nobody reads them while it runs
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        proc = subprocess.Popen([*CLI, "up", str(topo)], stdout=stdout, stderr=stderr, text=True)
    out: dict[str, Any] = {"run": tmp / "run", "topo": topo, "status": None, "table": ""}
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None and out["status"] is None:
            if _alarm_seen(metrics):
                _read_status_while_alarmed(tmp / "run", topo, out)
            time.sleep(1.0)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    out["stdout"], out["stderr"], out["returncode"] = stdout_path.read_text(), stderr_path.read_text(), proc.returncode
    return out


def _default_run(tmp: Path, editor: Path, tasks: Path) -> dict[str, Any]:
    scorers = {"gold": {"backend": "metric", "options": {"mapping": "legacy"}, **GOLD}}
    topo = write_topology(tmp, editor, tasks, scorers=scorers, policy={"sampler": SAMPLER}, learner={"lr": 5e-4})
    proc = subprocess.run([*CLI, "up", str(topo), "--max-steps", str(DEFAULT_STEPS)], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    return {"run": tmp / "run", "topo": topo, "stdout": proc.stdout, "stderr": proc.stderr,
            "returncode": proc.returncode}  # fmt: skip


@pytest.fixture(scope="module")
def runs(editor_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from editrl.common.tasks import make_quickstart_tasks

    tasks = make_quickstart_tasks(tmp_path_factory.mktemp("tasks32"), n_tasks=16, size=32, seed=0)
    return {
        "hacked": _hacked_run(tmp_path_factory.mktemp("hacked"), editor_dir, tasks),
        "default": _default_run(tmp_path_factory.mktemp("default"), editor_dir, tasks),
    }


def _gold_rows_are_whole(rows: list[dict[str, Any]]) -> None:
    """A step with gold has all four keys; a step without has none (never a 0 standing in for "no gold")."""
    keys = ("reward/gold", "reward/gap", "reward/gold_groups", "reward/hacking_alarm")
    for row in rows:
        assert all(k in row for k in keys) or not any(k in row for k in keys), row
    assert any("reward/gold" in row for row in rows)


def _gold_follows_the_hash(run: Path, share: float) -> None:
    """Every scored group in the replay has gold sub-scores exactly when its id is selected (stable across the
    scorer process and the test)."""
    from editrl.scorer.gold import gold_selected

    store = ReplayStore(run / "replay.lmdb", capacity=10**6, readonly=True)
    scored = [(gid, st) for gid, st in store.iter_status() if st.get("scores", {}).get("sub_scores")]
    store.close()
    assert scored
    for gid, st in scored:
        has_gold = any("gold" in subs for subs in st["scores"]["sub_scores"])
        assert has_gold == gold_selected(gid, share), gid


def test_a_hackable_reward_trips_the_alarm_once_and_status_shows_it(runs):
    r = runs["hacked"]
    assert r["returncode"] == 0, r["stderr"][-3000:]
    rows = read_jsonl(r["run"] / "metrics.jsonl")
    _gold_rows_are_whole(rows)
    assert any(row.get("reward/hacking_alarm") == 1.0 for row in rows), "the alarm never fired"
    events = read_jsonl(r["run"] / "logs/learner-0.jsonl")
    suspected = [e for e in events if e["event"] == "reward_hacking_suspected"]
    assert len(suspected) >= 1 and suspected[0]["level"] == "warning"
    first = suspected[0]
    assert first["train_rise"] > GOLD["min_rise"] and first["gold_fall"] > GOLD["min_fall"]
    assert first["reference_steps"][1] < first["recent_steps"][0]
    alarm_steps = [row["step"] for row in rows if row.get("reward/hacking_alarm") == 1.0]
    assert alarm_steps[0] == first["step"]  # the warning is logged on the step the alarm turns on, not every step
    assert len(suspected) <= 1 + sum(e["event"] == "reward_hacking_cleared" for e in events)
    assert "reward hacking suspected at step" in r["stdout"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(r["run"] / "tb"))
    tb.Reload()
    assert {"reward/gold", "reward/gap", "reward/hacking_alarm"} <= set(tb.Tags()["scalars"])
    assert r["status"] is not None and r["status"]["gold"]["alarm"] is True
    assert any(line.startswith("gold:") and "SUSPECTED" in line for line in r["table"].splitlines()), r["table"]
    scorer = read_jsonl(r["run"] / "logs/scorer-0.jsonl")
    assert not [e for e in scorer if e["event"] == "gold_failed"]
    _gold_follows_the_hash(r["run"], GOLD["share"])


def test_the_default_metric_with_a_held_out_check_stays_silent(runs):
    r = runs["default"]
    assert r["returncode"] == 0, r["stderr"][-3000:]
    rows = read_jsonl(r["run"] / "metrics.jsonl")
    assert len(rows) == DEFAULT_STEPS
    _gold_rows_are_whole(rows)
    assert all(row["reward/hacking_alarm"] == 0.0 for row in rows if "reward/hacking_alarm" in row)
    events = read_jsonl(r["run"] / "logs/learner-0.jsonl")
    assert not [e for e in events if e["event"] == "reward_hacking_suspected"]
    assert "reward hacking suspected" not in r["stdout"]
    _gold_follows_the_hash(r["run"], GOLD["share"])
