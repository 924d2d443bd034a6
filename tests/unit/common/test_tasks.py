"""Tests for editrl.common.tasks: the jsonl task format, source-image loading and the quickstart set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from editrl.common.tasks import (
    QUICKSTART_INSTRUCTIONS,
    MissingImageError,
    Task,
    TaskFileError,
    load_source_image,
    load_tasks,
    make_quickstart_tasks,
)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(**fields: object) -> str:
    base: dict[str, object] = {
        "instruction": "make it red",
        "input_images": ["images/a.png"],
        "task_type": "color_alter",
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


def test_load_tasks_resolves_paths_ids_and_ignores_extra_fields(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    absolute = str(tmp_path / "elsewhere" / "b.png")
    path = write_jsonl(
        data_dir / "rl.jsonl",
        [
            row(
                key="k-1",
                meta_data=json.dumps({"instruction": "make it red"}),
                instruction_long="x",
                target_img_size=512,
            ),
            "",
            "   ",
            row(input_images=[absolute, "images/../c.png"], task_type="tone_transfer", instruction="make it darker"),
            row(task_id="explicit", key="ignored"),
        ],
    )
    tasks = load_tasks(str(path))
    assert tasks == [
        Task("k-1", "make it red", (str(data_dir / "images" / "a.png"),), "color_alter"),
        Task("rl-3", "make it darker", (absolute, str(data_dir / "c.png")), "tone_transfer"),
        Task("explicit", "make it red", (str(data_dir / "images" / "a.png"),), "color_alter"),
    ]
    assert all(os.path.isabs(p) for task in tasks for p in task.input_images)


def test_relative_paths_resolve_against_the_jsonl_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "t.jsonl", [row()])
    monkeypatch.chdir(tmp_path)
    (task,) = load_tasks(Path("sub/t.jsonl"))
    assert task.input_images == (str(tmp_path / "sub" / "images" / "a.png"),)


@pytest.mark.parametrize(
    ("line", "field", "fragment"),
    [
        (row(instruction=...), "instruction", "missing"),
        (row(instruction=""), "instruction", "non-empty string"),
        (row(instruction=3), "instruction", "non-empty string"),
        (row(task_type=...), "task_type", "missing"),
        (row(input_images="images/a.png"), "input_images", "non-empty list"),
        (row(input_images=[]), "input_images", "non-empty list"),
        (row(input_images=...), "input_images", "missing"),
        (row(input_images=["ok.png", 7]), "input_images[1]", "path string"),
        (row(key={"a": 1}), "key", "string or int"),
    ],
)
def test_bad_field_names_file_line_and_field(tmp_path: Path, line: str, field: str, fragment: str) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [row(key="first"), "", line])
    with pytest.raises(TaskFileError) as info:
        load_tasks(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert f"'{field}'" in message
    assert fragment in message
    assert (info.value.line, info.value.field) == (3, field)


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [row(), '{"instruction": "make it red", '])
    with pytest.raises(TaskFileError, match=r"t\.jsonl:2: invalid JSON"):
        load_tasks(path)


def test_non_object_line_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", ['["make it red"]'])
    with pytest.raises(TaskFileError, match=r"t\.jsonl:1: each line must be a JSON object, got list"):
        load_tasks(path)


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [row(key="same"), row(key="other"), row(task_id="same")])
    with pytest.raises(
        TaskFileError, match=r"t\.jsonl:3: field 'task_id': duplicate task id 'same' \(first on line 1\)"
    ):
        load_tasks(path)


def test_empty_file_is_an_error_and_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="contains no tasks"):
        load_tasks(write_jsonl(tmp_path / "t.jsonl", ["", ""]))
    with pytest.raises(FileNotFoundError):
        load_tasks(tmp_path / "absent.jsonl")


def test_load_source_image_converts_to_rgb(tmp_path: Path) -> None:
    Image.new("RGBA", (5, 4), (10, 20, 30, 128)).save(tmp_path / "a.png")
    image = load_source_image(Task("t", "make it red", (str(tmp_path / "a.png"),), "color_alter"))
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (5, 4), (10, 20, 30))


def test_missing_or_unreadable_image_raises_missing_image_error(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent.png")
    with pytest.raises(MissingImageError) as info:
        load_source_image(Task("t", "make it red", (absent,), "color_alter"))
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.path == absent and absent in str(info.value)

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    with pytest.raises(MissingImageError, match="garbage.png"):
        load_source_image(Task("t", "make it red", (str(garbage),), "color_alter"))


def test_quickstart_writes_loadable_tasks_and_images(tmp_path: Path) -> None:
    path = make_quickstart_tasks(tmp_path / "qs", n_tasks=7, size=32, seed=3)
    assert path == tmp_path / "qs" / "tasks.jsonl"
    tasks = load_tasks(path)
    assert [t.task_id for t in tasks] == [f"quickstart-{i:04d}" for i in range(7)]
    assert [t.instruction for t in tasks[:5]] == list(QUICKSTART_INSTRUCTIONS)
    assert {t.task_type for t in tasks} == {"color_alter", "tone_transfer"}
    assert all(QUICKSTART_INSTRUCTIONS[t.instruction] == t.task_type for t in tasks)
    raw_rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert raw_rows[0]["input_images"] == ["images/src_0000.png"]  # relative in the file
    assert json.loads(raw_rows[0]["meta_data"]) == {"instruction": "make it red"}
    images = [load_source_image(t) for t in tasks]
    assert all(image.size == (32, 32) and image.mode == "RGB" for image in images)
    assert len({image.tobytes() for image in images}) == 7  # varied
    assert all(len(image.getcolors(32 * 32) or []) >= 2 for image in images)  # shapes on a background


def test_quickstart_is_idempotent_and_deterministic(tmp_path: Path) -> None:
    first = make_quickstart_tasks(tmp_path / "a", n_tasks=4, seed=1)
    files = sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert make_quickstart_tasks(tmp_path / "a", n_tasks=4, seed=1) == first
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before  # not even rewritten

    make_quickstart_tasks(tmp_path / "b", n_tasks=4, seed=1)
    make_quickstart_tasks(tmp_path / "c", n_tasks=4, seed=2)
    image = "images/src_0002.png"
    assert (tmp_path / "b" / image).read_bytes() == (tmp_path / "a" / image).read_bytes()
    assert (tmp_path / "c" / image).read_bytes() != (tmp_path / "a" / image).read_bytes()


def test_quickstart_instruction_subset(tmp_path: Path) -> None:
    tasks = load_tasks(make_quickstart_tasks(tmp_path, n_tasks=6, instructions=["make it red", "make it darker"]))
    assert [t.instruction for t in tasks] == ["make it red", "make it darker"] * 3
    with pytest.raises(ValueError, match="make it purple"):
        make_quickstart_tasks(tmp_path, instructions=["make it purple"])
    all_tasks = load_tasks(
        make_quickstart_tasks(tmp_path / "all", n_tasks=5, instructions=[], jsonl_name="train.jsonl")
    )
    assert [t.instruction for t in all_tasks] == list(QUICKSTART_INSTRUCTIONS)  # empty list means all
    assert all_tasks[0].task_id == "quickstart-0000" and (tmp_path / "all" / "train.jsonl").is_file()
    with pytest.raises(ValueError, match="plain file name"):
        make_quickstart_tasks(tmp_path, jsonl_name="sub/tasks.jsonl")
    with pytest.raises(ValueError, match="n_tasks"):
        make_quickstart_tasks(tmp_path, n_tasks=0)
