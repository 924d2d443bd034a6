"""Weight transport bench: learner → N actor processes over the file and the stream transports, vs raw safetensors.

Run from the repo root::

    python -m bench.bench_weights                      # ~100M float32 parameters, 2 actors, 5 runs
    python -m bench.bench_weights --quick              # ~5M parameters, 1 actor, 1 run (a few seconds)
    python -m bench.bench_weights --params 50e6 --actors 1 --json /tmp/weights.json

The state dict is a list of float32 matrices (``[2048, 2048]`` each, like transformer linear layers) totalling
``--params``. One untimed warm-up run, then ``--repeats`` runs; the three measurements of a run are interleaved in a
rotating order so drifting disk and memory speed hits them alike. Each run's file and stream times are divided by
that run's raw time; the report gives the median of those ratios and their spread (min..max) over the runs, and the
median (min..max) of every time.

1. **raw** (baseline, this process): ``safetensors.torch.save_file`` + ``load_file`` of the same tensors to a temp
   dir. ``load_file`` maps the file lazily, so this is essentially the cost of writing the bytes once.
2. **file**: ``common.weights.publish_file`` (safetensors, fsync, sha256, DONE) in this process, then the
   WeightsInfo is written to every actor's stdin; each actor (a separate OS process started before the timing,
   ``OMP_NUM_THREADS=1``) calls ``load_weights`` → ``load_published`` (sha256 check, lazy load) and reports the time
   it finished. Figure = publish start → the last actor loaded.
3. **stream**: ``WeightServer.publish`` (safetensors bytes and the XXH3-64 of each chunk, one pass) in this
   process, then the same announcement; each actor calls ``load_weights`` → ``fetch_stream`` (pipelined chunks, each
   checked against its XXH3-64 as it arrives and copied into one buffer, tensors as views of it). Same figure.

Ratios: file / raw and stream / raw per run (target ≤ 2). The LoRA-only payload (rank ``--lora-rank`` adapters A [r, in] and
B [out, r] on every matrix) is reported as a fraction of the full payload (target ≤ 2 %), with the time to stream it.
Actor processes report ``time.perf_counter()`` (CLOCK_MONOTONIC: comparable across processes on one host). The last
lines are ``RESULT ...``; ``--json PATH`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MB = 1e6
DIM = 2048
TARGET_RATIO = 2.0
LORA_TARGET = 0.02
TMP_ROOT = "/tmp"


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _quiet_logs() -> None:
    """Library log events go to stderr at WARNING and up: stdout carries the table (and the actors' protocol)."""
    import logging

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


# ----------------------------------------------------------------------------------------------------------------
# Payloads


def make_tensors(n_params: float, seed: int = 0) -> dict[str, Any]:
    """float32 matrices ``[DIM, DIM]`` (the last one shorter) totalling ``n_params`` (rounded down to a row)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dim = DIM
    out: dict[str, torch.Tensor] = {}
    remaining = int(n_params)
    while remaining >= dim:
        rows = min(dim, remaining // dim)
        out[f"blocks.{len(out)}.weight"] = torch.randn(rows, dim, generator=gen)  # [rows, dim] float32
        remaining -= rows * dim
    return out


def make_lora(tensors: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank-``rank`` LoRA adapters for every matrix: A [r, in], B [out, r] float32 (what a LoRA learner publishes)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        base = name.removesuffix(".weight")
        out[f"{base}.lora_A.weight"] = torch.randn(rank, w.shape[1])
        out[f"{base}.lora_B.weight"] = torch.randn(w.shape[0], rank)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Actor processes


def actor_main() -> int:
    """Child: print READY, then per WeightsInfo line on stdin load it and print
    ``LOADED version t_start t_end bytes transfer_s load_s`` (the last two from FetchStats; 0 for the file transport).
    """
    import torch

    torch.set_num_threads(1)
    _quiet_logs()
    from editrl.common.weights.stream_client import FetchStats, load_weights
    from editrl.common.weights.stream_server import STREAM_SCHEME
    from editrl.common.wire import WeightsInfo

    print("READY", flush=True)
    for line in sys.stdin:
        info = WeightsInfo(**json.loads(line))
        stats = FetchStats()
        t_start = time.perf_counter()
        try:
            tensors = load_weights(info, **({"stats": stats} if info.uri.startswith(STREAM_SCHEME) else {}))
            t_end = time.perf_counter()
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            print(f"LOADED {info.version} {t_start:.6f} {t_end:.6f} {nbytes} {stats.transfer_s:.6f} {stats.load_s:.6f}",
                  flush=True)  # fmt: skip
            del tensors
        except Exception as exc:  # report, keep serving: the parent decides
            print(f"ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return 0


class Actors:
    """N actor processes, each blocked on its stdin pipe until the next announcement."""

    def __init__(self, n: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_actor"]
        self.procs = [
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)
        ]
        for proc in self.procs:
            line = self._read_line(proc, time.monotonic() + timeout_s)
            if line != "READY":
                self.close()
                raise RuntimeError(f"actor did not start: {line!r}")

    def _read_line(self, proc: subprocess.Popen, deadline: float) -> str:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"actor pid {proc.pid} silent for {self.timeout_s} s")
        return proc.stdout.readline().strip()

    def announce(self, info: Any) -> list[tuple[float, ...]]:
        """Send ``info`` to every actor; per actor (t_start, t_end, bytes, transfer_s, load_s) once all loaded it."""
        line = json.dumps(dataclasses.asdict(info)) + "\n"
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line)
            proc.stdin.flush()
        deadline = time.monotonic() + self.timeout_s
        out = []
        for proc in self.procs:
            reply = self._read_line(proc, deadline)
            parts = reply.split()
            if len(parts) != 7 or parts[0] != "LOADED" or int(parts[1]) != info.version:
                raise RuntimeError(f"actor pid {proc.pid}: {reply!r}")
            out.append(tuple(float(x) for x in parts[2:]))
        return out

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def bench_raw(tensors: dict[str, Any], tmp: Path) -> dict[str, float]:
    from safetensors.torch import load_file, save_file

    path = tmp / "raw.safetensors"
    t0 = time.perf_counter()
    save_file(tensors, str(path))
    loaded = load_file(str(path))
    seconds = time.perf_counter() - t0
    assert len(loaded) == len(tensors)
    del loaded
    size = path.stat().st_size
    path.unlink()
    return {"seconds": seconds, "bytes": size}


def _timed(publish: Any, actors: Actors, expect_bytes: int) -> dict[str, float]:
    t0 = time.perf_counter()
    info = publish()
    t_published = time.perf_counter()
    loads = actors.announce(info)
    assert all(x[2] == expect_bytes for x in loads), f"an actor loaded {[x[2] for x in loads]} bytes"
    return {
        "seconds": max(x[1] for x in loads) - t0,
        "publish_s": t_published - t0,
        "load_s_max": max(x[1] - x[0] for x in loads),  # announcement received → tensors returned
        "stream_transfer_s_max": max(x[3] for x in loads),  # FetchStats: meta request → last verified chunk
        "stream_load_s_max": max(x[4] for x in loads),  # FetchStats: safetensors header parsed into views
    }


def bench_file(tensors: dict[str, Any], actors: Actors, weights_dir: Path, version: int, nbytes: int) -> dict:
    from editrl.common.weights.file import publish_file

    try:
        return _timed(lambda: publish_file(weights_dir, version, tensors, "full"), actors, nbytes)
    finally:
        shutil.rmtree(weights_dir / f"v{version:06d}", ignore_errors=True)


def bench_stream(tensors: dict[str, Any], actors: Actors, server: Any, version: int, nbytes: int, kind: str) -> dict:
    return _timed(lambda: server.publish(version, tensors, kind), actors, nbytes)


def checksum_floors(tensors: dict[str, Any], chunk_size: int, repeats: int = 3) -> dict[str, float]:
    """Seconds for one pass over the serialized payload (median of ``repeats``), one thread: sha256 (what the file
    transport computes, at publish and in each actor), XXH3-64 per chunk (what the stream transport computes) and
    CRC-32 per chunk (``zlib``, the stdlib alternative it was measured against)."""
    import hashlib
    import zlib

    import xxhash
    from safetensors.torch import save

    view = memoryview(save(tensors))
    passes = {
        "sha256": lambda: hashlib.sha256().update(view),
        "xxh3": lambda: [xxhash.xxh3_64_intdigest(view[i : i + chunk_size]) for i in range(0, len(view), chunk_size)],
        "crc32": lambda: [zlib.crc32(view[i : i + chunk_size]) for i in range(0, len(view), chunk_size)],
    }
    out = {}
    for name, fn in passes.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = _median(times)
    return out


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": _median(xs), "min": min(xs), "max": max(xs)}


def _nbytes(tensors: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------------------------------------------
# Driver


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    _quiet_logs()
    from editrl.common.weights.stream_server import WeightServer, payload_bytes

    tensors = make_tensors(args.params)
    n_params = sum(t.numel() for t in tensors.values())
    lora = make_lora(tensors, args.lora_rank)
    full_bytes, lora_bytes = payload_bytes(tensors), payload_bytes(lora)
    floors = checksum_floors(tensors, int(args.chunk_mib * (1 << 20)))
    tmp = Path(tempfile.mkdtemp(prefix="editrl-bench-weights-", dir=TMP_ROOT))
    actors = Actors(args.actors, args.timeout)
    server = WeightServer(chunk_size=int(args.chunk_mib * (1 << 20)))
    runs: dict[str, list[dict[str, float]]] = {"raw": [], "file": [], "stream": [], "stream_lora": []}
    try:
        # Warm-up round, not counted: one-off imports in the actors, and first-touch memory (on this VM a page the
        # guest never touched costs far more than a reused one, which would favour whichever transport runs last).
        bench_raw(tensors, tmp)
        bench_file(tensors, actors, tmp / "weights", 1, _nbytes(tensors))
        bench_stream(tensors, actors, server, 1, _nbytes(tensors), "full")
        for r in range(args.repeats):
            v = 2 + 2 * r  # the warm-up was version 1; the server wants increasing versions
            steps = [
                ("raw", lambda: bench_raw(tensors, tmp)),
                ("file", lambda v=v: bench_file(tensors, actors, tmp / "weights", v, _nbytes(tensors))),
                ("stream", lambda v=v: bench_stream(tensors, actors, server, v, _nbytes(tensors), "full")),
            ]
            for name, fn in steps[r % 3 :] + steps[: r % 3]:
                runs[name].append(fn())
            runs["stream_lora"].append(bench_stream(lora, actors, server, v + 1, _nbytes(lora), "lora"))
            print(f"run {r + 1}/{args.repeats}: raw {runs['raw'][-1]['seconds']:.2f} s, file "
                  f"{runs['file'][-1]['seconds']:.2f} s, stream {runs['stream'][-1]['seconds']:.2f} s", flush=True)  # fmt: skip
    finally:
        server.close()
        actors.close()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {name: {k: _median([x[k] for x in xs]) for k in xs[0]} for name, xs in runs.items()}
    ratios = {  # per run: that run's time over the same run's raw time
        name: [x["seconds"] / raw["seconds"] for x, raw in zip(runs[name], runs["raw"], strict=True)]
        for name in ("file", "stream")
    }
    return {
        "params": n_params,
        "full_bytes": full_bytes,
        "lora_bytes": lora_bytes,
        "lora_fraction": lora_bytes / full_bytes,
        "sha256_pass_s": floors["sha256"],
        "xxh3_pass_s": floors["xxh3"],
        "crc32_pass_s": floors["crc32"],
        "file_ratio": _median(ratios["file"]),
        "stream_ratio": _median(ratios["stream"]),
        "ratios": {name: {**_spread(xs), "runs": xs} for name, xs in ratios.items()},
        "seconds": {name: _spread([x["seconds"] for x in xs]) for name, xs in runs.items()},
        "median": med,
        "runs": runs,
        "config": {k: getattr(args, k) for k in ("params", "actors", "repeats", "chunk_mib", "lora_rank", "quick")},
        "targets": {"ratio_max": TARGET_RATIO, "lora_fraction_max": LORA_TARGET},
    }


def _range(x: dict[str, float]) -> str:
    return f"{x['median']:.3f} ({x['min']:.3f}..{x['max']:.3f})"


def report(res: dict[str, Any], args: argparse.Namespace) -> None:
    med, secs, n, full = res["median"], res["seconds"], args.actors, res["full_bytes"]
    print(f"\nweights bench: {res['params'] / 1e6:.1f}M float32 params ({full / MB:.1f} MB safetensors), {n} actor "
          f"process(es), chunk {args.chunk_mib:g} MiB, {args.repeats} run(s) after a warm-up: median (min..max), "
          f"temp dir under {TMP_ROOT}")  # fmt: skip
    rows = [
        ("raw save_file + load_file (1 process)", "raw", full),
        (f"file publish_file -> {n} x load_published", "file", n * full),
        (f"stream WeightServer -> {n} x fetch_stream", "stream", n * full),
        (f"stream LoRA-only (rank {args.lora_rank}) -> {n} actors", "stream_lora", n * res["lora_bytes"]),
    ]
    print(f"{'what':<44}{'total s':>22}{'publish s':>11}{'load s':>8}{'MB/s':>7}  ratio vs raw of the same run")
    for name, key, nbytes in rows:
        m = med[key]
        pub = f"{m['publish_s']:.3f}" if "publish_s" in m else "-"
        load = f"{m['load_s_max']:.3f}" if "load_s_max" in m else "-"
        r = res["ratios"].get(key)
        ratio = f"{r['median']:.2f} ({r['min']:.2f}..{r['max']:.2f})" if r else ""
        print(f"{name:<44}{_range(secs[key]):>22}{pub:>11}{load:>8}{nbytes / MB / m['seconds']:>7.0f}  {ratio}")
    print("(publish s: learner side until the WeightsInfo exists; load s: slowest actor, announcement → tensors; "
          "MB/s: bytes delivered to all actors / median total s)")  # fmt: skip
    raw_s = med["raw"]["seconds"]
    floor = ", ".join(f"{name} {res[key]:.3f} s ({res[key] / raw_s:.2f} x raw)"
                      for name, key in (("sha256", "sha256_pass_s"), ("XXH3-64", "xxh3_pass_s"),
                                        ("CRC-32", "crc32_pass_s")))  # fmt: skip
    print(f"checksum floor, one pass over the payload in one thread: {floor}. Critical path: file = 2 sha256 passes "
          f"(publish, then each actor); stream = 1 XXH3-64 pass at publish (fused with the copy, 2 threads) + 1 in "
          f"each actor (as chunks arrive)")  # fmt: skip
    print(f"LoRA-only payload: {res['lora_bytes'] / MB:.2f} MB vs full {full / MB:.1f} MB = "
          f"{100 * res['lora_fraction']:.2f} %")  # fmt: skip
    fr, sr = res["ratios"]["file"], res["ratios"]["stream"]
    print(f"\nRESULT file_ratio={res['file_ratio']:.2f} stream_ratio={res['stream_ratio']:.2f} "
          f"(median of {args.repeats} per-run ratios, target <= {TARGET_RATIO:g}) file_ratio_range={fr['min']:.2f}.."
          f"{fr['max']:.2f} stream_ratio_range={sr['min']:.2f}..{sr['max']:.2f} raw_s={med['raw']['seconds']:.3f} "
          f"file_s={med['file']['seconds']:.3f} stream_s={med['stream']['seconds']:.3f}")  # fmt: skip
    print(f"RESULT lora_fraction={res['lora_fraction']:.4f} (target <= {LORA_TARGET:g}) "
          f"lora_bytes={res['lora_bytes']} full_bytes={full}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_actor":
        return actor_main()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=float, help="float32 parameters in the state dict (default 100e6, quick 5e6)")
    p.add_argument("--actors", type=int, help="actor processes (default 2, quick 1)")
    p.add_argument("--repeats", type=int, help="timed runs; median and min..max reported (default 5, quick 1)")
    p.add_argument("--quick", action="store_true", help="small smoke run (a few seconds)")
    p.add_argument("--chunk-mib", type=float, default=4.0, help="stream chunk size in MiB")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for any actor reply")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.params = args.params or (5e6 if args.quick else 100e6)
    args.actors = args.actors or (1 if args.quick else 2)
    args.repeats = args.repeats or (1 if args.quick else 5)
    if args.params < 1e4 or args.actors < 1 or args.repeats < 1:
        p.error("need --params >= 1e4, --actors >= 1, --repeats >= 1")
    t0 = time.perf_counter()
    res = run(args)
    res["wall_s"] = time.perf_counter() - t0
    report(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
