"""Editing tasks: the jsonl task format, source-image loading and the procedural quickstart set.

Terms:
- A *task* is one editing job: an instruction, one or more input images (the first is the source the edit
  starts from) and a task type (EditScore-RL-Data names such as ``color_alter``, ``tone_transfer``).
- A *task file* is jsonl with the public RL editing dataset fields (EditScore-RL-Data ``rl.jsonl``):
  ``instruction`` (str), ``input_images`` (non-empty list of paths; relative paths are resolved against the
  jsonl's folder), ``task_type`` (str), optional ``task_id``/``key`` and ``meta_data`` (ignored). Datasets carry
  many more fields; unknown fields are allowed and ignored.

Failure model: ``load_tasks`` validates the whole file up front and raises ``TaskFileError`` naming the file,
the line and the field at the first bad row, so a broken file fails at start-up and never mid-run. It does not
check that images exist: a missing image fails only its own task, at run time, through ``MissingImageError``
from ``load_source_image``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from editrl.common.procedural import QUICKSTART_INSTRUCTIONS, draw_source_image

QUICKSTART_TASKS_FILE = "tasks.jsonl"
QUICKSTART_IMAGES_DIR = "images"


@dataclass(frozen=True)
class Task:
    """One editing task; ``input_images`` are absolute paths and ``input_images[0]`` is the source image."""

    task_id: str
    instruction: str
    input_images: tuple[str, ...]  # absolute paths
    task_type: str


class TaskFileError(ValueError):
    """A task file is malformed; the message names the file, the 1-based line number and the bad field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        what = "" if field is None else f" field '{field}':"
        super().__init__(f"{where}:{what} {problem}")


class MissingImageError(FileNotFoundError):
    """A task's source image is absent or unreadable; ``path`` is the image path."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"source image missing or unreadable: {self.path} ({reason})")
        self.filename = self.path


def _type_name(value: Any) -> str:
    return type(value).__name__


def _parse_row(row: Any, path: Path, line: int, base_dir: Path) -> Task:
    """Validate one decoded jsonl row and build its Task; raises TaskFileError on the first bad field."""
    if not isinstance(row, dict):
        raise TaskFileError(path, line, None, f"each line must be a JSON object, got {_type_name(row)}")

    def required_str(field: str) -> str:
        if field not in row:
            raise TaskFileError(path, line, field, "is required but missing")
        value = row[field]
        if not isinstance(value, str) or not value.strip():
            raise TaskFileError(path, line, field, f"must be a non-empty string, got {value!r:.80}")
        return value

    instruction = required_str("instruction")
    task_type = required_str("task_type")

    if "input_images" not in row:
        raise TaskFileError(path, line, "input_images", "is required but missing")
    images = row["input_images"]
    if not isinstance(images, list) or not images:
        raise TaskFileError(path, line, "input_images", f"must be a non-empty list of paths, got {images!r:.80}")
    resolved: list[str] = []
    for index, image in enumerate(images):
        if not isinstance(image, str) or not image.strip():
            raise TaskFileError(
                path, line, f"input_images[{index}]", f"must be a non-empty path string, got {image!r:.80}"
            )
        resolved.append(os.path.normpath(base_dir / Path(image).expanduser()))

    task_id = f"{path.stem}-{line - 1}"  # default: file stem and 0-based line index
    for id_field in ("task_id", "key"):
        if id_field in row and row[id_field] is not None:
            value = row[id_field]
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
                raise TaskFileError(path, line, id_field, f"must be a non-empty string or int, got {value!r:.80}")
            task_id = str(value)
            break
    return Task(task_id=task_id, instruction=instruction, input_images=tuple(resolved), task_type=task_type)


def load_tasks(path: str | Path) -> list[Task]:
    """Load and validate a jsonl task file (see the module docstring for the fields).

    Empty lines are skipped. ``task_id`` wins over ``key``; without either the id is ``{file stem}-{line index}``
    (0-based physical line). Raises ``TaskFileError`` for bad JSON, a bad or missing field, duplicate task ids or
    a file without tasks, and ``FileNotFoundError`` when the file itself is absent. Images are not opened.
    """
    path = Path(path)
    base_dir = path.resolve().parent
    tasks: list[Task] = []
    first_line_of: dict[str, int] = {}
    with path.open("r", encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TaskFileError(path, line, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
            task = _parse_row(row, path, line, base_dir)
            if task.task_id in first_line_of:
                raise TaskFileError(
                    path,
                    line,
                    "task_id",
                    f"duplicate task id {task.task_id!r} (first on line {first_line_of[task.task_id]})",
                )
            first_line_of[task.task_id] = line
            tasks.append(task)
    if not tasks:
        raise TaskFileError(path, None, None, "contains no tasks")
    return tasks


def load_source_image(task: Task) -> Image.Image:
    """Open the task's source image (``input_images[0]``) as RGB; raises MissingImageError if absent/unreadable."""
    image_path = task.input_images[0]
    try:
        with Image.open(image_path) as image:
            return image.convert("RGB")  # convert() loads the pixels, so the file can be closed
    except FileNotFoundError as exc:
        raise MissingImageError(image_path, "no such file") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MissingImageError(image_path, f"{_type_name(exc)}: {exc}") from exc


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write atomically, and not at all when the file already holds these bytes (keeps reruns idempotent)."""
    if path.is_file() and path.read_bytes() == data:
        return
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def make_quickstart_tasks(
    out_dir: str | Path,
    n_tasks: int = 16,
    size: int = 64,
    seed: int = 0,
    instructions: Sequence[str] | None = None,
    jsonl_name: str = QUICKSTART_TASKS_FILE,
) -> Path:
    """Write a procedural quickstart task set and return the path of its jsonl (``out_dir/jsonl_name``).

    Writes ``out_dir/images/src_XXXX.png`` (``size``x``size`` RGB shapes, deterministic from ``seed`` and the task
    index) and ``out_dir/{jsonl_name}`` with relative ``input_images``. Instructions cycle through
    ``instructions`` (None or empty: all of ``QUICKSTART_INSTRUCTIONS``), so each gets an equal share; any other
    instruction raises ValueError. Idempotent: the same arguments give byte-identical files, and unchanged files
    are not rewritten.
    """
    chosen = list(instructions or QUICKSTART_INSTRUCTIONS)
    unknown = [text for text in chosen if text not in QUICKSTART_INSTRUCTIONS]
    if unknown:
        raise ValueError(f"instructions must be a subset of {sorted(QUICKSTART_INSTRUCTIONS)}, got unknown {unknown}")
    if not jsonl_name or Path(jsonl_name).name != jsonl_name:
        raise ValueError(f"jsonl_name must be a plain file name, got {jsonl_name!r}")
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")

    out_dir = Path(out_dir)
    images_dir = out_dir / QUICKSTART_IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    rows: list[str] = []
    for index in range(n_tasks):
        rng = np.random.default_rng([seed, index])  # per-index stream: image i does not depend on n_tasks
        buffer = io.BytesIO()
        Image.fromarray(draw_source_image(rng, size)).save(buffer, format="PNG")
        relative_image = f"{QUICKSTART_IMAGES_DIR}/src_{index:04d}.png"
        _write_if_changed(out_dir / relative_image, buffer.getvalue())
        instruction = chosen[index % len(chosen)]
        row = {
            "task_id": f"quickstart-{index:04d}",
            "instruction": instruction,
            "input_images": [relative_image],
            "task_type": QUICKSTART_INSTRUCTIONS[instruction],
            "meta_data": json.dumps({"instruction": instruction}),  # EditScore-RL-Data carries it as a JSON string
        }
        rows.append(json.dumps(row, sort_keys=True))
    tasks_path = out_dir / jsonl_name
    _write_if_changed(tasks_path, ("\n".join(rows) + "\n").encode("utf-8"))
    return tasks_path
