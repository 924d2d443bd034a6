"""The exported replay viewer in headless Chromium (no driver): `--dump-dom` after the page's JavaScript ran, with the
initial sort/filter taken from the URL query, and a `--screenshot` saved under the run directory.

Chromium is Debian's package, installed here if `/usr/bin/chromium` is missing. When that install fails the tests skip
(the reason is in the skip message), except under CI (`CI=true` or `CI=1`), where a missing Chromium fails the run:
CI's set-up step (`make setup`) installs it, so a skip there would hide a broken set-up.
"""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from .test_replay_tools import PNG_MAGIC, PageParser, build_real_replay, parse_page, replay

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_TIMEOUT_S = 120


def _install_chromium() -> str | None:
    """apt-get install chromium (refreshing the package lists once if the first try fails); None or the reason."""
    if not shutil.which("apt-get"):
        return "apt-get not available"
    if os.geteuid() != 0:
        return "not root: cannot apt-get install chromium"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=600)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0 or not CHROMIUM.exists():
        return f"apt-get install chromium failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}"
    return None


def in_ci(environ: Mapping[str, str]) -> bool:
    """Whether this is a CI run: ``CI`` is ``true`` (any case) or ``1``, as CI services set it."""
    return environ.get("CI", "").strip().lower() in ("true", "1")


def find_chromium(
    path: Path = CHROMIUM,
    install: Callable[[], str | None] = _install_chromium,
    environ: Mapping[str, str] = os.environ,
) -> Path:
    """``path``, installing Chromium first if it is missing; if that fails, skip, or under CI fail with the reason."""
    if path.exists():
        return path
    reason = install()
    if reason is None:
        return path
    if in_ci(environ):
        pytest.fail(
            f"CI requires Chromium for the replay viewer browser test, and {path} is missing: {reason}. "
            "`make setup` installs it (Debian package `chromium`); a skip here would hide a broken set-up.",
            pytrace=False,
        )
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Path:
    return find_chromium()


@pytest.fixture(scope="module")
def viewer(request, tmp_path_factory, tiny_model_dir, quickstart_tasks) -> tuple[Any, Path]:
    """The real replay of test_replay_tools (built once per session) exported with plots into `<run>/viewer/`."""
    run = build_real_replay(request, tmp_path_factory, tiny_model_dir, quickstart_tasks)
    out = run.run_dir / "viewer"
    replay([sys.executable, "-m", "editrl.scripts.replay"], "export", run.run_dir, "--html", out, "--png")
    return run, out / "index.html"


def browse(chromium: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(chromium), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert proc.returncode == 0, f"chromium exit {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


def dump_dom(chromium: Path, tmp_path: Path, index: Path, query: str = "") -> PageParser:
    page = parse_page(browse(chromium, tmp_path, "--dump-dom", f"{index.as_uri()}{query}").stdout)
    assert page.body.get("data-ready") == "1", "the page's JavaScript did not run"
    return page


def visible(page: PageParser) -> list[dict[str, Any]]:
    return [g for g in page.groups if not g["hidden"]]


def test_page_loads_and_shows_every_group_and_image(chromium, viewer, tmp_path):
    run, index = viewer
    page = dump_dom(chromium, tmp_path, index)
    n_groups = len(run.records)
    assert len(page.groups) == len(visible(page)) == n_groups and page.body["data-shown"] == str(n_groups)
    assert sum(len(g["imgs"]) for g in page.groups) == sum(1 + run.statuses[g]["group_size"] for g in run.records)
    assert sorted(page.other_imgs) == ["reward_by_version.png", "reward_hist.png"]
    assert [int(g["data-seq"]) for g in page.groups] == sorted(run.statuses[g]["seq"] for g in run.records)


def test_sort_queries_give_different_correctly_sorted_orders(chromium, viewer, tmp_path):
    run, index = viewer
    asc = dump_dom(chromium, tmp_path, index, "?sort=reward_asc")
    desc = dump_dom(chromium, tmp_path, index, "?sort=reward_desc")
    assert asc.body["data-sort"] == "reward_asc" and desc.body["data-sort"] == "reward_desc"
    asc_rewards = [float(g["data-reward"]) for g in visible(asc)]
    desc_rewards = [float(g["data-reward"]) for g in visible(desc)]
    assert len(asc_rewards) == len(desc_rewards) == len(run.records)
    assert asc_rewards == sorted(asc_rewards) and desc_rewards == sorted(desc_rewards, reverse=True)
    asc_ids, desc_ids = [g["data-group-id"] for g in asc.groups], [g["data-group-id"] for g in desc.groups]
    assert asc_ids != desc_ids and sorted(asc_ids) == sorted(desc_ids) == sorted(run.records)
    versions = [int(g["data-version"]) for g in visible(dump_dom(chromium, tmp_path, index, "?sort=version_desc"))]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) > 1


def test_filter_queries_hide_the_other_groups(chromium, viewer, tmp_path):
    run, index = viewer
    stored = {g: run.statuses[g] for g in run.records}
    task_type = Counter(st["task_type"] for st in stored.values()).most_common(1)[0][0]
    versions = sorted({st["version"] for st in stored.values() if st["task_type"] == task_type})
    vmin, vmax = versions[min(1, len(versions) - 1)], versions[-1]  # drop the oldest version when there are several
    means = {g: sum(st["rewards"]) / len(st["rewards"]) for g, st in stored.items()}
    eligible = [g for g, st in stored.items() if st["task_type"] == task_type and vmin <= st["version"] <= vmax]
    min_reward = math.floor(sorted(means[g] for g in eligible)[len(eligible) // 2] * 100) / 100  # about half pass
    expected = {g for g in eligible if means[g] >= min_reward}
    assert 0 < len(expected) < len(stored)
    query = f"?sort=reward_desc&task_type={task_type}&vmin={vmin}&vmax={vmax}&min_reward={min_reward}"
    page = dump_dom(chromium, tmp_path, index, query)
    shown = visible(page)
    assert {g["data-group-id"] for g in shown} == expected and page.body["data-shown"] == str(len(expected))
    assert len(page.groups) == len(stored)  # filtered groups stay in the page, hidden
    rewards = [float(g["data-reward"]) for g in shown]
    assert rewards == sorted(rewards, reverse=True)


def test_open_query_clicks_an_edit_and_its_panel_shows_the_judge_reasoning(chromium, viewer, tmp_path):
    run, index = viewer
    gid, edit = sorted(run.records)[0], 2
    status = run.statuses[gid]
    dom = browse(chromium, tmp_path, "--dump-dom", f"{index.as_uri()}?open={gid}:{edit}").stdout
    panels = re.findall(
        r'<section[^>]*data-group-id="([^"]+)".*?<div class="panel"([^>]*)>(.*?)</div></section>', dom, re.S
    )
    assert sorted(g for g, _, _ in panels) == sorted(run.records)
    opened = [
        (g, attrs, html.unescape(re.sub("<[^>]+>", "", body))) for g, attrs, body in panels if "hidden" not in attrs
    ]
    assert [g for g, _, _ in opened] == [gid]  # the click handler opened exactly that group's panel
    _, attrs, body = opened[0]
    assert f'data-edit="{edit}"' in attrs and f"edit {edit} reward {status['rewards'][edit]:.4f}" in body
    assert status["scores"]["reasoning"][edit] in body
    assert all(key in body for key in status["scores"]["sub_scores"][edit])


def test_screenshot_is_saved_under_the_run_directory(chromium, viewer, tmp_path):
    run, index = viewer
    shot = run.run_dir / "viewer.png"
    shot.unlink(missing_ok=True)
    browse(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", f"{index.as_uri()}?sort=reward_desc")
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == PNG_MAGIC
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        assert len(im.convert("RGB").getcolors(maxcolors=1280 * 2000)) > 50  # the images rendered, not a blank page


# ---------------------------------------------------------------- skip or fail without Chromium (no browser needed)


def _no_install(calls: list[int]) -> Callable[[], str | None]:
    def install() -> str | None:
        calls.append(1)
        return "apt-get not available"

    return install


@pytest.mark.parametrize("ci", ["true", "TRUE", "True", "1", " true\n"])
def test_missing_chromium_fails_under_ci(tmp_path, ci):
    calls: list[int] = []
    with pytest.raises(pytest.fail.Exception) as failed:
        find_chromium(tmp_path / "chromium", _no_install(calls), {"CI": ci})
    message = str(failed.value)
    assert "CI requires Chromium" in message and "make setup" in message and "Debian package `chromium`" in message
    assert "apt-get not available" in message and calls == [1]  # the install was tried first


def test_the_process_environment_is_what_decides(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI requires Chromium"):
        find_chromium(tmp_path / "chromium", _no_install([]))
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        find_chromium(tmp_path / "chromium", _no_install([]))


@pytest.mark.parametrize("environ", [{}, {"CI": ""}, {"CI": "false"}, {"CI": "0"}, {"CI": "yes please"}])
def test_missing_chromium_skips_outside_ci(tmp_path, environ):
    calls: list[int] = []
    with pytest.raises(pytest.skip.Exception, match="apt-get not available"):
        find_chromium(tmp_path / "chromium", _no_install(calls), environ)
    assert calls == [1]


def test_present_or_installed_chromium_is_used_without_skip_or_fail(tmp_path):
    present = tmp_path / "chromium"
    present.touch()
    calls: list[int] = []
    assert find_chromium(present, _no_install(calls), {"CI": "true"}) == present and calls == []
    missing = tmp_path / "missing"
    assert find_chromium(missing, lambda: None, {"CI": "true"}) == missing  # the install succeeded
