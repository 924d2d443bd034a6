"""The metric reward: its table of cases (docs/JUDGES.md) and its cost per image against the raw image work.

Table: for each quickstart instruction and ``--sources`` procedural sources, the mean SC, PQ and overall (with the
min..max of overall) of the identity edit, the intended edit (``common.procedural.intended_edit``), flat colours,
noise, the intended edit with heavy noise and a faint wash of the target colour, under both mappings.
Speed: median (and spread over ``--repeats``) of the metric's time per image, as a ratio to the raw baseline measured
in the same run (PNG decode + RGB conversion of the same edits, which every backend pays).

    python -m bench.bench_metric [--sources 16] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import numpy as np
from PIL import Image

from editrl.common.procedural import QUICKSTART_INSTRUCTIONS, draw_source_image, reward_cases
from editrl.scorer.backend import ScoreRequest
from editrl.scorer.metric import MetricBackend


def table(n_sources: int) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mapping in MetricBackend.MAPPINGS:
        backend = MetricBackend(mapping=mapping)
        rows: dict[str, list[tuple[float, float, float]]] = {}
        for index in range(n_sources):
            src = draw_source_image(np.random.default_rng([0, index]), 64)
            for instruction in QUICKSTART_INSTRUCTIONS:
                named = reward_cases(src, instruction, index)
                request = ScoreRequest(
                    "g", instruction, "x", Image.fromarray(src), [Image.fromarray(e) for e in named.values()]
                )
                for name, score in zip(named, backend.score(request), strict=True):
                    rows.setdefault(name, []).append((score.sub_scores["SC"], score.sub_scores["PQ"], score.overall))
        out[mapping] = {
            name: {
                "SC": float(np.mean([r[0] for r in values])),
                "PQ": float(np.mean([r[1] for r in values])),
                "overall": float(np.mean([r[2] for r in values])),
                "overall_min": float(np.min([r[2] for r in values])),
                "overall_max": float(np.max([r[2] for r in values])),
            }
            for name, values in rows.items()
        }
    return out


def speed(repeats: int, n_edits: int = 32) -> dict[str, float]:
    src = Image.fromarray(draw_source_image(np.random.default_rng([0, 0]), 64))
    pngs = []
    for seed in range(n_edits):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    backend = MetricBackend()
    raw, metric = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        edits = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
        raw.append((time.perf_counter() - start) / n_edits)
        start = time.perf_counter()
        backend.score(ScoreRequest("g", "make it blue", "color_alter", src, edits))
        metric.append((time.perf_counter() - start) / n_edits)
    ratios = [m / r for m, r in zip(metric, raw, strict=True)]
    return {
        "metric_ms_per_image_median": statistics.median(metric) * 1e3,
        "raw_decode_ms_per_image_median": statistics.median(raw) * 1e3,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    result = {"table": table(args.sources), "speed": speed(args.repeats)}
    for mapping, rows in result["table"].items():
        print(f"\nmapping: {mapping} ({args.sources} sources x {len(QUICKSTART_INSTRUCTIONS)} instructions)")
        print("| case | SC | PQ | overall (min..max) |\n|---|---|---|---|")
        for name, row in rows.items():
            print(
                f"| {name} | {row['SC']:.2f} | {row['PQ']:.2f} | "
                f"**{row['overall']:.2f}** ({row['overall_min']:.2f}..{row['overall_max']:.2f}) |"
            )
    s = result["speed"]
    print(
        f"\nspeed: metric {s['metric_ms_per_image_median']:.2f} ms/image, raw decode "
        f"{s['raw_decode_ms_per_image_median']:.2f} ms/image, ratio median {s['ratio_median']:.1f} "
        f"({s['ratio_min']:.1f}..{s['ratio_max']:.1f}) over {args.repeats} repeats"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
