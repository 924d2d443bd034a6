"""Smoke test for bench/bench_weights.py: a --quick run (2 repeats) in a subprocess prints positive, parseable
ratios with their spread over the runs.

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
    cmd = [sys.executable, "-m", "bench.bench_weights", "--quick", "--repeats", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ratios = re.search(r"^RESULT file_ratio=([0-9.]+) stream_ratio=([0-9.]+) .* stream_ratio_range=([0-9.]+)\.\."
                       r"([0-9.]+) ", proc.stdout, re.M)  # fmt: skip
    lora = re.search(r"^RESULT lora_fraction=([0-9.]+)", proc.stdout, re.M)
    assert ratios and lora, proc.stdout[-2000:]
    file_ratio, stream_ratio, lora_fraction = float(ratios[1]), float(ratios[2]), float(lora[1])
    assert file_ratio > 0 and stream_ratio > 0 and 0 < lora_fraction < 1
    assert float(ratios[3]) <= stream_ratio <= float(ratios[4])
    res = json.loads(out.read_text())
    assert res["config"]["quick"] and res["config"]["actors"] == 1
    for name in ("raw", "file", "stream", "stream_lora"):
        assert res["median"][name]["seconds"] > 0 and len(res["runs"][name]) == 2, name
        assert res["seconds"][name]["min"] <= res["median"][name]["seconds"] <= res["seconds"][name]["max"], name
    for name in ("file", "stream"):  # each run's time over the same run's raw time
        per_run = [x["seconds"] / raw["seconds"] for x, raw in zip(res["runs"][name], res["runs"]["raw"], strict=True)]
        assert res["ratios"][name]["runs"] == per_run and res[f"{name}_ratio"] == res["ratios"][name]["median"]
    assert res["lora_bytes"] < res["full_bytes"]
