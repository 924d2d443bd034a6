"""A real VLM judge in the running system: `editrl up` with the `vlm` backend on a tiny random Qwen2.5-VL.

A random-weight judge answers garbage, so every edit is unscored: each group must be requeued exactly once, then
dropped and counted -- never stored with a number, never trained on -- while the rest of the system keeps running.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from editrl.broker.store import ReplayStore

from .conftest import read_jsonl, write_topology


def test_random_vlm_judge_groups_are_requeued_once_then_dropped_and_counted(
    tmp_path, tiny_model_dir, quickstart_tasks, tiny_vlm_dir
):
    judge = {
        "engine": "transformers",
        "engine_options": {"model": str(tiny_vlm_dir), "max_new_tokens": 6, "batch_size": 8},
        "max_reasks": 1,
    }
    topo = write_topology(
        tmp_path, tiny_model_dir, quickstart_tasks,
        scorers={"backend": "vlm", "options": judge, "batch": 2}, data={"group_size": 4},
    )  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "editrl.scripts.cli", "up", str(topo)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = tmp_path / "run/logs/broker-0.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if log.exists() and log.read_text().count("group_dropped_unscorable") >= 3:
                break
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
            time.sleep(0.5)
        status = subprocess.run([sys.executable, "-m", "editrl.scripts.cli", "status", str(topo), "--json"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        counters = json.loads(status.stdout)["counters"]
        assert counters["dropped_unscorable"] >= 3 and counters["unscored_requeued"] >= counters["dropped_unscorable"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    events = read_jsonl(log)
    dropped = [e["group_id"] for e in events if e["event"] == "group_dropped_unscorable"]
    assert len(dropped) >= 3, "the random judge's groups were never dropped"
    requeued = [e["group_id"] for e in events if e["event"] == "score_requeued" and e["reason"] == "unscored"]
    for group_id in dropped:
        assert requeued.count(group_id) == 1, f"{group_id} was not requeued exactly once before the drop"
    store = ReplayStore(tmp_path / "run/replay.lmdb", capacity=10**6, readonly=True)
    counters = store.counters()
    assert counters["dropped_unscorable"] == len(set(dropped))
    assert counters["scored"] == 0  # no number was ever invented for garbage
    metrics = tmp_path / "run/metrics.jsonl"
    assert not metrics.exists() or not read_jsonl(metrics)  # nothing to train on
    scorer_log = read_jsonl(tmp_path / "run/logs/scorer-0.jsonl")
    assert not any(e["event"] == "process_crashed" for e in scorer_log)
