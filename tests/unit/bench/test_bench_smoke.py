"""Smoke test for bench/bench_broker.py: a tiny --quick run in a subprocess writes positive throughputs.

Speed targets live in the bench's own output, never here: this only checks that every path runs end to end.
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_bench_broker_quick_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench.bench_broker", "--quick", "--groups", "16", "--replay-records", "16",
           "--payload-kib", "16", "--repeats", "1", "--timeout", "30", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "RESULT e2e_ratio=" in proc.stdout and "RESULT replay_insert_ratio=" in proc.stdout
    res = json.loads(out.read_text())
    assert res["e2e"]["raw_mib_s"] > 0 and res["e2e"]["broker_mib_s"] > 0
    for key in ("raw_insert", "store_insert", "raw_sample", "store_take_ready", "store_mark_scored"):
        assert res["replay"][key]["records_s"] > 0, key
    for key in ("e2e_ratio", "replay_insert_ratio", "replay_sample_ratio"):
        assert res[key] > 0, key
    assert res["e2e"]["broker_runs"][0]["counters"]["consumed"] == 16
