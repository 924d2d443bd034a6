"""docs/CONFIG.md is generated from the config schema and must agree with it."""

from __future__ import annotations

import dataclasses
from typing import Any

from editrl.common.config import GoldConfig, QuickstartData, TopologyConfig, parse_config
from editrl.scripts.config_doc import DOC, main, render, rows


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "options":  # scorers.options is a free-form mapping, one key
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_key_has_a_type_a_default_and_a_meaning() -> None:
    table = rows()
    assert [key for key, _, _, meaning in table if not meaning] == []
    assert {"learner.lr", "timers.scorer_liveness_s", "policy.sampler.noise_level", "security.curve"} <= {
        key for key, *_ in table
    }


def test_the_page_lists_exactly_the_keys_the_loader_accepts() -> None:
    """Every key of a full topology (all defaults, the optional quickstart and gold sections included) is on the page
    and the page has no other; the loader accepts that topology."""
    full = dataclasses.asdict(TopologyConfig())
    del full["source_path"]
    full["data"]["make_quickstart"] = dataclasses.asdict(QuickstartData())
    full["scorers"]["gold"] = dataclasses.asdict(GoldConfig(backend="metric"))
    full["policy"]["model"], full["data"]["tasks"] = "/m", "/t.jsonl"
    parse_config(full)
    documented = {key for key, *_ in rows()} - {"data.make_quickstart", "scorers.gold"}
    assert documented == set(_flat(full))


def test_the_page_is_up_to_date() -> None:
    assert DOC.read_text() == render(), "docs/CONFIG.md is out of date: run python -m editrl.scripts.config_doc"
    assert main(["--check"]) == 0
