"""Scorer throughput: several groups per judge call (``score_many``) vs one group per call, same judge, same run.

The judge is the tiny random-weight Qwen2.5-VL built locally (``editrl.common.families.tiny.qwen2_5_vl``) behind the real
transformers engine and the VIEScore ``vlm`` backend; its replies are garbage, so every edit comes back unscored
(that is the point of a random judge) — the benchmark measures the cost of asking, which is what batching changes.

    python -m bench.bench_scorer [--groups 8] [--group-size 4] [--batch 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="groups per judge call in the batched run")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from editrl.common.families.tiny.qwen2_5_vl import build_tiny_qwen2_5_vl
    from editrl.scorer.backend import ScoreRequest
    from editrl.scorer.engines.hf import TransformersEngine
    from editrl.scorer.vlm import VLMBackend

    model = build_tiny_qwen2_5_vl(Path(tempfile.gettempdir()) / "editrl-bench-tiny-vlm")
    engine = TransformersEngine(str(model), max_new_tokens=args.max_new_tokens, batch_size=4 * args.batch)
    backend = VLMBackend(engine=engine, max_reasks=0, max_new_tokens=args.max_new_tokens)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]
    requests = [
        ScoreRequest(
            group_id=f"g{g}",
            instruction="make it red",
            task_type="color_alter",
            source=Image.new("RGB", (64, 64), colours[g % 4]),
            edits=[Image.new("RGB", (64, 64), colours[(g + e) % 4]) for e in range(args.group_size)],
        )
        for g in range(args.groups)
    ]
    backend.score(requests[0])  # warm-up (load, first-call allocations)

    def one_per_call() -> None:
        for r in requests:
            backend.score(r)

    def batched() -> None:
        for i in range(0, len(requests), args.batch):
            backend.score_many(requests[i : i + args.batch])

    times: dict[str, list[float]] = {"one_group_per_call": [], "batched": []}
    for _ in range(args.repeats):
        for name, fn in (("one_group_per_call", one_per_call), ("batched", batched)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    images = args.groups * args.group_size
    rate = {k: images / statistics.median(v) for k, v in times.items()}
    ratio = rate["batched"] / rate["one_group_per_call"]
    print(f"scorer bench: {args.groups} groups x {args.group_size} edits, tiny Qwen2.5-VL judge, 1 thread")
    for name, r in rate.items():
        print(f"{name:<22}{r:10.1f} images/s")
    print(f"RESULT scorer_batching_ratio={ratio:.2f} (batched {args.batch} groups per call / one group per call)")
    if args.json:
        Path(args.json).write_text(json.dumps({"images_per_s": rate, "ratio": ratio, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
