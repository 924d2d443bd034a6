"""`editrl bon` and `editrl eval` against a live broker and a real `metric` scorer process: Best-of-k grows with k,
tables and summaries agree, unscored items are never given a number, and re-runs resume instead of redoing work."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from editrl.scripts import bon, evaluate

from .conftest import write_topology

EDITRL = [sys.executable, "-m", "editrl.scripts.cli"]
SCORED_TASKS = ("quickstart-0000", "quickstart-0001", "quickstart-0003", "quickstart-0004")  # red blue darker brighter
UNSCORABLE = "shiny-0000"  # the metric judge has no target for "shiny": every edit of it is unscored


def _start(role: str, topo: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*EDITRL, role, "--config", str(topo)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_model_dir, quickstart_tasks):
    """A live broker + metric scorer, a topology with the tiny editor, and a task file of 5 tasks in 3 groups."""
    tmp = tmp_path_factory.mktemp("bon_eval")
    topo = write_topology(tmp, tiny_model_dir, quickstart_tasks, data={"group_size": 2})  # N=4: two groups per task
    rows = {json.loads(line)["task_id"]: json.loads(line) for line in quickstart_tasks.read_text().splitlines()}
    tasks = [rows[t] for t in SCORED_TASKS]
    tasks.append({**rows["quickstart-0002"], "task_id": UNSCORABLE, "instruction": "make it shiny",
                  "task_type": "material_alter"})  # fmt: skip
    for row in tasks:
        row["input_images"] = [str(quickstart_tasks.parent / p) for p in row["input_images"]]
    task_file = tmp / "tasks.jsonl"
    task_file.write_text("".join(json.dumps(r) + "\n" for r in tasks))
    broker, scorer = _start("broker", topo), _start("scorer", topo)
    try:
        log = tmp / "run/logs/broker-0.jsonl"
        deadline = time.monotonic() + 30
        while not (log.exists() and "scorer_joined" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        yield tmp, topo, task_file
    finally:
        for p in (scorer, broker):
            p.terminate()
            p.wait(timeout=30)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The commands run in-process and configure logging as a CLI process does; give the session its own back."""
    import logging

    import structlog

    root = logging.getLogger()
    handlers, level, config = list(root.handlers), root.level, structlog.get_config()
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level
    structlog.configure(**config)


def _run(module, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="editrl")
    module.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.handler(args)


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))}


def test_best_of_k_from_the_live_pool_and_resume(pool):
    tmp, topo, task_file = pool
    out = tmp / "bon"
    assert _run(bon, "bon", topo, "--tasks", task_file, "--n", 4, "--out", out, "--timeout", 20) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ks"] == [1, 2, 4] and summary["this_run"] == {"generated": 20, "judged": 20}
    assert summary["candidates"] == {"on_disk": 20, "scored": 16, "unscored": 4}
    means = [summary["best_of"][k]["mean_overall"] for k in ("1", "2", "4")]
    assert means == sorted(means)
    for k in ("1", "2", "4"):  # the unscorable task is reported, never given a number or an image
        result = summary["best_of"][k]
        assert result["tasks_scored"] == 4 and result["tasks_unscored"] == [UNSCORABLE]
        assert not (out / f"best_of_{k}/{UNSCORABLE}.png").exists()
    first = {}
    for task_id in SCORED_TASKS:
        assert sorted(p.name for p in (out / "candidates" / task_id).glob("*.png")) == [f"{i}.png" for i in range(4)]
        lines = [json.loads(line) for line in (out / "candidates" / task_id / "scores.jsonl").read_text().splitlines()]
        first[task_id] = next(r["overall"] for r in lines if r["index"] == 0)
        chosen = [json.loads((out / f"best_of_{k}/scores.json").read_text())["tasks"][task_id] for k in (1, 2, 4)]
        assert chosen[0]["index"] == 0 and chosen[0]["overall"] == first[task_id]  # Best-of-1 is candidate 0
        assert [c["overall"] for c in chosen] == sorted(c["overall"] for c in chosen)  # never drops as k grows
        assert chosen[2]["overall"] == max(r["overall"] for r in lines)
        best4 = (out / f"best_of_4/{task_id}.png").read_bytes()
        assert best4 == (out / "candidates" / task_id / f"{chosen[2]['index']}.png").read_bytes()
    assert means[0] == pytest.approx(sum(first.values()) / len(first))

    before = _mtimes(out / "candidates")
    assert _run(bon, "bon", topo, "--tasks", task_file, "--n", 4, "--out", out, "--timeout", 20) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["this_run"] == {"generated": 0, "judged": 4}  # only the unscored candidates are asked again
    assert _mtimes(out / "candidates") == before and again["best_of"] == summary["best_of"]


def _csv_means(out: Path, group: str) -> dict[str, float | None]:
    with (out / f"{group}.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["scored"] == "1"]
    return {k: (sum(float(r[k]) for r in rows) / len(rows) if rows else None) for k in ("SC", "PQ", "overall")}


def _check_tables(out: Path, summary: dict) -> None:
    for group, stats in summary["groups"].items():
        assert {k: stats[k] for k in ("SC", "PQ", "overall")} == pytest.approx(_csv_means(out, group))
    means = [g["overall"] for g in summary["groups"].values() if g["overall"] is not None]
    assert summary["mean_over_groups"]["overall"] == pytest.approx(sum(means) / len(means))
    assert summary["mean_over_groups"]["overall_groups"] == 2  # the unscorable group is left out, not zeroed


def test_eval_of_a_policy_and_of_an_image_folder(pool):
    tmp, topo, task_file = pool
    out = tmp / "eval_policy"
    assert _run(evaluate, "eval", topo, "--tasks", task_file, "--out", out, "--timeout", 20) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"] == {"generated": 5, "scored": 4, "unscored": 1}
    assert summary["groups"]["material_alter"] == {"SC": None, "PQ": None, "overall": None, "items": 1,
                                                   "scored": 0, "unscored": 1, "missing": 0}  # fmt: skip
    assert summary["groups"]["color_alter"]["scored"] == 2 and summary["groups"]["tone_transfer"]["scored"] == 2
    _check_tables(out, summary)
    with (out / "material_alter.csv").open(newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["scored"] == "0" and row["overall"] == row["SC"] == row["PQ"] == ""

    tables = {p.name: p.read_text() for p in out.glob("*.csv") if p.name != "material_alter.csv"}
    images = _mtimes(out / "images")
    assert _run(evaluate, "eval", topo, "--tasks", task_file, "--out", out, "--timeout", 20) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["this_run"] == {"generated": 0, "scored": 0, "unscored": 1}  # scored rows skipped, unscored re-asked
    assert {p.name: p.read_text() for p in out.glob("*.csv") if p.name != "material_alter.csv"} == tables
    assert _mtimes(out / "images") == images and again["groups"] == summary["groups"]

    folder = tmp / "edits"
    shutil.copytree(out / "images", folder)
    (folder / "quickstart-0004.png").unlink()
    out_f = tmp / "eval_folder"
    assert _run(evaluate, "eval", topo, "--tasks", task_file, "--images", folder, "--out", out_f) == 0
    from_folder = json.loads((out_f / "summary.json").read_text())
    assert (
        list(from_folder["missing"]) == ["quickstart-0004"] and from_folder["groups"]["tone_transfer"]["missing"] == 1
    )
    assert from_folder["groups"]["color_alter"] == summary["groups"]["color_alter"]  # same edits, same judge
    _check_tables(out_f, from_folder)


def test_eval_of_a_published_checkpoint(pool):
    import torch
    from safetensors.torch import save_file

    from editrl.common.config import load_config
    from editrl.common.families.base import load_policy
    from editrl.common.lora import lora_state_dict
    from editrl.common.weights.file import DONE_FILE, publish_file

    tmp, topo, task_file = pool
    learner = load_policy(load_config(topo).policy, with_pipeline=False)
    generator = torch.Generator().manual_seed(0)
    lora = {k: 0.5 * torch.randn(v.shape, generator=generator) for k, v in lora_state_dict(learner.model).items()}
    published = Path(publish_file(tmp / "run/weights", 3, lora, kind="lora").uri)
    save_file(lora, str(tmp / "lora.safetensors"))

    runs = {"base": [], "published": ["--checkpoint", published], "file": ["--checkpoint", tmp / "lora.safetensors"]}
    for name, extra in runs.items():
        assert _run(evaluate, "eval", topo, "--tasks", task_file, "--out", tmp / f"ck_{name}", *extra) == 0
    edits = {name: {p.name: p.read_bytes() for p in (tmp / f"ck_{name}/images").glob("*.png")} for name in runs}
    assert len(edits["base"]) == 5 and edits["published"] == edits["file"]  # same weights, same seeds
    assert all(edits["published"][k] != edits["base"][k] for k in edits["base"])  # the LoRA was applied
    run = json.loads((tmp / "ck_published/run.json").read_text())
    assert run["checkpoint"] == str(published.resolve())

    # resuming into a directory made with other weights is refused; a version that does not verify is not loaded
    assert _run(evaluate, "eval", topo, "--tasks", task_file, "--out", tmp / "ck_published") == 2
    (published / DONE_FILE).write_text("0" * 64 + "\n")
    assert _run(evaluate, "eval", topo, "--tasks", task_file, "--out", tmp / "ck_bad", "--checkpoint", published) == 2
    assert not list((tmp / "ck_bad").glob("*.csv"))
