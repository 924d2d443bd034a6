"""Broker throughput bench: end-to-end actor → broker → LMDB → learner vs raw ZeroMQ, and ReplayStore vs raw LMDB.

Run from the repo root::

    python -m bench.bench_broker            # full run (< 2 min)
    python -m bench.bench_broker --quick    # short run (< 20 s)
    python bench/bench_broker.py --json /tmp/bench.json --profile

1. **e2e**: the broker runs in its own OS process (this file re-executed with ``--_serve-broker``: a ``Broker`` over a
   ``ReplayStore`` in a temp dir, calling ``run``). This process plays three DEALER peers in one poll loop: an actor
   that keeps ``--window`` RolloutGroups (``latents`` ≈ ``--payload-kib``) in flight and matches Acks by request_id,
   a scorer that answers every ScoreJob at once with a valid ScoreResult, and a learner that pulls with
   SampleRequest(max_groups=8) until it holds all groups. The broker child grants one lease per group in LMDB before
   it starts (as a broker restarted with that many open leases would hold them), so the actor skips LeaseRequest
   (admission control governs only that) but every group still claims its lease at ingest; the images are PNG headers
   (all the broker reads of them) padded to ``PNG_BYTES``. Throughput = latents MiB delivered to the learner / wall time from first send to last group
   received. Baseline: raw ZeroMQ PUSH/PULL (tcp, ``copy=False``) from a child process moving as many messages of
   the same size. Ratio = broker / raw.
2. **replay**: ``ReplayStore.insert_groups`` in batches of ``--insert-batch`` records (the way the broker batches one
   loop turn), then ``mark_scored`` per group and ``take_ready`` in batches of 8, vs raw ``lmdb`` puts in write
   transactions of the same size with the same env flags (sync, metasync, no writemap) and gets (copied out, like
   ``take_ready``) in read transactions of the sample batch size.

Each figure is the median over ``--repeats`` runs. The last lines are ``RESULT ...``; ``--json PATH`` writes the same
numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import zmq

from editrl.common import codec, wire

MIB = 1 << 20
GROUP_SIZE = 2  # G edits per group
PNG_BYTES = 4096  # fake PNG blob size per image
SAMPLE_MAX_GROUPS = 8
E2E_TARGET = 0.5
REPLAY_TARGET = 0.7
TMP_ROOT = "/tmp"


# ----------------------------------------------------------------------------------------------------------------
# Payloads


def make_group(payload_kib: int, index: int = 0, rng_seed: int = 0) -> wire.RolloutGroup:
    """A valid RolloutGroup whose ``latents`` is exactly ``payload_kib`` KiB of float32 ([G, 4, payload_kib, 32])."""
    rng = np.random.default_rng(rng_seed)
    latents = rng.standard_normal((GROUP_SIZE, 4, payload_kib, 32), dtype=np.float32)
    return wire.RolloutGroup(
        request_id=f"req-{index}", group_id=f"g-{index}", lease_id=f"fake-lease-{index}", task_id="t0",
        actor_id="bench-actor", policy_version=0, instruction="make it red", task_type="color_alter",
        source_png=_fake_png(rng), edit_pngs=[_fake_png(rng) for _ in range(GROUP_SIZE)],
        family="flow", traj={"latents": latents}, log_probs=np.zeros((GROUP_SIZE, 3), np.float32),
        cond={"txt": np.ones((8, 16), np.float32), "sigmas": np.linspace(1.0, 0.0, 4, dtype=np.float32)},
        params={"noise_level": 0.7, "guidance": 2.5},
    )  # fmt: skip


def _fake_png(rng: np.random.Generator, side: int = 64) -> bytes:
    """``PNG_BYTES`` bytes: a real PNG signature and IHDR chunk (``side`` x ``side``), then random bytes."""
    ihdr = struct.pack(">II5B", side, side, 8, 2, 0, 0, 0)
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return head + rng.bytes(PNG_BYTES - len(head))


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _rate(n: int, nbytes: int, seconds: float) -> dict[str, float]:
    seconds = max(seconds, 1e-9)
    return {"records_s": n / seconds, "mib_s": nbytes / MIB / seconds, "seconds": seconds}


def _self_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


# ----------------------------------------------------------------------------------------------------------------
# Child processes (entered by re-executing this file with a hidden flag)


def serve_broker(data_dir: str, capacity: int, map_size: int, profile_path: str) -> None:
    """Child: a Broker over a fresh ReplayStore; prints its endpoint, runs until SIGTERM."""
    import logging

    import structlog

    from editrl.broker.server import Broker
    from editrl.broker.store import ReplayStore
    from editrl.common.tasks import Task

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    ctx = zmq.Context()
    store = ReplayStore(data_dir, capacity=capacity, map_size_bytes=map_size)
    store.commit_turn(lease_puts=[(f"fake-lease-{i}", {"task_index": 0, "actor_id": "bench-actor",
                                                        "request_id": f"pre-{i}"}) for i in range(capacity)])  # fmt: skip
    tasks = [Task("t0", "make it red", ("/nonexistent/0.png",), "color_alter")]
    broker = Broker("tcp://127.0.0.1:0", store, tasks, groups_per_step=8, max_staleness=1,
                    log=structlog.get_logger(), ctx=ctx)  # fmt: skip
    print(f"ENDPOINT {broker.endpoint}", flush=True)
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        broker.run(lambda: stop["flag"])
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
        broker.close()
        store.close()
        ctx.destroy(linger=0)


def raw_push(endpoint: str, n: int, payload_bytes: int) -> None:
    """Child: PUSH ``n`` messages of ``payload_bytes`` with copy=False. Frame 0 of the first carries t0."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, -1)
    sock.connect(endpoint)
    payload = np.random.default_rng(0).integers(0, 255, payload_bytes, dtype=np.uint8)
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes on one host
    header = np.array([t0], np.float64).tobytes()
    for i in range(n):
        sock.send_multipart([header if i == 0 else b"", memoryview(payload)], copy=False)
    sock.close()  # linger -1: wait until everything is delivered
    ctx.term()


# ----------------------------------------------------------------------------------------------------------------
# 1. End-to-end


def bench_raw_zmq(n: int, payload_kib: int, timeout_s: float) -> dict[str, float]:
    payload_bytes = payload_kib * 1024
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen(
        _self_cmd("--_raw-push", f"tcp://127.0.0.1:{port}", str(n), str(payload_bytes)), env=_child_env()
    )
    try:
        got, nbytes, t0 = 0, 0, None
        deadline = time.monotonic() + timeout_s
        while got < n:
            if not sock.poll(1000):
                if time.monotonic() > deadline or proc.poll() not in (None, 0):
                    raise TimeoutError(f"raw zmq: {got}/{n} messages received")
                continue
            frames = sock.recv_multipart(copy=False)
            if got == 0:
                t0 = float(np.frombuffer(frames[0].buffer, np.float64)[0])
            nbytes += len(frames[1].buffer)
            got += 1
        t1 = time.perf_counter()
        proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        ctx.term()
    assert t0 is not None
    return _rate(n, nbytes, t1 - t0)


class BrokerProcess:
    """The broker in its own OS process with a ReplayStore in a temp dir under /tmp."""

    def __init__(self, n_groups: int, payload_kib: int, profile_path: str = "") -> None:
        self.tmp = tempfile.mkdtemp(prefix="editrl-bench-broker-", dir=TMP_ROOT)
        map_size = max(64 * MIB, int(n_groups * (payload_kib * 1024 + 64 * 1024) * 2))
        self.proc = subprocess.Popen(
            _self_cmd("--_serve-broker", str(Path(self.tmp) / "replay"), str(n_groups + 16), str(map_size), profile_path),
            stdout=subprocess.PIPE, env=_child_env(), text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("ENDPOINT "):
            self.stop()
            raise RuntimeError(f"broker did not start: {line!r}")
        self.endpoint = line.split(" ", 1)[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _dealer(ctx: zmq.Context, endpoint: str, name: str) -> zmq.Socket:
    from editrl.common.net import harden

    s = harden(ctx.socket(zmq.DEALER))
    s.setsockopt(zmq.ROUTING_ID, name.encode())
    s.connect(endpoint)
    return s


def _roundtrip(sock: zmq.Socket, msg: Any, timeout_s: float = 10.0) -> Any:
    sock.send_multipart(codec.encode(msg))
    if not sock.poll(int(timeout_s * 1000)):
        raise TimeoutError(f"no reply to {type(msg).__name__}")
    return codec.decode(sock.recv_multipart())


def drive_broker(
    endpoint: str, n: int, payload_kib: int, window: int, sample_backoff_s: float, timeout_s: float
) -> dict[str, Any]:
    """Actor + scorer + learner in one poll loop against a running broker. Returns throughput and counters."""
    ctx = zmq.Context()
    actor = _dealer(ctx, endpoint, "bench-actor")
    scorer = _dealer(ctx, endpoint, "bench-scorer")
    learner = _dealer(ctx, endpoint, "bench-learner")
    try:
        template = make_group(payload_kib)
        payload_bytes = template.traj["latents"].nbytes
        # Warm-up: every socket connected; the scorer registered (ScorerReady is handled before the Status reply).
        scorer.send_multipart(codec.encode(wire.ScorerReady("bench-scorer", "metric", 4 * window)))
        for sock in (scorer, actor, learner):
            assert isinstance(_roundtrip(sock, wire.StatusRequest("warm")), wire.Status)

        poller = zmq.Poller()
        for sock in (actor, scorer, learner):
            poller.register(sock, zmq.POLLIN)
        inflight: dict[str, float] = {}
        ack_latency: list[float] = []
        sent = received = record_bytes = n_batches = n_waits = scored = 0
        sample_outstanding, next_sample_at, next_heartbeat = False, 0.0, 0.0
        last_batch: wire.Batch | None = None
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while received < n:
            now = time.perf_counter()
            while sent < n and len(inflight) < window:
                g = dataclasses.replace(template, request_id=f"req-{sent}", group_id=f"g-{sent}",
                                        lease_id=f"fake-lease-{sent}")  # fmt: skip
                actor.send_multipart(codec.encode(g), copy=False)
                inflight[g.request_id] = time.perf_counter()
                sent += 1
            if not sample_outstanding and now >= next_sample_at:
                learner.send_multipart(
                    codec.encode(
                        wire.SampleRequest(f"s-{n_batches + n_waits}", 0, n_batches + 1, 0, SAMPLE_MAX_GROUPS, 0)
                    )
                )
                sample_outstanding = True
            if now >= next_heartbeat:
                scorer.send_multipart(codec.encode(wire.Heartbeat("bench-scorer")))
                next_heartbeat = now + wire.HEARTBEAT_INTERVAL_S
            wait_ms = 100 if sample_outstanding else max(0, int((next_sample_at - now) * 1000))
            events = dict(poller.poll(wait_ms))
            if actor in events:
                while actor.poll(0):
                    ack = codec.decode(actor.recv_multipart(copy=False))
                    if not isinstance(ack, wire.Ack) or not ack.ok:
                        raise RuntimeError(f"actor got {ack!r}")
                    t_sent = inflight.pop(ack.request_id, None)
                    if t_sent is not None:
                        ack_latency.append(time.perf_counter() - t_sent)
            if scorer in events:
                while scorer.poll(0):
                    job = codec.decode(scorer.recv_multipart(copy=False))
                    if isinstance(job, wire.ScoreJob):
                        k = len(job.edit_pngs)
                        result = wire.ScoreResult(job.job_id, job.group_id, "bench-scorer", [True] * k, [1.0] * k,
                                                  [{"q": 1.0}] * k, [""] * k)  # fmt: skip
                        scorer.send_multipart(codec.encode(result))
                        scored += 1
            if learner in events:
                while learner.poll(0):
                    reply = codec.decode(learner.recv_multipart(copy=False))
                    sample_outstanding = False
                    if isinstance(reply, wire.Batch):
                        n_batches += 1
                        last_batch = reply
                        received += len(reply.groups)
                        record_bytes += sum(len(r) for r in reply.groups)
                        next_sample_at = 0.0
                    elif isinstance(reply, wire.Wait):
                        n_waits += 1
                        next_sample_at = time.perf_counter() + sample_backoff_s
                    else:
                        raise RuntimeError(f"learner got {reply!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"e2e: sent {sent}, received {received}/{n} after {timeout_s} s")
        t1 = time.perf_counter()
        assert last_batch is not None
        last = codec.decode(codec.decode_record(last_batch.groups[-1]))
        assert last.traj["latents"].nbytes == payload_bytes
        counters = _roundtrip(learner, wire.StatusRequest("final")).counters
    finally:
        for sock in (actor, scorer, learner):
            sock.close(linger=0)
        ctx.term()
    out: dict[str, Any] = _rate(n, n * payload_bytes, t1 - t0)
    out.update(
        record_mib_s=record_bytes / MIB / (t1 - t0),
        batches=n_batches,
        sample_waits=n_waits,
        scored=scored,
        ack_latency_ms_median=1000 * _median(ack_latency),
        counters={k: v for k, v in counters.items() if v},
    )
    return out


def bench_e2e_broker(n: int, payload_kib: int, window: int, sample_backoff_s: float, timeout_s: float,
                     profile_path: str = "") -> dict[str, Any]:  # fmt: skip
    broker = BrokerProcess(n, payload_kib, profile_path)
    try:
        return drive_broker(broker.endpoint, n, payload_kib, window, sample_backoff_s, timeout_s)
    finally:
        broker.stop()


# ----------------------------------------------------------------------------------------------------------------
# 2. Replay store vs raw LMDB


def bench_replay(n: int, payload_kib: int, insert_batch: int, sample_batch: int) -> dict[str, Any]:
    """Raw LMDB and ReplayStore side by side, batch by batch (paired timing: the disk's drift hits both alike)."""
    from editrl.broker.store import ReplayStore

    record = codec.encode_record(codec.encode(make_group(payload_kib)))
    rec_bytes = len(record)
    map_size = max(64 * MIB, int(n * (rec_bytes + 64 * 1024) * 2))
    tmp = tempfile.mkdtemp(prefix="editrl-bench-replay-", dir=TMP_ROOT)
    ids = [f"g-{i:08d}" for i in range(n)]
    keys = [gid.encode() for gid in ids]
    info = {"version": 0, "task_id": "t0", "task_type": "color_alter", "instruction": "make it red",
            "actor_id": "bench-actor", "group_size": GROUP_SIZE, "t_insert": 0.0}  # fmt: skip
    scores = {"sub_scores": [{"q": 1.0}] * GROUP_SIZE, "reasoning": [""] * GROUP_SIZE, "worker_id": "w"}
    secs = dict.fromkeys(
        ("raw_insert", "raw_sample", "raw_pop", "store_insert", "store_mark_scored", "store_take_ready"), 0.0
    )
    env = store = None
    try:
        # raw LMDB with the same env flags as ReplayStore
        env = lmdb.open(str(Path(tmp) / "raw"), map_size=map_size, max_dbs=1, sync=True, metasync=True,
                        writemap=False, lock=True, subdir=True)  # fmt: skip
        env_pop = lmdb.open(str(Path(tmp) / "raw_pop"), map_size=map_size, max_dbs=1, sync=True, metasync=True,
                            writemap=False, lock=True, subdir=True)  # fmt: skip
        db = env.open_db(b"groups")
        db_pop = env_pop.open_db(b"groups")
        store = ReplayStore(Path(tmp) / "store", capacity=n + 1, map_size_bytes=map_size)

        def raw_insert(i: int) -> None:
            with env.begin(write=True) as txn:
                for key in keys[i : i + insert_batch]:
                    txn.put(key, record, db=db, overwrite=False)

        for i in range(0, n, insert_batch):  # untimed: a separate copy for the durable-pop baseline (cold pages)
            with env_pop.begin(write=True) as txn:
                for key in keys[i : i + insert_batch]:
                    txn.put(key, record, db=db_pop)

        def store_insert(i: int) -> None:
            assert all(store.insert_groups([(gid, record, info) for gid in ids[i : i + insert_batch]]))

        os.sync()
        for b, i in enumerate(range(0, n, insert_batch)):
            order = (("raw_insert", raw_insert), ("store_insert", store_insert))
            for name, fn in order if b % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                fn(i)
                secs[name] += time.perf_counter() - t

        t = time.perf_counter()
        for gid in ids:
            assert store.mark_scored(gid, [1.0] * GROUP_SIZE, scores)
        secs["store_mark_scored"] = time.perf_counter() - t

        raw_got = store_got = taken = 0
        for b, i in enumerate(range(0, n, sample_batch)):
            batch_keys = keys[i : i + sample_batch]
            t = time.perf_counter()
            with env.begin() as txn:  # raw read-only get (the page cache; no durability)
                for key in batch_keys:
                    raw_got += len(bytes(txn.get(key, db=db)))
            secs["raw_sample"] += time.perf_counter() - t

            def raw_pop(batch_keys: list[bytes] = batch_keys) -> None:
                # the least a durable consumer queue must do: get + delete in one fsync'd write transaction
                with env_pop.begin(write=True) as txn:
                    for key in batch_keys:
                        bytes(txn.get(key, db=db_pop))
                        txn.delete(key, db=db_pop)

            def store_pop() -> None:
                nonlocal taken, store_got
                batch, _ = store.take_ready(sample_batch, 0)
                taken += len(batch)
                store_got += sum(len(rec) for _, rec, *_ in batch)

            order = (("raw_pop", raw_pop), ("store_take_ready", store_pop))
            for name, fn in order if b % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                fn()
                secs[name] += time.perf_counter() - t
        assert taken == n, f"take_ready returned {taken}/{n}"
    finally:
        if env is not None:
            env.close()
            env_pop.close()
        if store is not None:
            store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, Any] = {"record_bytes": rec_bytes}
    out["raw_insert"] = _rate(n, n * rec_bytes, secs["raw_insert"])
    out["store_insert"] = _rate(n, n * rec_bytes, secs["store_insert"])
    out["raw_sample"] = _rate(n, raw_got, secs["raw_sample"])
    out["raw_pop"] = _rate(n, raw_got, secs["raw_pop"])
    out["store_take_ready"] = _rate(n, store_got, secs["store_take_ready"])
    out["store_mark_scored"] = _rate(n, 0, secs["store_mark_scored"])
    out["store_score_and_sample"] = _rate(n, store_got, secs["store_mark_scored"] + secs["store_take_ready"])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Driver


def _print_profile(path: str, top: int) -> None:
    import pstats

    print(f"\n== broker process profile (one extra e2e run under cProfile; top {top} by own time) ==")
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats("server.py|store.py|wire.py", top)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_serve-broker":
        serve_broker(argv[1], int(argv[2]), int(argv[3]), argv[4] if len(argv) > 4 else "")
        return 0
    if argv and argv[0] == "--_raw-push":
        raw_push(argv[1], int(argv[2]), int(argv[3]))
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (< 20 s)")
    p.add_argument("--groups", type=int, help="e2e groups per run (default 512, quick 96)")
    p.add_argument("--replay-records", type=int, help="replay records per run (default 512, quick 96)")
    p.add_argument("--repeats", type=int, help="runs per figure, median reported (default 3, quick 1)")
    p.add_argument("--payload-kib", type=int, default=1024, help="latents size per group in KiB (default 1 MiB)")
    p.add_argument("--window", type=int, default=8, help="RolloutGroups in flight from the actor")
    p.add_argument("--insert-batch", type=int, default=16, help="records per insert transaction")
    p.add_argument("--sample-backoff-ms", type=float, default=2.0, help="learner pause after a Wait reply")
    p.add_argument("--timeout", type=float, default=60.0, help="per e2e run, seconds")
    p.add_argument("--profile", action="store_true", help="one extra e2e run with the broker under cProfile")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    n_groups = args.groups or (96 if args.quick else 512)
    n_records = args.replay_records or (96 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 3)
    backoff = args.sample_backoff_ms / 1000

    t_start = time.perf_counter()
    raw_runs, broker_runs, replay_runs = [], [], []
    for r in range(repeats):
        raw_runs.append(bench_raw_zmq(n_groups, args.payload_kib, args.timeout))
        broker_runs.append(bench_e2e_broker(n_groups, args.payload_kib, args.window, backoff, args.timeout))
        replay_runs.append(bench_replay(n_records, args.payload_kib, args.insert_batch, SAMPLE_MAX_GROUPS))
        print(f"run {r + 1}/{repeats}: raw zmq {raw_runs[-1]['mib_s']:.0f} MiB/s, broker e2e "
              f"{broker_runs[-1]['mib_s']:.0f} MiB/s, store insert {replay_runs[-1]['store_insert']['mib_s']:.0f} "
              f"vs raw {replay_runs[-1]['raw_insert']['mib_s']:.0f} MiB/s", flush=True)  # fmt: skip

    def med(runs: list[dict[str, Any]], *path: str) -> float:
        vals = []
        for run in runs:
            v: Any = run
            for k in path:
                v = v[k]
            vals.append(float(v))
        return _median(vals)

    raw_mib, broker_mib = med(raw_runs, "mib_s"), med(broker_runs, "mib_s")
    e2e_ratio = broker_mib / raw_mib
    rp: dict[str, dict[str, float]] = {}
    for key in ("raw_insert", "raw_sample", "raw_pop", "store_insert", "store_mark_scored", "store_take_ready",
                "store_score_and_sample"):  # fmt: skip
        rp[key] = {"records_s": med(replay_runs, key, "records_s"), "mib_s": med(replay_runs, key, "mib_s")}
    insert_ratio = rp["store_insert"]["mib_s"] / rp["raw_insert"]["mib_s"]
    sample_ratio = rp["store_take_ready"]["mib_s"] / rp["raw_sample"]["mib_s"]
    score_sample_ratio = rp["store_score_and_sample"]["mib_s"] / rp["raw_sample"]["mib_s"]
    durable_sample_ratio = rp["store_take_ready"]["mib_s"] / rp["raw_pop"]["mib_s"]
    durable_e2e_ratio = broker_mib / rp["raw_insert"]["mib_s"]

    payload_mib = args.payload_kib / 1024
    print(f"\nbroker bench: {n_groups} groups x {payload_mib:g} MiB latents (e2e), {n_records} records "
          f"(replay, insert batch {args.insert_batch}, sample batch {SAMPLE_MAX_GROUPS}), median of {repeats}, "
          f"temp dirs under {TMP_ROOT}")  # fmt: skip
    rows = [
        ("e2e raw ZeroMQ PUSH/PULL tcp", raw_mib / payload_mib, raw_mib, ""),
        ("e2e broker actor->LMDB->learner", broker_mib / payload_mib, broker_mib, f"{e2e_ratio:.2f}"),
        ("replay insert raw lmdb", rp["raw_insert"]["records_s"], rp["raw_insert"]["mib_s"], ""),
        ("replay insert ReplayStore", rp["store_insert"]["records_s"], rp["store_insert"]["mib_s"],
         f"{insert_ratio:.2f}"),
        ("replay sample raw lmdb get", rp["raw_sample"]["records_s"], rp["raw_sample"]["mib_s"], ""),
        ("replay sample take_ready", rp["store_take_ready"]["records_s"], rp["store_take_ready"]["mib_s"],
         f"{sample_ratio:.2f}"),
        ("replay durable pop raw lmdb", rp["raw_pop"]["records_s"], rp["raw_pop"]["mib_s"], ""),
        ("replay take_ready vs durable pop", rp["store_take_ready"]["records_s"], rp["store_take_ready"]["mib_s"],
         f"{durable_sample_ratio:.2f}"),
        ("replay mark_scored (1 txn/group)", rp["store_mark_scored"]["records_s"], 0.0, ""),
        ("replay mark_scored+take_ready", rp["store_score_and_sample"]["records_s"],
         rp["store_score_and_sample"]["mib_s"], f"{score_sample_ratio:.2f}"),
    ]  # fmt: skip
    print(f"{'what':<36}{'records/s':>12}{'MiB/s':>10}{'ratio':>8}")
    for name, rec_s, mib_s, ratio in rows:
        print(f"{name:<36}{rec_s:>12.1f}{mib_s:>10.1f}{ratio:>8}")
    ceiling = rp["raw_insert"]["mib_s"] / raw_mib
    print(f"e2e ceiling if the broker only did the fsync'd LMDB insert: raw lmdb insert / raw zmq = {ceiling:.2f}")
    print(f"e2e broker / raw fsync'd LMDB insert (the durable ceiling) = {durable_e2e_ratio:.2f}")
    b0 = broker_runs[len(broker_runs) // 2]
    print(f"e2e details (one run): ack latency median {b0['ack_latency_ms_median']:.1f} ms, {b0['batches']} batches, "
          f"{b0['sample_waits']} learner waits, counters {b0['counters']}")  # fmt: skip

    results = {
        "e2e_ratio": e2e_ratio,
        "replay_insert_ratio": insert_ratio,
        "replay_sample_ratio": sample_ratio,
        "replay_score_and_sample_ratio": score_sample_ratio,
        "e2e_durable_insert_ceiling": ceiling,
        "e2e_vs_durable_ceiling": durable_e2e_ratio,
        "replay_sample_vs_durable_pop_ratio": durable_sample_ratio,
        "e2e": {"raw_mib_s": raw_mib, "broker_mib_s": broker_mib, "raw_runs": raw_runs, "broker_runs": broker_runs},
        "replay": {**rp, "runs": replay_runs},
        "config": {"groups": n_groups, "replay_records": n_records, "repeats": repeats, "payload_kib": args.payload_kib,
                   "window": args.window, "insert_batch": args.insert_batch, "sample_batch": SAMPLE_MAX_GROUPS,
                   "quick": args.quick},
        "targets": {"e2e_ratio": E2E_TARGET, "replay_ratio": REPLAY_TARGET},
        "wall_s": time.perf_counter() - t_start,
    }  # fmt: skip
    if args.profile:
        fd, prof = tempfile.mkstemp(prefix="editrl-bench-", suffix=".prof", dir=TMP_ROOT)
        os.close(fd)
        try:
            bench_e2e_broker(n_groups, args.payload_kib, args.window, backoff, args.timeout, prof)
            _print_profile(prof, 25)
        finally:
            if os.path.exists(prof):
                os.unlink(prof)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nRESULT e2e_ratio={e2e_ratio:.2f} (target >= {E2E_TARGET}) broker_mib_s={broker_mib:.1f} "
          f"raw_zmq_mib_s={raw_mib:.1f}")  # fmt: skip
    print(f"RESULT replay_insert_ratio={insert_ratio:.2f} replay_sample_ratio={sample_ratio:.2f} "
          f"(target >= {REPLAY_TARGET}) replay_score_and_sample_ratio={score_sample_ratio:.2f} "
          f"replay_sample_vs_durable_pop={durable_sample_ratio:.2f}")  # fmt: skip
    print(f"RESULT e2e_vs_durable_ceiling={durable_e2e_ratio:.2f} durable_ceiling={ceiling:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
