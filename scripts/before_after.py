"""Before and after RL, side by side: the same tasks edited by the starting policy and by the run's latest weights.

For every task of the topology's task file it samples G edits with the base policy (weight version 0) and with the
latest published LoRA weights, from the same seed, scores both with the strict ``metric`` reward and prints the mean
structure kept, plain grey SSIM to the source, SC and overall of each. It writes a PNG grid with one row per
instruction (its first task): the source, then the step-0 edits, then the last step's edits, rewards underneath.

    python -m editrl.scripts.before_after configs/quickstart.yaml [--out runs/quickstart/before_after.png] [--g 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from editrl.common.config import load_config
from editrl.common.images import from_png
from editrl.common.tasks import load_source_image, load_tasks
from editrl.scorer.backend import ScoreRequest
from editrl.scorer.metric import MetricBackend
from editrl.scripts.offline import Editor

CELL = 96


def latest_weights(run_dir: Path) -> Path | None:
    """The newest published weights directory (``weights/vNNNNNN`` with its DONE marker), or None."""
    done = sorted(p.parent for p in (run_dir / "weights").glob("v*/DONE"))
    return done[-1] if done else None


def _measure(editor: Editor, tasks: list[Any], g: int, seed: int) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """Mean figures over every task's G edits, and per task id its (edit images, scores)."""
    metric = MetricBackend()
    rows: dict[str, list[float]] = {"structure": [], "ssim": [], "SC": [], "overall": []}
    per_task: dict[str, list[Any]] = {}
    for index, task in enumerate(tasks):
        source = load_source_image(task)
        edits = [from_png(png) for png in editor.edits(task.instruction, source, g, seed + index)]
        scores = metric.score(ScoreRequest(task.task_id, task.instruction, task.task_type, source, edits))
        for score in scores:
            for key in rows:
                rows[key].append(float(score.overall if key == "overall" else score.sub_scores[key]))
        per_task[task.task_id] = [edits, scores]
    return {key: statistics.fmean(values) for key, values in rows.items()}, per_task


def _grid(tasks: list[Any], before: dict[str, list[Any]], after: dict[str, list[Any]], version: str) -> Image.Image:
    firsts: dict[str, Any] = {}
    for task in tasks:
        firsts.setdefault(task.instruction, task)
    g = len(next(iter(before.values()))[0])
    width, height = CELL * (1 + 2 * g) + 8, (CELL + 16) * len(firsts) + 16
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((CELL + 3, 2), "step 0 (before RL)", fill="black")
    draw.text((CELL * (1 + g) + 11, 2), f"{version} (after RL)", fill="black")
    for row, (instruction, task) in enumerate(firsts.items()):
        y = 16 + row * (CELL + 16)
        grid.paste(load_source_image(task).resize((CELL, CELL), Image.Resampling.NEAREST), (0, y))
        draw.text((3, y + CELL + 1), instruction[:16], fill="black")
        for block, (edits, scores) in enumerate((before[task.task_id], after[task.task_id])):
            for i, (edit, score) in enumerate(zip(edits, scores, strict=True)):
                x = CELL * (1 + block * g + i) + 8 * block
                grid.paste(edit.resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
                draw.text((x + 3, y + CELL + 1), f"{score.overall:.2f}", fill="black")
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--out", default="", help="grid PNG (default: <run dir>/before_after.png)")
    parser.add_argument("--g", type=int, default=3, help="edits per task")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    weights = latest_weights(cfg.run_dir)
    if weights is None:
        print(f"no published weights in {cfg.run_dir / 'weights'}: run the topology first")
        return 1
    tasks = load_tasks(cfg.data.tasks)
    before_means, before = _measure(Editor(cfg, None), tasks, args.g, args.seed)
    after_means, after = _measure(Editor(cfg, str(weights)), tasks, args.g, args.seed)
    out = Path(args.out) if args.out else cfg.run_dir / "before_after.png"
    _grid(tasks, before, after, weights.name).save(out)
    print(
        f"{len(tasks)} tasks x {args.g} edits, same seeds, strict metric (structure kept / plain SSIM / SC / overall):"
    )
    for label, means in (("step 0", before_means), (weights.name, after_means)):
        print(
            f"  {label:>8}: structure {means['structure']:.3f}  SSIM {means['ssim']:.3f}  SC {means['SC']:.2f}  "
            f"overall {means['overall']:.2f}"
        )
    print(f"grid: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"step0": before_means, weights.name: after_means}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
