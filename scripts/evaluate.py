"""``editrl eval topo.yaml --tasks T.jsonl --out DIR [--checkpoint W | --images FOLDER]``: GEdit-Bench-style evaluation
of an editor, scored by the LIVE broker and scorer pool with the configured judge.

Terms:
- An *item* is one task's edit: sampled once per task by the configured policy and sampler (the base model, or with
  ``--checkpoint``'s LoRA weights), or read from ``--images FOLDER/<task_id>.png``.
- A *group* is a task type (GEdit-Bench's 11 groups, EditScore-RL-Data's names). As GEdit-Bench's
  ``calculate_statistics.py``: the means of SC, PQ and overall within each group, then the mean over groups.

Layout of DIR:
- ``run.json``: what produced DIR (policy, sampler, checkpoint or image folder, seed, judge); a resume must match.
- ``images/<task_id>.png``: the generated edits (policy mode), written before they are scored.
- ``<task_type>.csv``: ``task_id, instruction, SC, PQ, overall, scored``, one row per task the judge answered.
- ``summary.json``: per group means and counts, the mean over groups, what this run did.

Guarantees:
- Scoring goes through the broker as ``CheckGroup`` messages (as ``editrl check``): nothing enters the replay.
- Resumable: scored rows already in the CSVs are skipped; an edit already in ``images/`` is not sampled again; the
  edit of a task is sampled with a seed derived from (seed, task id), so a resumed run equals an uninterrupted one.
- Never invented: an unscored item gets a row with ``scored=0`` and empty numbers, is counted and excluded from
  every mean; a re-run asks the judge again for it (and only for it). A missing or unreadable image (or source)
  is listed in the summary and gets no row. A group without one scored item has null means and is left out of the
  mean over groups (which says how many groups it covers).
- ``overall`` is the judge's ``overall`` (``sqrt(SC * PQ)`` per item for the metric and VIEScore judges, GEdit's O);
  ``SC``/``PQ`` are the judge's sub-scores of those names, empty when the judge has none.

Failure model: a group the pool does not answer within 2 x ``--timeout`` (one resend, same ids) stops the run with
exit 1; every answer received before is on disk. The parts shared with ``editrl bon`` (the pool scorer, the editor,
the run identity) are in :mod:`editrl.scripts.offline`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editrl.scripts.offline import (  # noqa: F401 - re-exported for callers of the original module
    DEFAULT_TIMEOUT_S,
    RUN_FILE,
    SUMMARY_FILE,
    Editor,
    PoolScorer,
    check_run_identity,
    derived_seed,
    load_cfg,
    mean_or_none,
    policy_identity,
    prepare_out_dir,
    run_cli,
    safe_name,
    source_png_of,
    write_atomic,
)

if TYPE_CHECKING:  # heavy modules load only when a command runs, so `editrl --help` stays instant
    from editrl.common.config import TopologyConfig
    from editrl.common.tasks import Task
    from editrl.scorer.backend import Score

CSV_COLUMNS = ("task_id", "instruction", "SC", "PQ", "overall", "scored")
IMAGES_DIR = "images"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path}: not an editrl eval table (columns {reader.fieldnames}, expected {CSV_COLUMNS})")
        return list(reader)


def _is_scored_row(row: dict[str, Any]) -> bool:
    """A complete row with a finite judge score (a torn last line after a crash is not)."""
    try:
        ok = row.get("scored") == "1" and math.isfinite(float(row["overall"]))
        return ok and all(row[k] == "" or math.isfinite(float(row[k])) for k in ("SC", "PQ"))
    except (KeyError, TypeError, ValueError):
        return False


def _csv_text(rows: list[dict[str, str]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def keep_scored_rows(out_dir: Path, task_types: set[str]) -> set[str]:
    """Task ids with a scored row; unscored, torn and duplicate rows are removed from the CSVs (to be asked again)."""
    done: set[str] = set()
    for task_type in sorted(task_types):
        path = out_dir / f"{task_type}.csv"
        if not path.exists():
            continue
        rows = _read_csv(path)
        keep = []
        for row in rows:
            if _is_scored_row(row) and row["task_id"] not in done:
                done.add(row["task_id"])
                keep.append(row)
        if len(keep) != len(rows):
            write_atomic(path, _csv_text(keep, header=True).encode())
    return done


def _append_row(path: Path, row: dict[str, str]) -> None:
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        handle.write(_csv_text([row], header=new))


def _row(task: Task, score: Score) -> dict[str, str]:
    def number(value: float | None) -> str:
        return "" if value is None else repr(float(value))

    subs = score.sub_scores
    return {
        "task_id": task.task_id,
        "instruction": task.instruction,
        "SC": number(subs.get("SC")) if score.scored else "",
        "PQ": number(subs.get("PQ")) if score.scored else "",
        "overall": number(score.overall),
        "scored": "1" if score.scored else "0",
    }


def summarize(out_dir: Path, tasks: list[Task], missing: dict[str, str], this_run: dict[str, int]) -> dict[str, Any]:
    """Per group means from the CSV rows of ``tasks`` (so the summary is exactly what the tables hold)."""
    ids_by_group: dict[str, set[str]] = {}
    for task in tasks:
        ids_by_group.setdefault(task.task_type, set()).add(task.task_id)
    groups: dict[str, dict[str, Any]] = {}
    for task_type, ids in sorted(ids_by_group.items()):
        path = out_dir / f"{task_type}.csv"
        rows = [r for r in _read_csv(path) if r["task_id"] in ids] if path.exists() else []
        scored = [r for r in rows if _is_scored_row(r)]
        groups[task_type] = {
            **{k: mean_or_none([float(r[k]) for r in scored if r[k] != ""]) for k in ("SC", "PQ", "overall")},
            "items": len(ids),
            "scored": len(scored),
            "unscored": len(rows) - len(scored),
            "missing": sum(task_id in missing for task_id in ids),
        }
    over_groups: dict[str, Any] = {}
    for key in ("SC", "PQ", "overall"):
        values = [g[key] for g in groups.values() if g[key] is not None]
        over_groups[key], over_groups[f"{key}_groups"] = mean_or_none(values), len(values)
    return {
        "groups": groups,
        "mean_over_groups": over_groups,
        "items": len(tasks),
        "scored": sum(g["scored"] for g in groups.values()),
        "unscored": sum(g["unscored"] for g in groups.values()),
        "missing": missing,
        "this_run": this_run,
    }


def run_eval(
    cfg: TopologyConfig,
    tasks: list[Task],
    out_dir: str | Path,
    *,
    checkpoint: str | None = None,
    images: str | Path | None = None,
    seed: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    concurrency: int = 0,
    log: Any = None,
) -> dict[str, Any]:
    """Evaluate one edit per task (see the module docstring); writes the CSVs and ``summary.json``, returns it."""
    from tqdm import tqdm

    from editrl.common.tasks import MissingImageError

    out_dir, seed = Path(out_dir), cfg.run.seed if seed is None else seed
    if images is not None and not Path(images).is_dir():
        raise ValueError(f"--images {images}: not a directory")
    if images is not None:
        identity = {"images": str(Path(images).resolve()), "judge": cfg.scorers.backend}
    else:
        identity = policy_identity(cfg, checkpoint, seed)
    prepare_out_dir(out_dir, tasks, {"command": "eval", **identity}, checkpoint)
    done = keep_scored_rows(out_dir, {t.task_type for t in tasks})
    editor = Editor(cfg, checkpoint)
    missing: dict[str, str] = {}
    this_run = {"generated": 0, "scored": 0, "unscored": 0}
    scorer = PoolScorer(cfg, concurrency or cfg.scorers.count * cfg.scorers.batch, timeout_s, "eval")
    pending: deque[tuple[Task, Future]] = deque()
    bar = tqdm(total=len(tasks), initial=len(tasks) - sum(t.task_id not in done for t in tasks), desc="eval")

    def finish(task: Task, future: Future) -> None:
        (score,) = future.result()
        _append_row(out_dir / f"{task.task_type}.csv", _row(task, score))
        this_run["scored" if score.scored else "unscored"] += 1
        if not score.scored and log is not None:
            log.info("eval_item_unscored", task_id=task.task_id, reason=score.reasoning[:200])
        bar.update(1)

    try:
        for task in (t for t in tasks if t.task_id not in done):
            try:
                source_png = source_png_of(task)
                edit_png = _edit_of(task, out_dir, images, editor, seed, this_run)
            except MissingImageError as exc:
                missing[task.task_id] = str(exc)
                if log is not None:
                    log.warning("eval_item_missing", task_id=task.task_id, error=str(exc)[:200])
                bar.update(1)
                continue
            pending.append((task, scorer.submit(task.instruction, task.task_type, source_png, [edit_png])))
            while len(pending) > scorer.concurrency:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    finally:
        scorer.close()
        bar.close()
    summary = {
        "judge": cfg.scorers.backend,
        "source": {"images": identity.get("images"), "checkpoint": identity.get("checkpoint")},
        **summarize(out_dir, tasks, missing, this_run),
    }
    write_atomic(out_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def _edit_of(task: Task, out_dir: Path, images: Any, editor: Editor, seed: int, this_run: dict[str, int]) -> bytes:
    """The task's edit as PNG bytes: from the image folder, from an earlier run's ``images/``, or sampled now."""
    from editrl.common.images import from_png
    from editrl.common.tasks import MissingImageError, load_source_image

    path = (Path(images) if images is not None else out_dir / IMAGES_DIR) / f"{task.task_id}.png"
    if path.is_file():
        data = path.read_bytes()
        try:
            from_png(data)
        except ValueError as exc:
            raise MissingImageError(path, str(exc)) from None
        return data
    if images is not None:
        raise MissingImageError(path, "no such file")
    (data,) = editor.edits(task.instruction, load_source_image(task), 1, derived_seed(seed, task.task_id))
    write_atomic(path, data)
    this_run["generated"] += 1
    return data


# ----------------------------------------------------------------------------------------------------- CLI


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``editrl`` subcommands; ``args.handler(args)`` runs it."""
    parser = subparsers.add_parser("eval", help="GEdit-Bench-style evaluation of a checkpoint or an image folder")
    parser.add_argument("config", help="the topology YAML (policy, sampler, broker endpoint, judge)")
    parser.add_argument("--tasks", required=True, help="task jsonl (instruction, input_images, task_type, task_id)")
    parser.add_argument("--out", required=True, help="output directory (resumed when it exists)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="LoRA weights: a published weights/vNNNNNN dir or a .safetensors file")
    source.add_argument("--images", help="score FOLDER/<task_id>.png instead of generating")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: run.seed)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per scoring attempt")
    parser.add_argument("--concurrency", type=int, default=0, help="items in flight (0: scorers.count x batch)")
    parser.add_argument("--json", action="store_true", help="print summary.json instead of a table")
    parser.set_defaults(handler=main)
    return parser


def main(args: argparse.Namespace) -> int:
    def body() -> int:
        from editrl.common.log import setup_logging
        from editrl.common.tasks import load_tasks

        cfg = load_cfg(args.config)
        tasks = load_tasks(args.tasks)
        log = setup_logging("eval", 0, args.out, console_level="WARNING")
        summary = run_eval(
            cfg, tasks, args.out, checkpoint=args.checkpoint, images=args.images, seed=args.seed,
            timeout_s=args.timeout, concurrency=args.concurrency, log=log,
        )  # fmt: skip
        print(json.dumps(summary) if args.json else format_summary(summary))
        return 0

    return run_cli("eval", body)


def format_summary(summary: dict[str, Any]) -> str:
    def num(value: float | None) -> str:
        return "    -" if value is None else f"{value:5.2f}"

    lines = [f"{'group':24s}    SC    PQ     O  scored unscored missing"]
    for name, g in summary["groups"].items():
        lines.append(
            f"{name:24s} {num(g['SC'])} {num(g['PQ'])} {num(g['overall'])} {g['scored']:7d} {g['unscored']:8d} "
            f"{g['missing']:7d}"
        )
    m = summary["mean_over_groups"]
    lines.append(f"{'mean over groups':24s} {num(m['SC'])} {num(m['PQ'])} {num(m['overall'])}")
    return "\n".join(lines)


def standalone(argv: list[str] | None = None) -> int:
    """``python -m editrl.scripts.evaluate ...`` (the same as ``editrl eval ...``)."""
    parser = argparse.ArgumentParser(prog="editrl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(standalone())
