"""Smoke test for bench/bench_weights.py: a --quick run in a subprocess prints positive, parseable ratios.

Speed targets live in the bench's own output (and docs/WEIGHTS.md), never here: this only checks every path runs.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_bench_weights_quick(tmp_path):
    out = tmp_path / "weights.json"
    cmd = [sys.executable, "-m", "bench.bench_weights", "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ratios = re.search(r"^RESULT file_ratio=([0-9.]+) stream_ratio=([0-9.]+)", proc.stdout, re.M)
    lora = re.search(r"^RESULT lora_fraction=([0-9.]+)", proc.stdout, re.M)
    assert ratios and lora, proc.stdout[-2000:]
    file_ratio, stream_ratio, lora_fraction = float(ratios[1]), float(ratios[2]), float(lora[1])
    assert file_ratio > 0 and stream_ratio > 0 and 0 < lora_fraction < 1
    res = json.loads(out.read_text())
    assert res["config"]["quick"] and res["config"]["actors"] == 1
    for name in ("raw", "file", "stream", "stream_lora"):
        assert res["median"][name]["seconds"] > 0, name
    assert res["lora_bytes"] < res["full_bytes"]
