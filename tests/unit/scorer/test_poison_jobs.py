"""Issue 14, scorer side: a scorer answers every job exactly once, and every answer fits the wire.

A poisoned group (a 200,000-character instruction, a backend that raises on it, an undecodable job) costs only that
group's scores: it comes back all unscored with the reason, never silent; its neighbours in a batch are still scored;
a reply too large for the wire is cut with a marker, its scores untouched.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from typing import Any

import msgpack
import numpy as np
import structlog
import zmq
from PIL import Image
from structlog.testing import capture_logs

from editrl.common import codec, wire
from editrl.common.config import TopologyConfig
from editrl.common.fit import FIT_META_BYTES, fit_score_result, meta_bytes, truncation_marker
from editrl.common.images import to_png
from editrl.scorer.backend import Score
from editrl.scorer.gold import GoldScorer
from editrl.scorer.metric import MetricBackend
from editrl.scorer.worker import _sendable, run_worker, score_jobs

POISON = "#POISON#"
LOG = structlog.get_logger()


def _png(rgb: tuple[int, int, int], noise: int) -> bytes:
    rng = np.random.default_rng(noise)
    base = np.zeros((24, 24, 3), np.int64) + np.array(rgb)
    return to_png(Image.fromarray(np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)))


SOURCE = _png((120, 120, 120), 1)
EDITS = [_png((200, 60, 60), 2), _png((120, 120, 120), 3), _png((40, 40, 40), 4)]


def _job(name: str, instruction: str) -> wire.ScoreJob:
    return wire.ScoreJob(f"job-{name}", f"group-{name}", instruction, "color_alter", SOURCE, list(EDITS))


class RaisesOnPoison:
    """The real metric backend, except that a group whose instruction holds POISON raises, alone or in a batch
    (as a batched judge call fails as a whole)."""

    name = "raises_on_poison"

    def __init__(self) -> None:
        self.metric = MetricBackend()
        self.calls: list[list[str]] = []

    def score(self, request):
        self.calls.append([request.group_id])
        return self._score(request)

    def score_many(self, requests):
        self.calls.append([r.group_id for r in requests])
        return [self._score(r) for r in requests]

    def _score(self, request):
        if POISON in request.instruction:
            raise ZeroDivisionError("poisoned group " + "!" * 100_000)
        return self.metric.score(request)


def _assert_unscored(result: wire.ScoreResult, *needles: str) -> None:
    assert result.scored == [False] * len(EDITS) and result.overall == [None] * len(EDITS)
    for reason in result.reasoning:
        assert all(needle in reason for needle in needles), reason
        assert len(reason) < 400, len(reason)


def test_a_200k_instruction_through_the_metric_backend_fits_the_wire_with_a_marker():
    instruction = "z" * 200_000  # no colour or tone word: every edit unscored, the instruction quoted in the reason
    [result] = score_jobs(MetricBackend(), [_job("long", instruction)], "scorer-0", LOG)
    _assert_unscored(result, "names no colour", truncation_marker(200_000 - 200))
    frames = codec.encode(result)
    assert len(frames[0]) <= FIT_META_BYTES < wire.MAX_META_BYTES
    assert codec.decode(frames) == result
    # a long instruction that does name a target is still scored
    [result] = score_jobs(MetricBackend(), [_job("red", "make it red " + instruction)], "scorer-0", LOG)
    assert all(result.scored) and all(0.0 < o <= 10.0 for o in result.overall)


def test_a_3mb_reasoning_is_cut_with_a_marker_and_the_scores_are_untouched():
    reasoning = ["a" * 3_000_000, "short and kept", "é" * 1_000_000]  # 2 MB of two-byte characters
    subs = [{"SC": 7.5}, {"PQ": 1.0}, {}]
    big = wire.ScoreResult("job-1", "group-1", "scorer-0", [True, True, False], [7.5, 2.25, None], subs, reasoning)
    assert meta_bytes(big) > wire.MAX_META_BYTES  # the broker would reject it: the job would never complete
    fitted = fit_score_result(big)
    assert meta_bytes(fitted) <= FIT_META_BYTES
    assert (fitted.scored, fitted.overall, fitted.sub_scores) == (big.scored, big.overall, big.sub_scores)
    assert fitted.reasoning[1] == "short and kept"
    assert fitted.reasoning[0].startswith("aaaa") and "…[truncated " in fitted.reasoning[0]
    assert fitted.reasoning[2].startswith("éééé") and "…[truncated " in fitted.reasoning[2]
    kept = fitted.reasoning[0].index("…")
    assert fitted.reasoning[0].endswith(truncation_marker(3_000_000 - kept))  # the count of what was cut
    assert codec.decode(codec.encode(fitted)) == fitted
    assert fit_score_result(fitted) is fitted  # a result that fits is returned as it is
    check = wire.CheckResult("req-1", "group-1", "scorer-0", big.scored, big.overall, big.sub_scores, reasoning)
    assert meta_bytes(fit_score_result(check)) <= FIT_META_BYTES  # the CheckResult shape too


def test_sub_scores_too_large_for_the_wire_lose_entries_but_never_the_gold_key_or_the_scores():
    subs = {f"key-{i:06d}-" + "k" * 200: float(i) for i in range(4000)}  # ~850 KB of keys per edit
    big = wire.ScoreResult(
        "job-1", "group-1", "scorer-0", [True, True], [5.0, 6.0], [{**subs, wire.GOLD_SUB_SCORE: 4.0}, dict(subs)],
        ["why", "why not"],
    )  # fmt: skip
    fitted = fit_score_result(big)
    assert meta_bytes(fitted) <= FIT_META_BYTES and fitted.overall == [5.0, 6.0] and fitted.scored == [True, True]
    assert fitted.sub_scores[0][wire.GOLD_SUB_SCORE] == 4.0 and 0 < len(fitted.sub_scores[1]) < len(subs)
    assert all(set(fitted.sub_scores[i]) <= set(big.sub_scores[i]) for i in range(2))
    assert "sub-scores dropped]" in fitted.reasoning[1]


def test_a_raising_group_in_a_batch_is_unscored_and_its_neighbours_are_scored_one_by_one():
    backend, counts = RaisesOnPoison(), Counter()
    jobs = [_job("a", "make it red"), _job("p", "make it red " + POISON), _job("b", "make it darker")]
    with capture_logs() as logs:
        results = score_jobs(backend, jobs, "scorer-0", LOG, counts=counts)
    assert backend.calls == [["group-a", "group-p", "group-b"], ["group-a"], ["group-p"], ["group-b"]]
    assert [r.job_id for r in results] == ["job-a", "job-p", "job-b"]
    for result, job in zip(results, jobs, strict=True):
        if job is jobs[1]:
            _assert_unscored(result, "backend error: ZeroDivisionError: poisoned group", "…[truncated ")
        else:
            assert result == score_jobs(MetricBackend(), [job], "scorer-0", LOG)[0]  # as if never batched with it
            assert all(result.scored)
    assert counts == {"batch_failures": 1, "jobs_unscored": 1}
    unscored = [e for e in logs if e["event"] == "job_unscored"]
    assert [(e["job_id"], e["group_id"]) for e in unscored] == [("job-p", "group-p")]  # logged once, with its ids


class Unusable:
    """Per group, by instruction: the wrong number of scores, things that are not Scores, or odd numbers."""

    name = "unusable"

    def score(self, request):
        n = len(request.edits)
        if request.instruction == "count":
            return [Score(True, 5.0)] * (n - 1)
        if request.instruction == "junk":
            return ["7"] * n
        if request.instruction == "none":
            return None
        subs = {"SC": np.float32(6.0), "nan": math.nan, "word": "high", "big": 10**400}
        return [Score(True, np.float32(6.5), dict(subs), "ok"), Score(True, math.inf), Score(True, 3.0, {}, "\ud800")]


def test_unusable_backend_output_is_unscored_per_group_or_edit_and_every_result_decodes():
    jobs = [_job("count", "count"), _job("junk", "junk"), _job("none", "none"), _job("odd", "odd")]
    count, junk, none, odd = score_jobs(Unusable(), jobs, "scorer-0", LOG)
    _assert_unscored(count, "backend returned 2 scores for 3 edits")
    _assert_unscored(junk, "unusable score: AttributeError")
    _assert_unscored(none, "backend returned NoneType for 3 edits")
    assert odd.scored == [True, False, True] and odd.overall == [6.5, None, 3.0]
    assert odd.sub_scores[0] == {"SC": 6.0} and "3 sub-scores dropped" in odd.reasoning[0]
    assert "non-finite overall" in odd.reasoning[1] and odd.reasoning[2] == "?"  # a lone surrogate cannot be sent
    for result in (count, junk, none, odd):
        assert codec.decode(codec.encode(result)) == result


def test_a_reply_that_cannot_be_encoded_becomes_all_unscored():
    job, counts = _job("bad", "make it red"), Counter()
    bad = wire.ScoreResult(job.job_id, job.group_id, "scorer-0", [True] * 3, [math.nan, 1.0, 2.0], [{}] * 3, [""] * 3)
    sent = _sendable(bad, job, LOG, counts)
    _assert_unscored(sent, "reply could not be encoded: WireError: non_finite")
    assert counts == {"jobs_unscored": 1}


class ReturnsJunk:
    name = "returns_junk"

    def score(self, request):
        return 42  # not a list: GoldScorer.attach raises TypeError on it


def test_a_gold_backend_that_breaks_attach_costs_only_gold():
    gold = GoldScorer(ReturnsJunk(), 1.0, LOG)
    with capture_logs() as logs:
        [result] = score_jobs(MetricBackend(), [_job("a", "make it red")], "scorer-0", LOG, gold)
    assert all(result.scored) and not any(wire.GOLD_SUB_SCORE in s for s in result.sub_scores)
    assert gold.failures == 1 and [e["error"][:9] for e in logs if e["event"] == "gold_failed"] == ["TypeError"]


# ------------------------------------------------------------------------------------------------ the real loop


def _receive(router: zmq.Socket, want: type, n: int, timeout_s: float = 20.0) -> list[tuple[bytes, Any]]:
    """The next ``n`` messages of type ``want`` (others, e.g. READY re-announcements, are skipped)."""
    got: list[tuple[bytes, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        assert router.poll(max(0, int((deadline - time.monotonic()) * 1000))), f"{len(got)}/{n} {want.__name__}"
        identity, *frames = router.recv_multipart()
        msg = codec.decode(frames)
        if isinstance(msg, want):
            assert len(frames[0]) <= FIT_META_BYTES if want is wire.ScoreResult else True
            got.append((identity, msg))
    return got


def _with_unknown_field(job: wire.ScoreJob) -> list[bytes]:
    """``job`` as a newer broker might send it: with a field this scorer does not know (strict decoding rejects it)."""
    frames = [bytes(f) for f in codec.encode(job)]
    meta = msgpack.unpackb(frames[0], raw=False)
    meta["fields"]["priority"] = 1
    return [msgpack.packb(meta, use_bin_type=True), *frames[1:]]


def test_the_worker_loop_answers_a_raising_job_scores_the_others_and_keeps_serving():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    cfg = TopologyConfig()
    cfg.broker.endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    cfg.scorers.batch, cfg.timers.heartbeat_interval_s = 3, 0.1
    stop, exit_code = threading.Event(), []
    backend = RaisesOnPoison()
    worker = threading.Thread(target=lambda: exit_code.append(run_worker(cfg, 7, backend, LOG, stop.is_set)))
    try:
        with capture_logs() as logs:
            worker.start()
            [(identity, _)] = _receive(router, wire.ScorerReady, 1)
            jobs = [_job("a", "make it red"), _job("p", f"make it red {POISON}"), _job("b", "make it darker")]
            for job in jobs:
                router.send_multipart([identity, *codec.encode(job)])
            results = {msg.job_id: msg for _, msg in _receive(router, wire.ScoreResult, 3)}
            router.send_multipart([identity, *_with_unknown_field(_job("u", "make it red"))])
            router.send_multipart([identity, *codec.encode(_job("c", "make it blue"))])
            results.update({msg.job_id: msg for _, msg in _receive(router, wire.ScoreResult, 2)})
            stop.set()
            worker.join(timeout=10)
    finally:
        stop.set()
        router.close()
        ctx.term()
    assert exit_code == [0]
    assert sorted(results) == ["job-a", "job-b", "job-c", "job-p", "job-u"]  # every job answered exactly once
    assert all(results[j].scored == [True] * 3 and results[j].worker_id == "scorer-7" for j in ("job-a", "job-b"))
    _assert_unscored(results["job-p"], "ZeroDivisionError")
    _assert_unscored(results["job-u"], "undecodable job: WireError: unknown_field")
    assert results["job-c"].scored == [True] * 3  # still serving after both
    [stopped] = [e for e in logs if e["event"] == "scorer_stopped"]
    assert stopped["jobs"] == 5 and stopped["jobs_unscored"] == 2 and stopped["jobs_undecodable"] == 1
    assert sorted(e["job_id"] for e in logs if e["event"] == "job_unscored") == ["job-p", "job-u"]
