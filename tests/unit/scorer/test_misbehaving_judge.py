"""The vlm backend against a judge that misbehaves on demand (tests/faults/misbehaving_judge.py, a real HTTP server):
a > 2 MB reply, HTTP 500, a non-JSON body or a 5,000-digit score each give that group every edit unscored, with the
reason, in a result that fits the wire; a normal group in the same batch is scored. Once through the backend object,
once through a real ``editrl scorer`` process with this test as its broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import yaml
import zmq
from PIL import Image

from editrl.common import codec, wire
from editrl.common.config import load_config
from editrl.common.fit import FIT_META_BYTES
from editrl.common.images import to_png
from editrl.common.security import secure_server
from editrl.scorer.backend import make_backend
from editrl.scorer.worker import score_jobs

from ...faults.misbehaving_judge import MisbehavingJudge

SOURCE = to_png(Image.fromarray(np.full((16, 16, 3), 120, np.uint8)))
EDITS = [to_png(Image.fromarray(np.full((16, 16, 3), c, np.uint8))) for c in (60, 180)]
# marker → what every edit's reason must say
EXPECTED = {
    "#HUGE#": "judge reply too long: 2,500,",
    "#RAISE#": "engine returned no reply",
    "#GARBAGE#": "engine returned no reply",
    "#BIGNUM#": "SC: ",  # rejected by the parser (before issue 14 it raised ValueError out of the backend)
}


def _judge_options(base_url: str) -> dict[str, Any]:
    """The vlm backend's options for the misbehaving judge: no transport retry and one re-ask keep it fast."""
    engine = {"base_url": base_url, "model": "misbehaving", "max_retries": 0, "backoff_s": 0.0, "timeout_s": 30.0}
    return {"engine": "openai", "engine_options": engine, "max_reasks": 1}


def _jobs() -> list[wire.ScoreJob]:
    names = {"normal": "make it red", **{m.strip("#").lower(): f"make it red {m}" for m in EXPECTED}}
    return [
        wire.ScoreJob(f"job-{n}", f"group-{n}", text, "color_alter", SOURCE, list(EDITS)) for n, text in names.items()
    ]


def _check(results: dict[str, wire.ScoreResult]) -> None:
    assert results["job-normal"].scored == [True, True] and results["job-normal"].overall == [7.0, 7.0]
    for marker, reason in EXPECTED.items():
        result = results[f"job-{marker.strip('#').lower()}"]
        assert result.scored == [False, False] and result.overall == [None, None], marker
        assert all(reason in r and len(r) < 500 for r in result.reasoning), (marker, result.reasoning)
    for result in results.values():
        frames = codec.encode(result)
        assert len(frames[0]) <= FIT_META_BYTES and codec.decode(frames) == result


def test_the_backend_object_against_the_misbehaving_judge():
    with MisbehavingJudge() as judge:
        backend = make_backend({"backend": "vlm", **_judge_options(judge.base_url)})
        results = score_jobs(backend, _jobs(), "scorer-0", structlog.get_logger())  # one batched backend call
    _check({r.job_id: r for r in results})
    # each spoiled SC question asked twice (one re-ask); the normal group and every PQ question once
    assert judge.counts == {"normal": 2 + 5 * 2, "#HUGE#": 4, "#RAISE#": 4, "#GARBAGE#": 4, "#BIGNUM#": 4}


def _topology(tmp_path: Path, endpoint: str, base_url: str) -> Path:
    topo = {
        "run": {"name": "judge", "dir": str(tmp_path / "run")},
        "broker": {"endpoint": endpoint},
        "policy": {"model": "unused"},  # a scorer reads only broker, scorers, security and timers
        "data": {"tasks": "unused.jsonl"},
        "scorers": {"backend": "vlm", "options": _judge_options(base_url), "batch": 4},
        "timers": {"heartbeat_interval_s": 0.2},
    }
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(topo))
    return path


def test_a_real_scorer_process_against_the_misbehaving_judge(tmp_path: Path):
    with MisbehavingJudge() as judge:
        config = _topology(tmp_path, f"ipc://{tmp_path}/broker.ipc", judge.base_url)
        security = load_config(config).security  # this test is the broker: it authenticates roles as the broker does
        security.validate("broker")
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        auth = secure_server(router, ctx, security)
        router.bind(f"ipc://{tmp_path}/broker.ipc")
        cmd = [sys.executable, "-m", "editrl.scorer.main", "--config", str(config), "--id", "0"]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            results: dict[str, wire.ScoreResult] = {}
            identity = None
            deadline = time.monotonic() + 60
            while len(results) < len(EXPECTED) + 1:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                assert remaining_ms > 0 and router.poll(remaining_ms), f"answered: {sorted(results)}"
                sender, *frames = router.recv_multipart()
                msg = codec.decode(frames)  # the broker's own strict decoding
                if isinstance(msg, wire.ScorerReady) and identity is None:
                    identity = sender
                    for job in _jobs():
                        router.send_multipart([identity, *codec.encode(job)])
                elif isinstance(msg, wire.ScoreResult):
                    assert msg.job_id not in results  # exactly one answer per job
                    results[msg.job_id] = msg
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            router.close()
            if auth is not None:
                auth.stop()
            ctx.term()
    _check(results)
    log_lines = (tmp_path / "run" / "logs" / "scorer-0.jsonl").read_text()
    assert '"event": "scorer_stopped"' in log_lines and '"jobs": 5' in log_lines


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
