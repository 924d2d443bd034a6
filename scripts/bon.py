"""``editrl bon topo.yaml --tasks T.jsonl --n N --out DIR [--checkpoint W] [--seed S]``: Best-of-N with the live judge.

Terms:
- A *candidate* is one of the N edits sampled for a task (index 0..N-1) by the configured policy and sampler (the
  base model, or with ``--checkpoint``'s LoRA weights), in batched groups of ``data.group_size``.
- *Best-of-k* is the highest-scored of candidates 0..k-1 (the lowest index on ties). One run yields every k in
  {1, 2, 4, ..., N} (the powers of two up to N, plus N), as EditScore's ``select_best.py`` copies the running best
  after 1, 2, 4, 8, 16 candidates; so Best-of-1 is candidate 0 and each task's best never drops as k grows.

Layout of DIR:
- ``run.json``: what produced DIR (policy, sampler, checkpoint, seed, judge); a resume must match (N may grow).
- ``candidates/<task_id>/<i>.png`` and ``candidates/<task_id>/scores.jsonl``: one line per judge answer, with the
  sha256 of the PNG it judged, ``scored``, ``overall`` (null when unscored), ``sub_scores`` and ``reasoning``.
- ``best_of_<k>/<task_id>.png`` and ``best_of_<k>/scores.json`` (chosen index and score per task).
- ``summary.json``: the mean best reward per k, the tasks without a scored candidate, what this run did.

Guarantees:
- Scoring goes through the broker as ``CheckGroup`` messages (as ``editrl check``): nothing enters the replay.
  While the pool scores one task, the next one is sampled (up to ``scorers.count x batch`` tasks in flight).
- Resumable: existing candidates are not sampled again and judged candidates not judged again (an answer counts
  only for the PNG bytes it judged). Candidates are sampled with seeds derived from (seed, task id, first index of
  the group), so a resumed run equals an uninterrupted one; growing N samples only the new indices.
- Never invented: an unscored candidate has no number and is left out of every max; a re-run asks the judge
  again for it (and only for it). A task with no scored candidate among the first k is listed under
  ``tasks_unscored`` for that k, gets no image there, and is not in that k's mean. A task whose source image is
  missing is listed under ``missing_sources``.

Failure model: as ``editrl eval`` (:mod:`editrl.scripts.evaluate`): a group the pool does not answer within
2 x ``--timeout`` stops the run with exit 1, and every answer received before is on disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editrl.scripts.offline import (
    DEFAULT_TIMEOUT_S,
    SUMMARY_FILE,
    Editor,
    PoolScorer,
    derived_seed,
    load_cfg,
    mean_or_none,
    policy_identity,
    prepare_out_dir,
    run_cli,
    source_png_of,
    write_atomic,
)

if TYPE_CHECKING:
    from editrl.common.config import TopologyConfig
    from editrl.common.tasks import Task
    from editrl.scorer.backend import Score

CANDIDATES_DIR = "candidates"
SCORES_FILE = "scores.jsonl"


def best_of_ks(n: int) -> list[int]:
    """The k reported for N candidates: powers of two up to N, plus N (N=6 -> [1, 2, 4, 6])."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    return sorted({1 << j for j in range(n.bit_length())} | {n})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_candidates(task_dir: Path, n: int) -> dict[int, bytes]:
    """PNG bytes of the candidates 0..n-1 on disk (written atomically: a file present is complete)."""
    return {i: (task_dir / f"{i}.png").read_bytes() for i in range(n) if (task_dir / f"{i}.png").is_file()}


def read_judgements(task_dir: Path, pngs: dict[int, bytes]) -> dict[int, Score]:
    """The latest answer per candidate whose PNG is still the one judged; a torn last line (a crash) is skipped."""
    from editrl.scorer.backend import Score

    path = task_dir / SCORES_FILE
    out: dict[int, Score] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            index, scored, overall = int(rec["index"]), bool(rec["scored"]), rec["overall"]
            if index not in pngs or rec["sha256"] != sha256_hex(pngs[index]):
                continue
            out[index] = Score(scored, float(overall) if scored else None, rec["sub_scores"], rec["reasoning"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def best_index(scores: dict[int, Score], k: int) -> int | None:
    """The index of the best scored candidate among 0..k-1 (the lowest on ties); None when none is scored."""
    best: int | None = None
    for i in range(k):
        score = scores.get(i)
        if score is not None and score.scored and (best is None or score.overall > scores[best].overall):
            best = i
    return best


def _sample_missing(task: Task, task_dir: Path, n: int, editor: Editor, seed: int, group_size: int) -> int:
    """Sample the candidates of ``task`` that are not on disk, in batched groups; returns how many."""
    from editrl.common.tasks import load_source_image

    missing = [i for i in range(n) if not (task_dir / f"{i}.png").is_file()]
    if not missing:
        return 0
    source = load_source_image(task)
    for start in range(0, len(missing), group_size):
        chunk = missing[start : start + group_size]
        pngs = editor.edits(task.instruction, source, len(chunk), derived_seed(seed, task.task_id, chunk[0]))
        for index, data in zip(chunk, pngs, strict=True):
            write_atomic(task_dir / f"{index}.png", data)
    return len(missing)


def _record(task_dir: Path, indices: list[int], pngs: dict[int, bytes], futures: list[Future]) -> int:
    """Append the pool's answers for ``indices`` (in order, one future per group) to scores.jsonl."""
    scores = [score for future in futures for score in future.result()]
    lines = [
        json.dumps(
            {
                "index": i,
                "sha256": sha256_hex(pngs[i]),
                "scored": s.scored,
                "overall": s.overall,
                "sub_scores": s.sub_scores,
                "reasoning": s.reasoning,
            }
        )  # fmt: skip
        for i, s in zip(indices, scores, strict=True)
    ]
    with (task_dir / SCORES_FILE).open("a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return len(lines)


def run_bon(
    cfg: TopologyConfig,
    tasks: list[Task],
    out_dir: str | Path,
    n: int,
    *,
    checkpoint: str | None = None,
    seed: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    concurrency: int = 0,
    log: Any = None,
) -> dict[str, Any]:
    """Sample, judge and select (see the module docstring); writes the best_of_k folders and ``summary.json``."""
    from tqdm import tqdm

    from editrl.common.tasks import MissingImageError

    ks = best_of_ks(n)
    out_dir, seed = Path(out_dir), cfg.run.seed if seed is None else seed
    prepare_out_dir(out_dir, tasks, {"command": "bon", **policy_identity(cfg, checkpoint, seed)}, checkpoint)
    editor, group_size = Editor(cfg, checkpoint), cfg.data.group_size
    this_run = {"generated": 0, "judged": 0}
    missing_sources: dict[str, str] = {}
    scorer = PoolScorer(cfg, concurrency or cfg.scorers.count * cfg.scorers.batch, timeout_s, "bon")
    pending: deque[tuple[Path, list[int], dict[int, bytes], list[Future]]] = deque()
    bar = tqdm(total=len(tasks), desc=f"best-of-{n}")
    try:
        for task in tasks:
            task_dir = out_dir / CANDIDATES_DIR / task.task_id
            try:
                this_run["generated"] += _sample_missing(task, task_dir, n, editor, seed, group_size)
                pngs = read_candidates(task_dir, n)
                judged = read_judgements(task_dir, pngs)
                todo = [i for i in range(n) if not (i in judged and judged[i].scored)]
                source_png = source_png_of(task) if todo else b""
            except MissingImageError as exc:
                missing_sources[task.task_id] = str(exc)
                if log is not None:
                    log.warning("bon_source_missing", task_id=task.task_id, error=str(exc)[:200])
                bar.update(1)
                continue
            groups = [todo[i : i + group_size] for i in range(0, len(todo), group_size)]
            futures = [
                scorer.submit(task.instruction, task.task_type, source_png, [pngs[i] for i in g]) for g in groups
            ]
            pending.append((task_dir, todo, pngs, futures))
            while len(pending) > scorer.concurrency:
                this_run["judged"] += _record(*pending.popleft())
                bar.update(1)
        while pending:
            this_run["judged"] += _record(*pending.popleft())
            bar.update(1)
    finally:
        scorer.close()
        bar.close()
    summary = select_best(out_dir, tasks, n, ks, log)
    summary.update(judge=cfg.scorers.backend, missing_sources=missing_sources, this_run=this_run)
    write_atomic(out_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def select_best(out_dir: Path, tasks: list[Task], n: int, ks: list[int], log: Any = None) -> dict[str, Any]:
    """Write ``best_of_<k>/`` for every k from the candidates and answers on disk; returns the summary's core."""
    per_task = {}
    for task in tasks:
        task_dir = out_dir / CANDIDATES_DIR / task.task_id
        pngs = read_candidates(task_dir, n)
        per_task[task.task_id] = (pngs, read_judgements(task_dir, pngs))
    best_of: dict[str, Any] = {}
    for k in ks:
        k_dir = out_dir / f"best_of_{k}"
        chosen: dict[str, Any] = {}
        unscored: list[str] = []
        for task_id, (pngs, scores) in per_task.items():
            index = best_index(scores, k)
            if index is None:
                unscored.append(task_id)
                (k_dir / f"{task_id}.png").unlink(missing_ok=True)  # a stale choice from a judge answer now void
                continue
            write_atomic(k_dir / f"{task_id}.png", pngs[index], skip_if_same=True)
            score = scores[index]
            judged = sum(1 for i in range(k) if i in scores and scores[i].scored)
            chosen[task_id] = {"index": index, "overall": score.overall, "sub_scores": score.sub_scores,
                               "scored_candidates": judged}  # fmt: skip
        if unscored and log is not None:
            log.info("bon_tasks_unscored", k=k, tasks=unscored[:20], count=len(unscored))
        mean = mean_or_none([c["overall"] for c in chosen.values()])
        result = {"k": k, "mean_overall": mean, "tasks_scored": len(chosen), "tasks_unscored": unscored}
        write_atomic(k_dir / "scores.json", (json.dumps({**result, "tasks": chosen}, indent=2) + "\n").encode())
        best_of[str(k)] = result
    candidates = [s for _, scores in per_task.values() for s in scores.values()]
    return {
        "n": n,
        "ks": ks,
        "best_of": best_of,
        "candidates": {
            "on_disk": sum(len(pngs) for pngs, _ in per_task.values()),
            "scored": sum(s.scored for s in candidates),
            "unscored": sum(not s.scored for s in candidates),
        },
    }


# ----------------------------------------------------------------------------------------------------- CLI


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bon`` to the ``editrl`` subcommands; ``args.handler(args)`` runs it."""
    parser = subparsers.add_parser("bon", help="Best-of-N: sample N edits per task, keep the judge's best")
    parser.add_argument("config", help="the topology YAML (policy, sampler, broker endpoint, judge)")
    parser.add_argument("--tasks", required=True, help="task jsonl (instruction, input_images, task_type, task_id)")
    parser.add_argument("--n", type=int, required=True, help="candidates per task (Best-of-k for k = 1, 2, 4, .., N)")
    parser.add_argument("--out", required=True, help="output directory (resumed when it exists)")
    parser.add_argument("--checkpoint", help="LoRA weights: a published weights/vNNNNNN dir or a .safetensors file")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: run.seed)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per scoring attempt")
    parser.add_argument("--concurrency", type=int, default=0, help="tasks in flight (0: scorers.count x batch)")
    parser.add_argument("--json", action="store_true", help="print summary.json instead of a table")
    parser.set_defaults(handler=main)
    return parser


def main(args: argparse.Namespace) -> int:
    def body() -> int:
        from editrl.common.log import setup_logging
        from editrl.common.tasks import load_tasks

        cfg = load_cfg(args.config)
        tasks = load_tasks(args.tasks)
        best_of_ks(args.n)
        log = setup_logging("bon", 0, args.out, console_level="WARNING")
        summary = run_bon(
            cfg, tasks, args.out, args.n, checkpoint=args.checkpoint, seed=args.seed, timeout_s=args.timeout,
            concurrency=args.concurrency, log=log,
        )  # fmt: skip
        if args.json:
            print(json.dumps(summary))
            return 0
        for k, result in summary["best_of"].items():
            mean = "-" if result["mean_overall"] is None else f"{result['mean_overall']:.3f}"
            print(f"best-of-{k:<4s} mean overall {mean}  ({result['tasks_scored']} tasks scored, "
                  f"{len(result['tasks_unscored'])} without a scored candidate)")  # fmt: skip
        if summary["missing_sources"]:
            print(f"missing source images: {len(summary['missing_sources'])} tasks (see {args.out}/{SUMMARY_FILE})")
        return 0

    return run_cli("bon", body)


def standalone(argv: list[str] | None = None) -> int:
    """``python -m editrl.scripts.bon ...`` (the same as ``editrl bon ...``)."""
    parser = argparse.ArgumentParser(prog="editrl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bon", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(standalone())
